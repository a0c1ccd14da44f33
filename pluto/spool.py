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
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HEADER = struct.Struct("<II")
CURSOR = struct.Struct("<QQ")
SEGMENT_BYTES = 16 * 1024 * 1024
LOCK_NAME = "LOCK"
CURSOR_NAME = "CURSOR"


class SpoolLocked(Exception):
    """Another live process owns this spool directory."""


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
    def __init__(self, directory: Path, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        if directory.is_dir():
            self._lock_fd = self._lock_existing(directory)
        else:
            self._lock_fd = self._create_locked(directory)
        self.acked = self._read_cursor()
        self.recovery = self._recover()
        self._read_pos = self.acked
        segments = self._segments()
        self._write_segment = segments[-1] if segments else max(self.acked.segment, 1)
        self._writer = open(self._path(self._write_segment), "ab")  # noqa: SIM115
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

    def append(self, payload: bytes) -> Position:
        """Write a record; with ``fsync`` off it is durable only after ``sync()``.

        Returns where the record ends: acknowledging that position delivers it.
        """
        with self._lock:
            if self._writer.tell() >= self.segment_bytes:
                self._rotate()
            self._writer.write(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            self._writer.flush()
            if self.fsync:
                os.fsync(self._writer.fileno())
            self.pending_bytes += HEADER.size + len(payload)
            return Position(self._write_segment, self._writer.tell())

    @property
    def end(self) -> Position:
        """The position just after the last record written."""
        with self._lock:
            return Position(self._write_segment, self._writer.tell())

    def sync(self) -> None:
        """Make every record appended so far durable (group commit: one fsync for many).

        Safe to call from another thread than ``append``: the fsync runs on a
        duplicate descriptor, outside the lock, so appends are not held up by it.
        """
        with self._lock:
            fd = os.dup(self._writer.fileno())
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        os.fsync(self._writer.fileno())  # a finished segment is always durable
        self._writer.close()
        self._write_segment += 1
        self._writer = open(self._path(self._write_segment), "ab")  # noqa: SIM115
        _fsync_dir(self.directory)

    # -- reading and acknowledging -----------------------------------------

    def read(self, limit: int, max_bytes: int | None = None) -> list[Record]:
        """Up to ``limit`` unread records (and about ``max_bytes``; always at least one)
        after the last ones returned, oldest first."""
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
        tmp = self.directory / (CURSOR_NAME + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(CURSOR.pack(position.segment, position.offset))
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, self.directory / CURSOR_NAME)
        with self._lock:  # append() may run on another thread
            self.pending_bytes = max(0, self.pending_bytes - freed)
        for segment in self._segments():
            if segment < position.segment:
                self._path(segment).unlink(missing_ok=True)

    @property
    def empty(self) -> bool:
        return self.pending_bytes == 0

    def close(self, *, remove_if_empty: bool = False) -> None:
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
        return sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())

    def _read_cursor(self) -> Position:
        try:
            data = (self.directory / CURSOR_NAME).read_bytes()
            segment, offset = CURSOR.unpack(data)
            return Position(segment, offset)
        except (FileNotFoundError, struct.error):
            segments = self._segments()
            return Position(segments[0] if segments else 1, 0)

    def _iter_from(self, start: Position) -> Iterator[Record]:
        for segment in self._segments():
            if segment < start.segment:
                continue
            offset = start.offset if segment == start.segment else 0
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_spool_name(name: str) -> bool:
    """Spools in the making or being removed have hidden names; orphans never do."""
    return not name.startswith(".")
