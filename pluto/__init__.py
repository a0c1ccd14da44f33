"""Pluto: experiment tracking for multi-node PyTorch training.

    import pluto
    run = pluto.init(project="mnist", config={"lr": 1e-3})
    run.log({"loss": 0.3})
    run.finish()
"""

import pluto._httpx_without_cli  # noqa: F401  (first: see its docstring)
from pluto import query
from pluto.checkpoints import (
    download_checkpoint,
    find_checkpoint,
    fork_checkpoint,
    list_checkpoints,
    list_files,
    load_checkpoint,
)
from pluto.errors import PlutoError, RequestRejected, ServerUnavailable
from pluto.run import Run
from pluto.sdk import current, finish, init, log
from pluto.settings import Settings
from pluto.transfer import ChecksumMismatch
from pluto.wire import CheckpointInfo, FileEntry, FileInfo, RunStatus

__version__ = "0.1.0"

__all__ = [
    "CheckpointInfo",
    "ChecksumMismatch",
    "FileEntry",
    "FileInfo",
    "PlutoError",
    "RequestRejected",
    "Run",
    "RunStatus",
    "ServerUnavailable",
    "Settings",
    "current",
    "download_checkpoint",
    "find_checkpoint",
    "finish",
    "fork_checkpoint",
    "init",
    "list_checkpoints",
    "list_files",
    "load_checkpoint",
    "log",
    "query",
]
