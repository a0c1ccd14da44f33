"""Pluto: experiment tracking for multi-node PyTorch training.

    import pluto
    run = pluto.init(project="mnist", config={"lr": 1e-3})
    run.log({"loss": 0.3})
    run.finish()
"""

from pluto import query
from pluto.errors import PlutoError, RequestRejected, ServerUnavailable
from pluto.run import Run
from pluto.sdk import current, finish, init, log
from pluto.settings import Settings
from pluto.wire import RunStatus

__version__ = "0.1.0"

__all__ = [
    "PlutoError",
    "RequestRejected",
    "Run",
    "RunStatus",
    "ServerUnavailable",
    "Settings",
    "current",
    "finish",
    "init",
    "log",
    "query",
]
