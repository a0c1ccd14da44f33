"""The sidecar's durable queue: spool records in, group commit, back-pressure.

Clients' frames are appended as they arrive; one committer task fsyncs the spool
for everything appended so far and only then are those frames acknowledged. So
an ACK always means "on disk", and many ranks share one fsync.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from pathlib import Path

from pluto.spool import Position, Record, Spool


class RecordKind(bytes, enum.Enum):
    OPEN = b"O"  # a RunCreate (msgpack) the server has not answered yet
    CHUNK = b"C"  # a Chunk (msgpack), exactly as the client sent it
    UPDATE = b"U"  # a RunUpdateRequest (msgpack)


class DurableQueue:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.spool = Spool(directory, fsync=False)
        self.max_bytes = max_bytes
        self._appended = 0
        self._synced = 0
        self._new_data = asyncio.Event()
        self._to_sync = asyncio.Event()
        self._synced_cond = asyncio.Condition()
        self._room_cond = asyncio.Condition()
        # (end position, time appended) of every record not yet acknowledged, oldest first.
        # Records found in the spool at start count from the start.
        self._unsent: collections.deque[tuple[Position, float]] = collections.deque()
        if not self.spool.empty:
            self._unsent.append((self.spool.end, time.time()))
        self._committer: asyncio.Task[None] | None = None

    @property
    def recovery(self) -> tuple[int, int]:
        """(records found unsent, bytes of torn tail cut) when the spool was opened."""
        return self.spool.recovery.records, self.spool.recovery.cut_bytes

    def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="spool-committer")

    async def stop(self) -> None:
        if self._committer is not None:
            self._committer.cancel()
        await asyncio.to_thread(self.spool.sync)
        self.spool.close()

    # -- producers (client connections) ----------------------------------------

    @property
    def full(self) -> bool:
        return self.spool.pending_bytes >= self.max_bytes

    async def room(self) -> None:
        """Back-pressure: wait while the spool holds ``max_bytes`` of unsent data."""
        if not self.full:
            return
        async with self._room_cond:
            await self._room_cond.wait_for(lambda: not self.full)

    def append(self, kind: RecordKind, payload: bytes) -> int:
        """Append a record; returns a ticket for ``durable()``."""
        end = self.spool.append(kind.value + payload)
        self._appended += 1
        self._unsent.append((end, time.time()))
        self._to_sync.set()
        self._new_data.set()
        return self._appended

    async def durable(self, ticket: int) -> None:
        """Wait until the record with this ticket is fsynced."""
        if self._synced >= ticket:
            return
        async with self._synced_cond:
            await self._synced_cond.wait_for(lambda: self._synced >= ticket)

    async def _commit_loop(self) -> None:
        while True:
            await self._to_sync.wait()
            self._to_sync.clear()
            target = self._appended
            await asyncio.to_thread(self.spool.sync)
            self._synced = target
            async with self._synced_cond:
                self._synced_cond.notify_all()

    # -- the consumer (forwarder) --------------------------------------------

    async def wait_for_data(self, timeout: float) -> None:
        if not self.spool.empty:
            return
        self._new_data.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new_data.wait(), timeout)

    def read(self, limit: int, max_bytes: int) -> list[Record]:
        return self.spool.read(limit, max_bytes)

    def rewind(self) -> None:
        self.spool.rewind()

    async def ack(self, position: Position) -> None:
        await asyncio.to_thread(self.spool.ack, position)
        unsent = self._unsent
        while unsent and unsent[0][0] <= position:
            unsent.popleft()
        async with self._room_cond:
            self._room_cond.notify_all()

    @property
    def oldest_unsent_age(self) -> float:
        """Seconds since the oldest record not yet acknowledged by the server was spooled."""
        try:  # read by the metrics thread while the loop appends and pops
            return time.time() - self._unsent[0][1]
        except IndexError:
            return 0.0

    @property
    def pending_bytes(self) -> int:
        return self.spool.pending_bytes

    @property
    def empty(self) -> bool:
        return self.spool.empty
