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
    watcher = None
    if settings.exit_when_idle > 0:
        watcher = asyncio.create_task(_exit_when_idle(sidecar, settings.exit_when_idle, stop))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log_event(log, "stopping: draining the spool", deadline_seconds=settings.drain_seconds)
    await sidecar.stop()
    return 0  # undelivered data stays in the spool for the next start


async def _exit_when_idle(sidecar: Sidecar, idle_for: float, stop: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(min(1.0, idle_for / 4))
        idle = sidecar.idle_seconds
        if idle is not None and idle >= idle_for:
            log_event(log, "every client has been gone a while: exiting",
                      idle_seconds=round(idle, 1))
            stop.set()
            return


def run(settings: SidecarSettings) -> int:
    configure(settings.log_level)
    return asyncio.run(_run(settings))
