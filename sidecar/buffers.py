"""Receive buffers for big frames, used again instead of allocated for every frame.

A chunk frame of several MB read into a fresh ``bytearray`` costs more than reading it:
a block that big is above glibc's mmap threshold (256 KiB, see ``pluto._malloc``), so it
comes straight from the kernel, which faults in and zeroes every page, and ``bytearray``
then zeroes it once more. That is about 2.4 ms per 4.4 MB frame on the event loop, more than
checking the frame's envelope. A buffer whose frame is spooled is given back here and the
next frame of about its size is read into it.

Only buffers of at least ``MIN_POOLED_BYTES`` are kept (smaller ones come cheaply from the
heap), their sizes rounded up so that frames of slightly different sizes share them, and at
most ``max_bytes`` in all (the biggest), or one buffer when that one is bigger. They
serve frames that follow each other closely (a rank catching up, ranks sending at once):
after ``idle_seconds`` without a frame they are let go, so that they do not add to the
memory the forwarder uses while it sends what a burst spooled (the sidecar's peak RSS).
"""

from __future__ import annotations

import asyncio
import time

#: Smaller buffers are not kept: the heap hands them out without touching the kernel.
MIN_POOLED_BYTES = 256 * 1024
#: Kept buffers are sized in steps of this many bytes.
SIZE_STEP = 256 * 1024


class FramePool:
    def __init__(self, max_bytes: int, idle_seconds: float = 0.05) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._free: list[bytearray] = []
        self._last_used = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def pooled_bytes(self) -> int:
        return sum(len(buffer) for buffer in self._free)

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, its contents undefined."""
        if size < MIN_POOLED_BYTES:
            return bytearray(size)
        self._last_used = time.monotonic()
        fitting = [buffer for buffer in self._free if len(buffer) >= size]
        if fitting:
            buffer = min(fitting, key=len)
            self._free.remove(buffer)
            return buffer
        size = -(-size // SIZE_STEP) * SIZE_STEP
        # Kept buffers too small for this frame that ``give`` would drop for it go now,
        # before the new one is allocated: both at once would add up in the peak RSS.
        self._free.sort(key=len)
        while self._free and self.pooled_bytes + size > self.max_bytes:
            del self._free[0]
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        """Keep ``buffer`` for a later frame. The caller must hold no view of it that is
        still used: its bytes are overwritten by the next frame read into it."""
        if len(buffer) < MIN_POOLED_BYTES:
            return
        self._free.append(buffer)
        # Over the limit, the smallest go first: frames tend to grow (a writer's later
        # chunks have bigger step numbers), and a big buffer serves a small frame too.
        self._free.sort(key=len)
        while len(self._free) > 1 and self.pooled_bytes > self.max_bytes:
            del self._free[0]
        self._last_used = time.monotonic()
        self._schedule_release()

    def _schedule_release(self) -> None:
        if self._idle_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop (a test): nothing lets buffers go on a timer
        due = self._last_used + self.idle_seconds - time.monotonic()
        self._idle_timer = loop.call_later(max(due, 0.0), self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._idle_timer = None
        if time.monotonic() - self._last_used >= self.idle_seconds:
            self._free.clear()
        elif self._free:
            self._schedule_release()
