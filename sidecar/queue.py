"""The sidecar's durable queue: spool records in, group commit, back-pressure.

Clients' frames are appended as they arrive; one committer task fsyncs the spool
for everything appended so far and only then are those frames acknowledged. So
an ACK always means "on disk", and many ranks share one fsync.

A full spool volume is back-pressure too, never loss: a record that finds no room
is held in memory (nothing partial of it stays in the file), unacknowledged, and
the queue reports itself full, so connections stop reading their clients (one
frame each at most is held). The committer writes held records, in order, as soon
as there is room (after each acknowledgement by the server, and every second),
and the sidecar logs one line when the volume fills and one when it has room again.
While a backlog drains on a volume it filled, the records that are let in fill the
space each acknowledgement frees, again and again: that is one episode, so "room
again" is logged once the volume has kept room for ``ROOM_QUIET_SECONDS``, with how
often it filled again meanwhile, not a pair of lines per acknowledgement.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import io
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pluto.spool import HEADER, Buffer, Position, Record, Spool, SpoolFull
from pluto_sidecar.logs import log_event

log = logging.getLogger("pluto.sidecar.spool")

#: While records are held for want of space, the committer tries to write them this often
#: (and after every acknowledgement, which may have freed space).
HELD_RETRY_SECONDS = 1.0
#: A full volume's episode ends (and "room again" is logged) once nothing has been held for
#: want of space for this long.
ROOM_QUIET_SECONDS = 5.0
#: The exit code after a failed fsync (EX_IOERR): see ``DurableQueue._fsync_failed``.
EXIT_FSYNC_FAILED = 74
#: ``SidecarSpool.stream_payloads`` reads this much at a time.
STREAM_PIECE = 256 * 1024


class RecordKind(bytes, enum.Enum):
    OPEN = b"O"  # a RunCreate (msgpack) the server has not answered yet
    CHUNK = b"C"  # a Chunk (msgpack), exactly as the client sent it
    UPDATE = b"U"  # a RunUpdateRequest (msgpack)


class SidecarSpool(Spool):
    """``pluto.spool.Spool`` (same files, same records, same recovery) written without copies.

    A client's frame is received straight into the buffer that becomes the spool record (a
    kind byte, then the frame's payload). ``append_record`` writes it with one ``writev``
    (header, record), unbuffered: for chunk frames of several MB a copy into ``header +
    payload`` was most of the sidecar's memory and a good part of its time. Durability is
    unchanged: nothing is promised before ``sync()`` (group commit, see ``DurableQueue``).
    A record that finds the volume full raises :class:`~pluto.spool.SpoolFull` and leaves
    nothing of itself in the file.

    ``read_from`` reads without moving the shared read position, so it can run in a worker
    thread that a cancelled forwarder may leave behind (``DurableQueue.read``).
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, fsync=False)

    def append_record(self, record: Buffer) -> Position:
        """Write one record (its bytes as given, unchanged); durable only after ``sync()``."""
        header = HEADER.pack(len(record), zlib.crc32(record))
        with self._lock:
            end = self._write_locked([header, record])
            self.pending_bytes += HEADER.size + len(record)
            return end

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

    def spans_from(self, start: Position, limit: int, max_bytes: int) -> list[Span]:
        """Where the records ``read_from`` would return are, read from their headers and
        kind bytes only (a torn tail ends a segment, as for ``read_from``)."""
        spans: list[Span] = []
        size = 0
        for segment, offset in self._segments_from(start):
            with open(self._path(segment), "rb") as handle:
                file_size = os.fstat(handle.fileno()).st_size
                while offset + HEADER.size < file_size:
                    handle.seek(offset)
                    length, crc = HEADER.unpack(handle.read(HEADER.size))
                    payload = offset + HEADER.size
                    if length == 0 or payload + length > file_size:
                        break
                    if spans and size + length > max_bytes:
                        return spans
                    spans.append(Span(handle.read(1), Position(segment, offset), payload,
                                      length, crc, Position(segment, payload + length)))
                    size += length
                    if len(spans) >= limit:
                        return spans
                    offset = payload + length
        return spans

    def stream_payloads(self, spans: list[Span], write: Callable[[memoryview], object]) -> None:
        """Each span's payload but its kind byte, in order, to ``write`` a piece at a time
        (a view of a reused buffer: ``write`` consumes it at once); every payload checked
        against its CRC, :class:`SpoolCorrupt` when one does not match."""
        buffer = memoryview(bytearray(STREAM_PIECE))
        handle: io.BufferedReader | None = None
        segment = -1
        try:
            for span in spans:
                if span.start.segment != segment:
                    if handle is not None:
                        handle.close()
                    segment = span.start.segment
                    handle = open(self._path(segment), "rb")  # noqa: SIM115
                assert handle is not None
                handle.seek(span.payload)
                crc, left, skip = 0, span.length, 1
                while left:
                    got = handle.readinto(buffer[:min(STREAM_PIECE, left)])
                    if not got:
                        raise SpoolCorrupt(f"{self._path(segment)}: a record ends early")
                    piece = buffer[:got]
                    crc = zlib.crc32(piece, crc)
                    write(piece[skip:])
                    skip, left = 0, left - got
                if crc != span.crc:
                    raise SpoolCorrupt(f"{self._path(segment)}: the record at offset "
                                       f"{span.start.offset} does not match its checksum")
        finally:
            if handle is not None:
                handle.close()


class SpoolCorrupt(Exception):
    """A record read back does not match its checksum (or ends early)."""


@dataclass(frozen=True)
class Span:
    """A spool record located, its payload not read: see ``SidecarSpool.spans_from``."""

    kind: bytes  # the payload's first byte: a RecordKind value
    start: Position  # of its header
    payload: int  # offset of the payload in the segment
    length: int  # of the payload
    crc: int
    end: Position  # acknowledging this record moves the cursor here


#: What ``DurableQueue._read_ahead`` reads: records, or where they are.
_Read = TypeVar("_Read", Record, Span)


def _exit_now(code: int) -> None:
    os._exit(code)


class DurableQueue:
    def __init__(self, directory: Path, max_bytes: int, *,
                 exit_process: Callable[[int], None] = _exit_now) -> None:
        self.spool = SidecarSpool(directory)
        self._exit_process = exit_process
        #: Records appended but not written for want of space: (ticket, record, time), oldest
        #: first. Their tickets are the newest (order is kept), so tickets up to
        #: ``_appended - len(_held)`` are in the file.
        self._held: collections.deque[tuple[int, Buffer, float]] = collections.deque()
        self._held_bytes = 0
        #: Since when (monotonic) the spool volume has been full; None while it has room.
        self.volume_full_since: float | None = None
        #: Since when (monotonic) a full volume's held records have all been written: the
        #: episode ends ROOM_QUIET_SECONDS later unless the volume fills again.
        self._room_since: float | None = None
        #: How often the volume filled again within the current episode.
        self._refills = 0
        self._read_pos = self.spool.acked
        self.max_bytes = max_bytes
        self._appended = 0
        self._synced = 0
        self._new_data = asyncio.Event()
        self._to_sync = asyncio.Event()
        self._synced_cond = asyncio.Condition()
        self._room_cond = asyncio.Condition()
        # (end position, time appended) of every record not yet acknowledged, oldest first.
        # Records found in the spool at start count from when their oldest was written at
        # the latest (its file's last change), not from this start: a restart of the
        # sidecar must not make an old backlog look fresh on ``oldest_unsent_age_seconds``.
        self._unsent: collections.deque[tuple[Position, float]] = collections.deque()
        if not self.spool.empty:
            written = self.spool.oldest_unsent_written_by()
            self._unsent.append((self.spool.end, written if written is not None else time.time()))
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
        with contextlib.suppress(OSError):  # nothing is acknowledged after this sync
            await asyncio.to_thread(self.spool.sync)
        if self._held:
            log_event(log, "stopping with records held for want of space: they were not "
                      "acknowledged, so their clients still have them",
                      held_records=len(self._held), held_bytes=self._held_bytes,
                      level=logging.WARNING)
        elif self._room_since is not None:
            self._end_full_episode()
        self.spool.close()

    # -- producers (client connections) ----------------------------------------

    @property
    def full(self) -> bool:
        """No room: ``max_bytes`` of unsent data spooled, or the spool volume is full."""
        return bool(self._held) or self.spool.pending_bytes >= self.max_bytes

    @property
    def volume_full(self) -> bool:
        """The spool volume had no room for the last record, which waits in memory."""
        return bool(self._held)

    def holds(self, record: Buffer) -> bool:
        """Whether ``record`` (the very object given to ``append_record``) waits in memory
        for room on the volume: its buffer must not be used for anything else meanwhile."""
        return any(held is record for _, held, _ in self._held)

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
        ``durable()``. With the volume full the record waits in memory (see the module
        docstring): its ticket becomes durable once it is written and fsynced."""
        self._appended += 1
        ticket = self._appended
        now = time.time()
        if self._held or not self._write(ticket, record, now):
            self._held.append((ticket, record, now))
            self._held_bytes += len(record)
        self._to_sync.set()
        return ticket

    def _write(self, ticket: int, record: Buffer, at: float) -> bool:
        """Write a record to the spool; False when the volume has no room for it."""
        try:
            end = self.spool.append_record(record)
        except SpoolFull as exc:
            if self.volume_full_since is None:
                self.volume_full_since = time.monotonic()
                self._log_volume_full(exc)
            elif self._room_since is not None:  # full again within the episode: quietly
                self._room_since = None
                self._refills += 1
            return False
        except OSError as exc:  # not a full volume: an I/O error the spool cannot survive
            self._fsync_failed(exc)
            return False
        self._unsent.append((end, at))
        self._new_data.set()
        return True

    def _log_volume_full(self, exc: OSError) -> None:
        directory = self.spool.directory
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = None
        log_event(log, "spool volume full: clients are held back until there is room; "
                  "nothing is dropped. Give the spool's volume more space, or let the server "
                  "drain the spool (is it reachable?)", spool=str(directory),
                  volume_free_bytes=free, spool_bytes=self.spool.pending_bytes,
                  error=str(exc.strerror or exc), level=logging.ERROR)

    async def _write_held(self) -> None:
        """Write held records, oldest first, as far as there is room."""
        held = self._held
        while held:
            ticket, record, at = held[0]
            if not self._write(ticket, record, at):
                return
            held.popleft()
            self._held_bytes -= len(record)
        if self.volume_full_since is not None and self._room_since is None:
            self._room_since = time.monotonic()
        async with self._room_cond:
            self._room_cond.notify_all()

    def _end_full_episode_after_quiet(self) -> None:
        if (self._room_since is not None and not self._held
                and time.monotonic() - self._room_since >= ROOM_QUIET_SECONDS):
            self._end_full_episode()

    def _end_full_episode(self) -> None:
        assert self.volume_full_since is not None and self._room_since is not None
        log_event(log, "spool volume has room again: clients are read again",
                  spool=str(self.spool.directory),
                  full_seconds=round(self._room_since - self.volume_full_since, 1),
                  filled_again=self._refills, spool_bytes=self.spool.pending_bytes)
        self.volume_full_since = self._room_since = None
        self._refills = 0

    async def durable(self, ticket: int) -> None:
        """Wait until the record with this ticket is fsynced."""
        if self._synced >= ticket:
            return
        async with self._synced_cond:
            await self._synced_cond.wait_for(lambda: self._synced >= ticket)

    async def _commit_loop(self) -> None:
        while True:
            if self._held:  # retry now and then: space may come back from elsewhere too
                timeout: float | None = HELD_RETRY_SECONDS
            elif self._room_since is not None:  # wake to end the full volume's episode
                timeout = max(0.0, self._room_since + ROOM_QUIET_SECONDS - time.monotonic())
            else:
                timeout = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_sync.wait(), timeout)
            self._end_full_episode_after_quiet()
            if not self._to_sync.is_set() and not self._held:
                continue  # woken only to end the episode
            self._to_sync.clear()
            if self._held:
                await self._write_held()
            try:
                written = await asyncio.to_thread(self.spool.sync)
            except OSError as exc:
                self._fsync_failed(exc)
                return
            # Records are written in ticket order and held ones are the newest, so the
            # first ``written`` tickets are on disk now.
            self._synced = written
            async with self._synced_cond:
                self._synced_cond.notify_all()

    def _fsync_failed(self, exc: OSError) -> None:
        """A failed fsync (or a write error other than a full volume): exit at once.

        After a failed fsync nobody knows what of the file is on disk: Linux may already
        have dropped the dirty pages, or marked them clean with the error reported once, so
        a retried fsync can succeed while the data never reached the disk. Nothing written
        since the last good fsync may therefore be acknowledged on the strength of a later
        one, and the sidecar keeps no copy of those records to write them again (frames are
        spooled without copies). It was not acknowledged either: every client still holds
        what it sent since, and resends it when it reconnects. So the only safe move is the
        one a crash makes: stop now (the kubelet restarts a native sidecar), and let the
        next start recover the spool (a torn or corrupt tail is cut by its CRC). A record
        that survives in the file and is also resent is applied once by the server (its
        idempotency key), and everything acknowledged before was covered by a good fsync.
        """
        log_event(log, "spool fsync or write failed: what was written since the last good "
                  "fsync may not be on disk; exiting so that a restart recovers the spool "
                  "and clients resend what was not acknowledged",
                  spool=str(self.spool.directory), error=f"{type(exc).__name__}: {exc}",
                  exit_code=EXIT_FSYNC_FAILED, level=logging.CRITICAL)
        self._exit_process(EXIT_FSYNC_FAILED)

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
        return await self._read_ahead(self.spool.read_from, limit, max_bytes)

    async def read_spans(self, limit: int, max_bytes: int) -> list[Span]:
        """Like ``read``, where the next records are rather than their bytes (see
        ``SidecarSpool.spans_from``); the read position moves past them the same way."""
        return await self._read_ahead(self.spool.spans_from, limit, max_bytes)

    async def _read_ahead(self, read: Callable[[Position, int, int], list[_Read]],
                          limit: int, max_bytes: int) -> list[_Read]:
        """``read(start, limit, max_bytes)`` from the read position, in a worker thread;
        then, on the loop, the read position moves past what it found, unless a
        ``rewind()`` came meanwhile (see ``read``)."""
        start = self._read_pos
        found = await asyncio.to_thread(read, start, limit, max_bytes)
        if found and self._read_pos == start:
            self._read_pos = found[-1].end
        return found

    async def records(self, spans: list[Span]) -> list[Record]:
        """The records at ``spans``, bytes and all; :class:`SpoolCorrupt` when one of them
        no longer reads back whole (``read`` then stops before it, as it always did)."""
        records = await asyncio.to_thread(self.spool.read_from, spans[0].start, len(spans),
                                          self.max_bytes)
        if len(records) != len(spans):
            raise SpoolCorrupt(f"a record at {spans[len(records)].start} does not read back "
                               "whole")
        return records

    async def reread(self, count: int) -> list[Record]:
        """The first ``count`` records the server has not acknowledged, read again (the
        read position stays where it is)."""
        return await asyncio.to_thread(self.spool.read_from, self.spool.acked, count,
                                       self.max_bytes)

    def rewind(self) -> None:
        """Read again from the first record the server has not acknowledged."""
        self._read_pos = self.spool.acked

    async def ack(self, position: Position) -> None:
        await asyncio.to_thread(self.spool.ack, position)
        unsent = self._unsent
        while unsent and unsent[0][0] <= position:
            unsent.popleft()
        if self._held:
            self._to_sync.set()  # the acknowledgement may have freed space: write them now
        async with self._room_cond:
            self._room_cond.notify_all()

    @property
    def oldest_unsent_age(self) -> float:
        """Seconds since the oldest record not yet acknowledged by the server was spooled."""
        try:  # read by the metrics thread while the loop appends and pops
            return time.time() - self._unsent[0][1]
        except IndexError:
            pass
        try:  # nothing in the file is unsent, but records wait for room on the volume
            return time.time() - self._held[0][2]
        except IndexError:
            return 0.0

    @property
    def pending_bytes(self) -> int:
        """Unsent bytes in the spool (records held in memory not counted)."""
        return self.spool.pending_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of records waiting in memory for room on the spool volume."""
        return self._held_bytes

    @property
    def empty(self) -> bool:
        return self.spool.empty and not self._held
