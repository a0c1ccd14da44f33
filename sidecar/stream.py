"""A client socket read into the buffers its frames need, and the memory budget of the frames
being received from all clients at once.

``FrameStream`` has the kernel write a payload straight into the buffer it is spooled from:
a chunk is never copied between the socket and the spool file, and a connection holds at
most ``SCRATCH_BYTES`` that nobody asked for yet, so a client that is not being read blocks
in its own ``send``. ``ReceiveBudget`` keeps many ranks sending big chunks at once from
adding up to many times the memory of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

SCRATCH_BYTES = 64 * 1024
class FrameStream(asyncio.BufferedProtocol):
    """One client socket, read into the buffers its frames need.

    Headers and bytes read ahead land in a small scratch buffer; ``read_into`` has the
    kernel write the rest of a payload straight into the caller's buffer. Reading pauses
    while the scratch buffer is full and nobody asks for more, so what a connection holds
    beyond the frame being read is bounded and a client that is not read (back-pressure)
    blocks in ``send``. Writing (ACKs, replies) follows the transport's flow control.
    """

    def __init__(self, on_connect: Callable[[FrameStream], Coroutine[Any, Any, None]]) -> None:
        self._on_connect = on_connect
        self._scratch = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = 0  # unread bytes are _scratch[_start:_end]
        self._end = 0
        self._target: memoryview | None = None  # read_into's buffer, while the kernel fills it
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._paused = False
        self._closed = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._transport: asyncio.Transport | None = None
        self._ended = asyncio.Event()  # the client closed its end (EOF) or the socket is gone
        self.task: asyncio.Task[None] | None = None

    # -- asyncio.BufferedProtocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.task = asyncio.get_running_loop().create_task(self._on_connect(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._filled:]
        if self._end == SCRATCH_BYTES:  # room only before _start (else reading is paused)
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None
                self._wake()
            return
        self._end += nbytes
        if self._end - self._start == SCRATCH_BYTES:
            self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._ended.set()
        self._wake()
        return True  # keep the transport open: ACKs still pending may go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._closed = True
        self._ended.set()
        self._writable.set()
        self._wake()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- reading ----------------------------------------------------------------

    async def ended(self) -> None:
        """Return once the client has closed its end. Seen while reading is not paused, so
        for a client that sent less than ``SCRATCH_BYTES`` beyond what was read from it."""
        await self._ended.wait()

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes (at most ``SCRATCH_BYTES``); ``IncompleteReadError`` at end of stream."""
        while self._end - self._start < n:
            if self._eof:
                partial = bytes(self._view[self._start:self._end])
                self._start = self._end
                raise asyncio.IncompleteReadError(partial, n)
            if self._end == SCRATCH_BYTES:
                self._compact()
            await self._wait()
        data = bytes(self._view[self._start:self._start + n])
        self._consumed(n)
        return data

    async def read_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` entirely; ``IncompleteReadError`` if the stream ends first."""
        have = min(len(buffer), self._end - self._start)
        buffer[:have] = self._view[self._start:self._start + have]
        self._consumed(have)
        if have == len(buffer):
            return
        self._target, self._filled = buffer[have:], 0
        self._resume()
        try:
            while self._target is not None and not self._eof:
                await self._wait()
        finally:
            target, self._target = self._target, None
        if target is not None:  # the stream ended first
            raise asyncio.IncompleteReadError(b"", len(buffer))

    def _consumed(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        self._resume()

    def _compact(self) -> None:
        unread = self._end - self._start
        self._scratch[:unread] = self._view[self._start:self._end]
        self._start, self._end = 0, unread

    async def _wait(self) -> None:
        self._resume()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None and not self._closed:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._end - self._start < SCRATCH_BYTES and not self._closed:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    # -- writing ----------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client went away")
        self._transport.write(data)
        await self._writable.wait()
        if self._closed:
            raise ConnectionResetError("the client went away")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ReceiveBudget:
    """Bytes of frames being received at once, over all connections.

    A connection takes a frame's size from the budget before reading its payload and gives
    it back once the frame is spooled, so eight ranks sending 4 MB chunks at once hold about
    ``limit`` bytes, not eight times 4 MB (the others wait, unread, and block in ``send``).
    A frame larger than the budget waits until it is alone. So that a client stalled in the
    middle of a frame cannot hold the others up for long, a frame waits at most
    ``max_wait`` seconds and is then read anyway (past the budget, for that frame).
    """

    def __init__(self, limit: int, max_wait: float = 2.0) -> None:
        self.limit = limit
        self.max_wait = max_wait
        self.used = 0
        self._freed = asyncio.Event()

    async def take(self, n: int) -> int:
        """Wait for room for ``n`` bytes; returns what to hand back to ``give``."""
        want = min(n, self.limit)
        deadline = time.monotonic() + self.max_wait
        while self.used + want > self.limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)
        self.used += n
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()
