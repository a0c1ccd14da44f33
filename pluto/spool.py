"""A durable, append-only spool of records, acknowledged in order.

Records live in segment files as ``[u32 length][u32 crc32][payload]``. A
cursor file (replaced atomically) remembers how far the records have been
acknowledged. After a crash, a torn or corrupt tail is detected by its length
or checksum and cut off, never replayed as garbage; everything before it is
kept. Fully acknowledged segments are deleted.

One process owns a spool directory at a time (an ``flock`` on ``LOCK``), so a
spool left by a dead process can be adopted and replayed by another. A new
spool is built under a hidden name and renamed into place already locked, and
an emptied one is renamed away before it is taken apart, so a process looking
for orphans never sees a spool that is half made or half removed.

A full volume (``ENOSPC``, ``EDQUOT``) never leaves a partial record behind: a
write that fails is cut back to where the segment ended before it, so the next
record follows the last intact one (a torn record in the middle of a segment
would hide every record after it from readers, and recovery would cut them all).
``append`` then holds the record in memory (up to ``held_max_bytes``), warns once,
and writes it when there is room again; the sidecar's queue raises
:class:`SpoolFull` instead and holds its clients back (``pluto_sidecar.queue``).
While space is short, a spool whose records are all delivered moves to a fresh
segment so that the old one, and its space, can go.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pluto.digits import parse_digits

HEADER = struct.Struct("<II")
CURSOR = struct.Struct("<QQ")
SEGMENT_BYTES = 16 * 1024 * 1024
LOCK_NAME = "LOCK"
CURSOR_NAME = "CURSOR"
#: errno values that mean "the volume (or the user's quota on it) is full".
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

Buffer = bytes | bytearray | memoryview

log = logging.getLogger("pluto.spool")


class SpoolLocked(Exception):
    """Another live process owns this spool directory."""


class SpoolFull(OSError):
    """No space left on the spool's volume: the record was not written (nothing partial
    of it is left in the spool either). Retry once there is room."""


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, SpoolFull) or (isinstance(exc, OSError) and exc.errno in NO_SPACE)


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True)
class Record:
    payload: bytes
    end: Position  # acknowledging this record moves the cursor here


@dataclass
class Recovery:
    """What opening a spool found: records kept, bytes of torn tail cut."""

    records: int = 0
    cut_bytes: int = 0


class Spool:
    #: ``append`` holds at most this many bytes of records in memory while the volume is
    #: full; past that it raises :class:`SpoolFull`.
    held_max_bytes = 64 * 1024 * 1024

    def __init__(self, directory: Path, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES, create: bool = True) -> None:
        """``create=False``: open a spool that exists (one to adopt), never make one;
        ``FileNotFoundError`` when it is gone. An adopter that made a fresh spool where an
        orphan had just been removed would then remove it under the same hidden name as
        the process removing the orphan, and take that one's removal apart."""
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        #: Set when a write found the volume full; cleared when a drained spool moved to a
        #: fresh segment (which gives the old one's space back).
        self.short_of_space = False
        #: Records written to the segment files by this process (``sync()`` reports how many
        #: it made durable).
        self.records_written = 0
        #: Records ``append`` could not write yet (volume full), oldest first.
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        self._cursor_saved = True
        self._lock = threading.Lock()
        if directory.is_dir():
            self._lock_fd = self._lock_existing(directory)
        elif create:
            self._lock_fd = self._create_locked(directory)
        else:
            raise FileNotFoundError(directory)
        self.acked = self._read_cursor()
        self.recovery = self._recover()
        self._read_pos = self.acked
        segments = self._segments()
        self._write_segment = segments[-1] if segments else max(self.acked.segment, 1)
        self._writer = _open_segment(self._path(self._write_segment))
        self.pending_bytes = self._count_pending_bytes()

    @staticmethod
    def _lock_existing(directory: Path) -> int:
        # No O_CREAT: a spool being taken apart must not get a fresh LOCK from us.
        fd = os.open(directory / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"spool {directory} is in use by another process") from None
        if not (directory / LOCK_NAME).exists():  # removed while we waited: not a spool now
            os.close(fd)
            raise FileNotFoundError(directory / LOCK_NAME)
        return fd

    @staticmethod
    def _create_locked(directory: Path) -> int:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.parent / f".new-{directory.name}-{os.getpid()}"
        staging.mkdir()
        fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, directory)
        return fd

    # -- writing ----------------------------------------------------------

    def append(self, payload: bytes) -> Position | None:
        """Write a record; with ``fsync`` off it is durable only after ``sync()``.

        Returns where the record ends: acknowledging that position delivers it. When the
        record cannot be written (the volume is full, or a write or fsync fails), nothing
        of it stays in the file; it is held in memory, written by a later ``append``,
        ``read`` or ``ack`` once there is room, and ``None`` is returned. A warning says so
        once. Past ``held_max_bytes`` held, :class:`SpoolFull` is raised instead.
        """
        with self._lock:
            if self._held:
                self._write_held_locked()
            if not self._held:
                try:
                    return self._append_locked(payload)
                except OSError as exc:
                    self._start_holding(exc)
            if self._held_bytes + len(payload) > self.held_max_bytes:
                raise SpoolFull(errno.ENOSPC, f"the spool volume of {self.directory} is full "
                                f"and {self._held_bytes} bytes already wait in memory")
            self._held.append(payload)
            self._held_bytes += len(payload)
            self.pending_bytes += HEADER.size + len(payload)
            return None

    def _append_locked(self, record: Buffer) -> Position:
        """Write one record (and fsync it, with ``fsync``); on failure nothing of it stays."""
        size = HEADER.size + len(record)
        end = self._write_locked([HEADER.pack(len(record), zlib.crc32(record)), record])
        if self.fsync:
            try:
                os.fsync(self._writer.fileno())
            except OSError:
                # Every earlier record was fsynced on its own, so only this one is in doubt:
                # take it out of the file and keep it in memory (see ``append``).
                self._cut_back(end.segment, end.offset - size)
                self.records_written -= 1
                raise
        self.pending_bytes += size
        return end

    def _write_locked(self, parts: Sequence[Buffer]) -> Position:
        """Write a record's bytes at the end of the current segment (rotating first if it is
        full). A write that fails is cut back to where the segment ended before it: a torn
        record left in the middle would hide every later record from readers."""
        if self._writer.tell() >= self.segment_bytes:
            self._rotate()
        fd = self._writer.fileno()
        start = self._writer.tell()
        try:
            _write_all(fd, parts)
        except OSError as exc:
            self._cut_back(self._write_segment, start)
            if exc.errno in NO_SPACE:
                if self._reclaim_delivered_locked(start):
                    return self._write_locked(parts)  # once: the fresh segment is empty
                self.short_of_space = True
                raise SpoolFull(exc.errno, f"no space left on the spool volume of "
                                f"{self.directory}: {exc.strerror}") from exc
            raise
        self.records_written += 1
        return Position(self._write_segment, self._writer.tell())

    def _reclaim_delivered_locked(self, end_offset: int) -> bool:
        """The volume is full and every record on disk is delivered (the spool itself filled
        the volume during an outage, then drained): move to a fresh segment and delete the
        delivered ones, so that their space takes the write. ``ack`` does the same when
        space is already short, but when the last ack came before the first failed write no
        further ack would come, and the spool would hold its space for ever. True when it
        gave the space back."""
        if end_offset == 0 or self.acked != Position(self._write_segment, end_offset):
            return False
        try:
            self._rotate()
        except OSError:
            return False
        self.acked = Position(self._write_segment, 0)
        for segment in self._segments():
            if segment < self._write_segment:
                with contextlib.suppress(OSError):
                    self._path(segment).unlink(missing_ok=True)
        # After the deletions, so the cursor has room; a crash before it is harmless: a
        # cursor naming a deleted segment reads from the first one there is (empty here).
        self._save_cursor(self.acked)
        self.short_of_space = False
        return True

    def _cut_back(self, segment: int, offset: int) -> None:
        """Truncate the current segment to ``offset`` (shrinking a file needs no space)."""
        assert segment == self._write_segment
        fd = self._writer.fileno()
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # O_APPEND writes go to the end; tell() must agree

    def _start_holding(self, exc: OSError) -> None:
        if not self._held:
            what = ("the volume is full" if is_no_space(exc)
                    else f"writing it failed ({type(exc).__name__}: {exc})")
            warnings.warn(
                f"pluto: cannot write to the spool {self.directory}: {what}. Logged data is "
                f"kept in memory (up to {self.held_max_bytes // (1024 * 1024)} MB) and "
                f"written when there is room again: free space on that volume.",
                RuntimeWarning, stacklevel=4)

    def _write_held_locked(self) -> None:
        """Write records held in memory, oldest first, as far as there is room."""
        while self._held:
            payload = self._held[0]
            try:
                self._append_locked(payload)
            except OSError:
                return
            self._held.popleft()
            self._held_bytes -= len(payload)
            self.pending_bytes -= HEADER.size + len(payload)  # _append_locked counted it again
            if not self._held:
                log.warning("pluto: the spool %s has room again; records held in memory "
                            "are written", self.directory)

    @property
    def held_bytes(self) -> int:
        """Bytes of records ``append`` holds in memory because the volume was full."""
        return self._held_bytes

    @property
    def end(self) -> Position:
        """The position just after the last record written."""
        with self._lock:
            return Position(self._write_segment, self._writer.tell())

    def sync(self) -> int:
        """Make every record appended so far durable (group commit: one fsync for many).

        Returns how many records this process has written, all of them now durable.
        Safe to call from another thread than ``append``: the fsync runs on a
        duplicate descriptor, outside the lock, so appends are not held up by it.
        """
        with self._lock:
            fd = os.dup(self._writer.fileno())
            written = self.records_written
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return written

    def _rotate(self) -> None:
        """Move on to a new segment. The finished one is fsynced first (a finished segment is
        always durable); if the new file cannot be made, nothing changes."""
        os.fsync(self._writer.fileno())
        path = self._path(self._write_segment + 1)
        try:
            writer = _open_segment(path)
            _fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            if exc.errno in NO_SPACE:
                self.short_of_space = True
                raise SpoolFull(exc.errno, f"no space left on the spool volume of "
                                f"{self.directory} for a new segment") from exc
            raise
        self._writer.close()
        self._writer = writer
        self._write_segment += 1

    # -- reading and acknowledging -----------------------------------------

    def read(self, limit: int, max_bytes: int | None = None) -> list[Record]:
        """Up to ``limit`` unread records (and about ``max_bytes``; always at least one)
        after the last ones returned, oldest first."""
        if self._held:
            with self._lock:
                self._write_held_locked()
        records: list[Record] = []
        size = 0
        for record in self._iter_from(self._read_pos):
            if records and max_bytes is not None and size + len(record.payload) > max_bytes:
                break
            records.append(record)
            size += len(record.payload)
            if len(records) >= limit:
                break
        if records:
            self._read_pos = records[-1].end
        return records

    def rewind(self) -> None:
        """Read again from the first unacknowledged record (after a failed send)."""
        self._read_pos = self.acked

    def ack(self, position: Position) -> None:
        """Everything up to ``position`` is delivered: move the cursor, drop old segments."""
        freed = self._bytes_between(self.acked, position)
        self.acked = position
        if self.short_of_space:
            position = self._fresh_segment_if_drained(position)
        with self._lock:  # append() may run on another thread
            self.pending_bytes = max(0, self.pending_bytes - freed)
        saved = self._save_cursor(position)
        for segment in self._segments():
            if segment < position.segment:
                with contextlib.suppress(OSError):
                    self._path(segment).unlink(missing_ok=True)
        if not saved:
            # Deleting delivered segments may have made room for the cursor.
            self._save_cursor(position)
        if self._held:
            with self._lock:
                self._write_held_locked()

    def _save_cursor(self, position: Position) -> bool:
        """Write the cursor file (replaced atomically). False when it could not be written.

        The cursor only saves work: without it (a full volume, an I/O error) a restart
        replays records from the last cursor that was saved, and the server applies each
        chunk once (its idempotency key), so a replay is harmless. Deleting segments that
        are wholly delivered before the cursor says so is just as safe: a cursor naming a
        segment that is gone reads from the first segment there is, at its start.
        """
        tmp = self.directory / (CURSOR_NAME + ".tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(CURSOR.pack(position.segment, position.offset))
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(tmp, self.directory / CURSOR_NAME)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self._cursor_saved:
                log.warning("pluto: cannot save the spool cursor of %s (%s); delivered "
                            "records may be sent again after a restart (the server applies "
                            "each once)", self.directory, exc)
            self._cursor_saved = False
            return False
        self._cursor_saved = True
        return True

    def _fresh_segment_if_drained(self, position: Position) -> Position:
        """With space short and every record on disk delivered, move to a fresh segment so
        that the current one (and its space) can be deleted: a spool smaller than one
        segment would otherwise never give its space back. Returns the position to keep
        as acknowledged."""
        with self._lock:
            if (position != Position(self._write_segment, self._writer.tell())
                    or position.offset == 0):
                return position
            try:
                self._rotate()
            except OSError:
                return position
            self.short_of_space = False
            self.acked = Position(self._write_segment, 0)
            return self.acked

    @property
    def empty(self) -> bool:
        return self.pending_bytes == 0

    def oldest_unsent_written_by(self) -> float | None:
        """A time (Unix) by which the oldest record not acknowledged had been written: the
        last change of the segment file that holds it. None when every record is."""
        if self.empty:
            return None
        for segment in self._segments():
            if segment < self.acked.segment:
                continue
            try:
                stat = self._path(segment).stat()
            except FileNotFoundError:
                continue
            if segment == self.acked.segment and stat.st_size <= self.acked.offset:
                continue  # acknowledged to its end: the record is in a later segment
            return stat.st_mtime
        return None

    def close(self, *, remove_if_empty: bool = False) -> None:
        with self._lock:
            if self._held:
                self._write_held_locked()
            if self._held:
                warnings.warn(
                    f"pluto: {self._held_bytes} bytes of logged data could not be written to "
                    f"the spool {self.directory} (its volume is full) and are lost",
                    RuntimeWarning, stacklevel=2)
        self._writer.close()
        if remove_if_empty and self.empty:
            # Hide it first (still locked), then take it apart: nobody can adopt it now.
            doomed = self.directory.parent / f".gone-{self.directory.name}-{os.getpid()}"
            os.rename(self.directory, doomed)
            for path in doomed.iterdir():
                path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            doomed.rmdir()
            return
        os.close(self._lock_fd)


    # -- internals ----------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.seg"

    def _segments(self) -> list[int]:
        numbers = (parse_digits(path.stem) for path in self.directory.glob("*.seg"))
        return sorted(number for number in numbers if number is not None)

    def _read_cursor(self) -> Position:
        try:
            data = (self.directory / CURSOR_NAME).read_bytes()
            segment, offset = CURSOR.unpack(data)
            return Position(segment, offset)
        except (FileNotFoundError, struct.error):
            segments = self._segments()
            return Position(segments[0] if segments else 1, 0)

    def _segments_from(self, start: Position) -> Iterator[tuple[int, int]]:
        """(segment, offset to read it from) for every segment from ``start`` on."""
        for segment in self._segments():
            if segment >= start.segment:
                yield segment, start.offset if segment == start.segment else 0

    def _iter_from(self, start: Position) -> Iterator[Record]:
        for segment, offset in self._segments_from(start):
            with open(self._path(segment), "rb") as handle:
                handle.seek(offset)
                for payload, end in _intact_records(handle, offset):
                    yield Record(payload, Position(segment, end))

    def _recover(self) -> Recovery:
        """Cut each segment after its last intact record."""
        recovery = Recovery()
        for segment in self._segments():
            path = self._path(segment)
            good = 0
            with open(path, "rb") as handle:
                for _, good in _intact_records(handle, 0):
                    if Position(segment, good) > self.acked:
                        recovery.records += 1
            size = path.stat().st_size
            if size > good:
                recovery.cut_bytes += size - good
                with open(path, "r+b") as handle:
                    handle.truncate(good)
        return recovery

    def _count_pending_bytes(self) -> int:
        total = 0
        for segment in self._segments():
            size = self._path(segment).stat().st_size
            if segment == self.acked.segment:
                total += max(0, size - self.acked.offset)
            elif segment > self.acked.segment:
                total += size
        return total

    def _bytes_between(self, start: Position, end: Position) -> int:
        if start.segment == end.segment:
            return max(0, end.offset - start.offset)
        total = 0
        for segment in self._segments():
            if start.segment <= segment < end.segment:
                size = self._path(segment).stat().st_size
                total += size - (start.offset if segment == start.segment else 0)
        return total + end.offset


def _intact_records(handle: BinaryIO, offset: int) -> Iterator[tuple[bytes, int]]:
    """(payload, end offset) of each record from ``offset`` up to the first torn or
    corrupt one: a short header or payload, or a CRC that does not match."""
    while True:
        header = handle.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        length, crc = HEADER.unpack(header)
        payload = handle.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        offset += HEADER.size + length
        yield payload, offset


def _open_segment(path: Path) -> BinaryIO:
    # Unbuffered: a record goes to the file in one ``writev`` and nothing of it lingers in a
    # buffer that a failed write would leave behind.
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_spool_name(name: str) -> bool:
    """Spools in the making or being removed have hidden names; orphans never do."""
    return not name.startswith(".")
