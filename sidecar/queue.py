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
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pluto.spool import HEADER, Position, Record, Spool, _fsync_dir

Buffer = bytes | bytearray | memoryview


class RecordKind(bytes, enum.Enum):
    OPEN = b"O"  # a RunCreate (msgpack) the server has not answered yet
    CHUNK = b"C"  # a Chunk (msgpack), exactly as the client sent it
    UPDATE = b"U"  # a RunUpdateRequest (msgpack)


class SidecarSpool(Spool):
    """``pluto.spool.Spool`` (same files, same records, same recovery) written without copies.

    A client's frame is received straight into the buffer that becomes the spool record (a
    kind byte, then the frame's payload). ``append_record`` writes it with one ``writev``
    (header, record), unbuffered, instead of building ``header + payload`` and copying that
    through a ``BufferedWriter``: for chunk frames of several MB those copies were most of the
    sidecar's memory and a good part of its time. Durability is unchanged: nothing is
    promised before ``sync()`` (group commit, see ``DurableQueue``).

    ``read_from`` reads without moving the shared read position, so it can run in a worker
    thread that a cancelled forwarder may leave behind (``DurableQueue.read``).
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, fsync=False)
        self._writer.close()
        self._writer = _unbuffered(self._path(self._write_segment))

    def append_record(self, record: Buffer) -> Position:
        """Write one record (its bytes as given, unchanged); durable only after ``sync()``."""
        header = HEADER.pack(len(record), zlib.crc32(record))
        with self._lock:
            if self._writer.tell() >= self.segment_bytes:
                self._rotate()
            _write_all(self._writer.fileno(), [header, record])
            self.pending_bytes += HEADER.size + len(record)
            return Position(self._write_segment, self._writer.tell())

    def _rotate(self) -> None:
        os.fsync(self._writer.fileno())  # a finished segment is always durable
        self._writer.close()
        self._write_segment += 1
        self._writer = _unbuffered(self._path(self._write_segment))
        _fsync_dir(self.directory)

    def read_from(self, start: Position, limit: int, max_bytes: int) -> list[Record]:
        """Like ``Spool.read`` (up to ``limit`` records and about ``max_bytes``, always at
        least one), from ``start``, leaving the read position alone."""
        records: list[Record] = []
        size = 0
        for record in self._iter_from(start):
            if records and size + len(record.payload) > max_bytes:
                break
            records.append(record)
            size += len(record.payload)
            if len(records) >= limit:
                break
        return records


def _unbuffered(path: Path) -> Any:
    # Any: Spool types its writer as a BufferedWriter; a FileIO offers all Spool uses of it
    # (write, flush, tell, fileno, close), without a buffer to copy records through.
    return open(path, "ab", buffering=0)


def _write_all(fd: int, parts: Sequence[Buffer]) -> None:
    """``writev`` until every byte is written (a regular file rarely takes less)."""
    views = [memoryview(part).cast("B") for part in parts]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


class DurableQueue:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.spool = SidecarSpool(directory)
        self._read_pos = self.spool.acked
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
        return self.append_record(kind.value + payload)

    def append_record(self, record: Buffer) -> int:
        """Append a record already laid out as ``kind byte + payload`` (a client's frame as
        received, see ``Connection``), without copying it; returns a ticket for
        ``durable()``."""
        end = self.spool.append_record(record)
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

    async def read(self, limit: int, max_bytes: int) -> list[Record]:
        """The next records to forward (about ``max_bytes``, at least one).

        Read and CRC-checked in a worker thread (file reads and CRCs of big records let go
        of the GIL, so the loop keeps serving clients). The read position moves only here,
        on the loop, once the read is done: a read abandoned by a cancelled forwarder
        cannot move it past a later ``rewind()``.
        """
        start = self._read_pos
        records = await asyncio.to_thread(self.spool.read_from, start, limit, max_bytes)
        if records and self._read_pos == start:
            self._read_pos = records[-1].end
        return records

    def rewind(self) -> None:
        """Read again from the first record the server has not acknowledged."""
        self._read_pos = self.spool.acked

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
