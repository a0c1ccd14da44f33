"""Import httpx without its command-line client.

``import httpx`` also imports ``httpx._main``, the ``httpx`` command, and with it rich's
console, click and pygments whenever they are installed (rich is a dependency of pluto,
click of uvicorn): about 50 ms and 5 MB in every process that imports pluto, which is every
rank of a training job and every sidecar, for a command pluto never runs. httpx falls back
to a stub ``main`` when ``httpx._main`` cannot be imported (a ``None`` in ``sys.modules``
makes that import fail), and its maintainers are discussing importing it lazily
(encode/httpx#3547). The ``None`` is taken out again at once, so a later
``import httpx._main`` by anyone else works as usual.

Imported first by ``pluto/__init__.py``, before any module that imports httpx.
"""

from __future__ import annotations

import sys

_CLI = "httpx._main"

if "httpx" not in sys.modules and _CLI not in sys.modules:
    sys.modules[_CLI] = None  # type: ignore[assignment]
    try:
        import httpx  # noqa: F401
    finally:
        if _CLI in sys.modules and sys.modules[_CLI] is None:
            del sys.modules[_CLI]
