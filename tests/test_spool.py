"""The SDK's durable spool (``pluto.spool.Spool``), on a real directory.

The spool is what makes "nothing ``log()`` accepted is lost or duplicated"
true across outages and crashes: records come back in order until they are
acknowledged, survive a close and reopen, a torn or corrupt tail is cut (never
replayed as garbage) while everything before it is kept, and only one process
owns a spool directory at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pluto.spool import HEADER, Record, Spool, SpoolLocked


def payloads(records: list[Record]) -> list[bytes]:
    return [r.payload for r in records]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_records_come_back_in_order_until_acknowledged(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=False)
    assert spool.empty and spool.read(10) == []
    for name in (b"a", b"bb", b"ccc"):
        spool.append(name)
    assert spool.pending_bytes == 3 * HEADER.size + 6

    first = spool.read(2)
    assert payloads(first) == [b"a", b"bb"]
    assert payloads(spool.read(10)) == [b"ccc"]  # reading moves on past what was returned
    assert spool.read(10) == []

    spool.rewind()  # a failed send: everything unacknowledged comes back
    assert payloads(spool.read(10)) == [b"a", b"bb", b"ccc"]

    spool.ack(first[-1].end)
    assert spool.pending_bytes == HEADER.size + 3
    spool.rewind()
    assert payloads(spool.read(10)) == [b"ccc"]  # acknowledged records never return

    spool.append(b"dddd")
    assert payloads(spool.read(10)) == [b"dddd"]
    spool.rewind()
    rest = spool.read(10)
    assert payloads(rest) == [b"ccc", b"dddd"]
    spool.ack(rest[-1].end)
    assert spool.empty and spool.pending_bytes == 0
    spool.rewind()
    assert spool.read(10) == []
    spool.close()


def test_segments_rotate_and_acknowledged_ones_are_deleted(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=False, segment_bytes=100)
    records = [bytes([i]) * 40 for i in range(10)]  # 48 bytes each on disk
    for record in records:
        spool.append(record)
    segments = segment_files(spool_dir)
    assert len(segments) >= 4, segments
    assert spool.pending_bytes == 10 * (HEADER.size + 40)

    read = spool.read(100)
    assert payloads(read) == records  # in order across segment boundaries

    spool.ack(read[5].end)
    remaining = segment_files(spool_dir)
    assert len(remaining) < len(segments)
    assert segments[0] not in remaining  # the first, fully acknowledged segment is gone
    assert spool.pending_bytes == 4 * (HEADER.size + 40)
    spool.rewind()
    assert payloads(spool.read(100)) == records[6:]

    spool.ack(read[-1].end)
    assert spool.empty
    assert len(segment_files(spool_dir)) <= 1  # only the segment still being written
    spool.close(remove_if_empty=True)
    assert not spool_dir.exists()


def test_reopen_keeps_unacknowledged_records(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=True, segment_bytes=64)
    records = [f"record-{i}".encode() * 3 for i in range(6)]
    for record in records:
        spool.append(record)
    read = spool.read(2)
    spool.ack(read[-1].end)
    spool.read(2)  # read but not acknowledged: must come back after a reopen
    spool.close()

    again = Spool(spool_dir, fsync=True, segment_bytes=64)
    assert again.recovery.records == 4
    assert again.recovery.cut_bytes == 0
    assert again.pending_bytes == sum(HEADER.size + len(r) for r in records[2:])
    assert payloads(again.read(100)) == records[2:]
    again.append(b"after-reopen")
    again.rewind()
    assert payloads(again.read(100)) == [*records[2:], b"after-reopen"]
    again.close()


def test_close_with_remove_if_empty_keeps_a_non_empty_spool(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=False)
    spool.append(b"x")
    spool.close(remove_if_empty=True)
    assert spool_dir.is_dir()
    assert payloads(Spool(spool_dir, fsync=False).read(10)) == [b"x"]


def test_torn_tail_is_cut_on_reopen(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=True)
    records = [b"first" * 10, b"second" * 10, b"third" * 10]
    for record in records:
        spool.append(record)
    spool.close()
    (segment,) = segment_files(spool_dir)
    size = segment.stat().st_size
    torn = 7  # a crash in the middle of writing the last record
    os.truncate(segment, size - torn)

    reopened = Spool(spool_dir, fsync=True)
    last_record_bytes = HEADER.size + len(records[-1])
    assert reopened.recovery.cut_bytes == last_record_bytes - torn
    assert reopened.recovery.records == 2
    assert segment.stat().st_size == size - last_record_bytes
    assert payloads(reopened.read(10)) == records[:2]

    reopened.append(b"fourth")  # appends continue cleanly after the cut
    reopened.rewind()
    assert payloads(reopened.read(10)) == [*records[:2], b"fourth"]
    reopened.close()
    assert payloads(Spool(spool_dir, fsync=False).read(10)) == [*records[:2], b"fourth"]


def test_corrupt_last_record_is_cut_on_reopen(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=True)
    records = [b"alpha" * 8, b"beta" * 8, b"gamma" * 8]
    for record in records:
        spool.append(record)
    spool.close()
    (segment,) = segment_files(spool_dir)
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the last record's payload: its CRC no longer matches
    segment.write_bytes(bytes(data))

    reopened = Spool(spool_dir, fsync=True)
    assert reopened.recovery.cut_bytes == HEADER.size + len(records[-1])
    assert reopened.recovery.records == 2
    assert payloads(reopened.read(10)) == records[:2]  # the garbage is never replayed
    reopened.close()


def test_torn_tail_after_acknowledged_records(spool_dir: Path) -> None:
    spool = Spool(spool_dir, fsync=True, segment_bytes=64)
    records = [bytes([65 + i]) * 30 for i in range(5)]
    for record in records:
        spool.append(record)
    spool.ack(spool.read(2)[-1].end)
    spool.close()
    last = segment_files(spool_dir)[-1]
    os.truncate(last, last.stat().st_size - 1)

    reopened = Spool(spool_dir, fsync=True, segment_bytes=64)
    assert reopened.recovery.cut_bytes == HEADER.size + 30 - 1
    assert payloads(reopened.read(10)) == records[2:4]
    reopened.close()


def test_second_spool_on_a_locked_directory_is_refused(spool_dir: Path) -> None:
    owner = Spool(spool_dir, fsync=False)
    owner.append(b"mine")
    with pytest.raises(SpoolLocked, match=str(spool_dir)):
        Spool(spool_dir, fsync=False)
    owner.close()
    adopter = Spool(spool_dir, fsync=False)  # the lock goes with its owner
    assert payloads(adopter.read(10)) == [b"mine"]
    adopter.close()
