"""``pluto sidecar``: run the per-pod sidecar until SIGTERM, then drain and exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal

from pluto._malloc import M_MMAP_THRESHOLD, mallopt
from pluto_sidecar.logs import configure, log_event
from pluto_sidecar.settings import SidecarSettings
from pluto_sidecar.sidecar import CannotStart, Sidecar

log = logging.getLogger("pluto.sidecar")


async def _run(settings: SidecarSettings) -> int:
    sidecar = Sidecar(settings)
    try:
        await sidecar.start()
    except CannotStart as exc:
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


#: The value the sidecar sets glibc's M_MMAP_THRESHOLD to.
MMAP_THRESHOLD_BYTES = 256 * 1024


def tune_malloc() -> bool:
    """Have glibc give big buffers back to the kernel as soon as they are freed.

    The sidecar's big allocations are short-lived: a chunk frame of a few MB lives from the
    socket read until it is spooled, a batch until the server answered. By default glibc
    serves a freed mmapped block's size from the heap the next time (its mmap threshold
    rises up to 32 MB), and the heap keeps freed memory resident: peak RSS under load was
    about 20 MB higher than with a fixed threshold (docs/benchmarks.md). A fixed threshold
    of 256 KiB keeps small objects on the heap and maps every bigger buffer on its own, at
    the cost of page faults on each new buffer (a few ms of CPU per 100 MB). Left alone
    where ``MALLOC_MMAP_THRESHOLD_`` is set (the operator's choice wins) and where the C
    library has no ``mallopt`` (not glibc: nothing to do). The server does the opposite
    (``pluto_server.main.tune_malloc``): its big buffers are a query's, and it asks again.
    """
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def run(settings: SidecarSettings) -> int:
    configure(settings.log_level)
    tune_malloc()
    return asyncio.run(_run(settings))
