"""What the SDK needs from a transport; the sidecar transport implements the same."""

from __future__ import annotations

import abc

from pluto.wire import IngestResult, RunAttached, RunCreate, RunInfo, RunUpdate


class Transport(abc.ABC):
    """Control calls block and raise ``PlutoError``s; ``deliver`` is called from the
    background sender only and raises ``RequestRejected`` (permanent or not) or
    ``ServerUnavailable``."""

    @property
    @abc.abstractmethod
    def destination(self) -> str:
        """Where chunks go (the server's URL, or the sidecar's socket): a spool left behind
        is delivered only through a transport with the same destination, as its chunks
        name runs by that server's ids."""

    @abc.abstractmethod
    def open_run(self, request: RunCreate, timeout: float) -> RunAttached: ...

    @abc.abstractmethod
    def update_run(self, run_id: int, request: RunUpdate) -> RunInfo | None:
        """The run as updated, or None when the update was queued to be applied later."""

    @abc.abstractmethod
    def deliver(self, chunks: list[bytes]) -> IngestResult:
        """Send msgpack-encoded ``Chunk``s; they are applied exactly once."""

    def interrupt(self) -> None:
        """Make a call blocked in another thread fail now (as ``ServerUnavailable``):
        ``finish()`` gave up waiting and the sender must not hold the process up for a
        whole request timeout. Safe from any thread; the transport stays usable. Does
        nothing where there is nothing to wake (HTTP: its requests time out on their own)."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...
