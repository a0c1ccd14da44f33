"""``pluto sidecar``: run the per-pod sidecar until SIGTERM, then drain and exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal

from pluto_sidecar.logs import configure, log_event
from pluto_sidecar.settings import SidecarSettings
from pluto_sidecar.sidecar import Sidecar, SocketInUse

log = logging.getLogger("pluto.sidecar")


async def _run(settings: SidecarSettings) -> int:
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except SocketInUse as exc:
        log_event(log, "not starting", error=str(exc), level=logging.ERROR)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log_event(log, "stopping: draining the spool", deadline_seconds=settings.drain_seconds)
    await sidecar.stop()
    return 0  # undelivered data stays in the spool for the next start


def run(settings: SidecarSettings) -> int:
    configure(settings.log_level)
    return asyncio.run(_run(settings))
