"""The SDK's durable spool (``pluto.spool.Spool``), on a real directory.

The spool is what makes "nothing ``log()`` accepted is lost or duplicated"
true across outages and crashes: records come back in order until they are
acknowledged, survive a close and reopen, a torn or corrupt tail is cut (never
replayed as garbage) while everything before it is kept, and only one process
owns a spool directory at a time.
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.volumes import fill, free_bytes, small_tmpfs

from pluto.spool import HEADER, Record, Spool, SpoolFull, SpoolLocked, is_no_space


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


def test_an_adopter_never_makes_a_spool_where_an_orphan_was_just_removed(
        spool_dir: Path) -> None:
    """Found in a directory listing, gone when opened (its owner emptied and removed it):
    an adopter that made a fresh spool there used to remove that under the same hidden
    name as the owner's removal in progress, which then failed ("could not mark run ...
    COMPLETED: No such file or directory: .../.gone-...")."""
    owner = Spool(spool_dir, fsync=False)
    owner.close(remove_if_empty=True)
    assert not spool_dir.exists()
    with pytest.raises(FileNotFoundError):
        Spool(spool_dir, fsync=False, create=False)
    assert list(spool_dir.parent.iterdir()) == []  # nothing made, not even hidden


# -- a full volume (a real small tmpfs) ---------------------------------------------------


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: writes there fail with ENOSPC as on a full disk."""
    with small_tmpfs(tmp_path / "volume", 512 * 1024) as path:
        yield path


def whole_records(directory: Path) -> list[bytes]:
    """Every record in the segment files, checking that each file is whole records end to
    end (no torn or partial record left by a failed write)."""
    found = []
    for segment in segment_files(directory):
        data = segment.read_bytes()
        offset = 0
        while offset < len(data):
            length, crc = HEADER.unpack_from(data, offset)
            end = offset + HEADER.size + length
            assert end <= len(data), f"{segment.name}: a torn record at {offset}"
            assert zlib.crc32(data[offset + HEADER.size:end]) == crc, \
                f"{segment.name}: a corrupt record at {offset}"
            found.append(data[offset + HEADER.size:end])
            offset = end
    return found


def test_full_volume_holds_records_in_memory_and_writes_them_when_room_returns(
        small_volume: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The volume fills (another file takes the space): ``append`` keeps accepting, holds
    what it cannot write in memory and warns once; the files hold whole records only; once
    the space is freed the held records are written, in order, and nothing is lost, torn or
    written twice, also across a reopen."""
    spool_dir = small_volume / "spool"
    spool = Spool(spool_dir, fsync=True)
    filler = fill(small_volume / "filler", leave=16 * 1024)
    records = [f"{i:05d}".encode() * 200 for i in range(40)]  # 1,000 bytes each: 40 KB
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ends = [spool.append(record) for record in records]
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1 and "cannot write to the spool" in said[0], said
    assert "free space on that volume" in said[0]
    written = ends.index(None)
    assert 0 < written < len(records) and all(end is None for end in ends[written:])
    assert spool.short_of_space
    assert spool.held_bytes == sum(len(r) for r in records[written:])
    assert whole_records(spool_dir) == records[:written]
    # Held records count as pending; read returns what is on disk (they cannot go yet).
    assert spool.pending_bytes == sum(HEADER.size + len(r) for r in records)
    assert payloads(spool.read(100)) == records[:written]

    filler.unlink()  # room again: the next append writes the held ones first, in order
    caplog.set_level(logging.WARNING, logger="pluto.spool")
    assert spool.append(b"after") is not None
    assert spool.held_bytes == 0
    assert any("has room again" in r.getMessage() for r in caplog.records)
    assert whole_records(spool_dir) == [*records, b"after"]
    assert payloads(spool.read(100)) == [*records[written:], b"after"]
    spool.close()

    again = Spool(spool_dir, fsync=True)
    assert again.recovery.cut_bytes == 0
    assert payloads(again.read(100)) == [*records, b"after"]
    again.close()


def test_a_spool_that_fills_its_volume_gives_the_space_back_once_delivered(
        small_volume: Path) -> None:
    """Nothing else on the volume: the spool itself fills it (with one segment, smaller than
    ``segment_bytes``). Once everything on disk is acknowledged it moves to a fresh segment,
    the old one goes with its space, and the held records are written."""
    spool_dir = small_volume / "spool"
    spool = Spool(spool_dir, fsync=False)
    records = [f"{i:06d}".encode() * 1000 for i in range(120)]  # 6,000 bytes each: 720 KB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ends = [spool.append(record) for record in records]
    written = ends.index(None)
    assert written < len(records) and spool.held_bytes > 0
    assert len(segment_files(spool_dir)) == 1
    free_when_full = free_bytes(small_volume)

    delivered: list[bytes] = []
    while len(delivered) < len(records):  # the server takes everything there is, in turn
        batch = spool.read(1000)
        assert batch, (len(delivered), spool.held_bytes)
        delivered += payloads(batch)
        spool.ack(batch[-1].end)
    assert delivered == records  # in order, each once
    assert spool.held_bytes == 0 and spool.empty
    assert not spool.short_of_space
    assert free_bytes(small_volume) > free_when_full
    assert whole_records(spool_dir) == records[-len(whole_records(spool_dir)):]
    spool.close()


def test_a_drained_spool_on_a_full_volume_gives_the_space_back_at_the_next_write(
        small_volume: Path) -> None:
    """The spool fills its volume with no write failing, and everything is acknowledged
    before the next record comes (so no ack follows the failure to give the space back):
    that record's write finds the volume full, moves to a fresh segment, deletes the
    delivered one and goes through: nothing held, nothing stuck."""
    spool_dir = small_volume / "spool"
    spool = Spool(spool_dir, fsync=False)
    record = b"r" * 4000
    while free_bytes(small_volume) > 2 * len(record):
        assert spool.append(record) is not None
    while batch := spool.read(1000):
        spool.ack(batch[-1].end)
    assert spool.empty and not spool.short_of_space
    full = free_bytes(small_volume)
    later = [f"{i:04d}".encode() * 1000 for i in range(20)]  # 80 KB: more than is free
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "cannot write to the spool": not said
        ends = [spool.append(record) for record in later]
    assert None not in ends and spool.held_bytes == 0
    assert free_bytes(small_volume) > full
    assert payloads(spool.read(1000)) == later
    assert whole_records(spool_dir) == later  # the delivered segment is gone
    spool.close()


def test_spool_full_is_raised_past_what_may_be_held(small_volume: Path) -> None:
    """Past ``held_max_bytes`` in memory, ``append`` raises ``SpoolFull`` (the record is
    neither written nor held: the caller still has it)."""
    spool = Spool(small_volume / "spool", fsync=False)
    spool.held_max_bytes = 20_000
    filler = fill(small_volume / "filler")
    record = b"r" * 6000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        held = 0
        with pytest.raises(SpoolFull) as raised:
            for _ in range(10):
                assert spool.append(record) is None
                held += 1
    assert held == 3 and spool.held_bytes == 3 * len(record)
    assert is_no_space(raised.value)
    assert spool.read(10) == []
    filler.unlink()
    spool.append(b"last")
    assert payloads(spool.read(10)) == [record] * 3 + [b"last"]
    spool.close()


def test_a_stray_file_with_other_digits_in_its_name_is_not_a_segment(spool_dir: Path) -> None:
    """"¹.seg" passes str.isdigit() but not int(): the spool must open past it."""
    Spool(spool_dir, fsync=False).close()
    (spool_dir / "\u00b9.seg").write_bytes(b"not a segment")
    spool = Spool(spool_dir, fsync=False)
    spool.append(b"kept")
    assert payloads(spool.read(10)) == [b"kept"]
    spool.close()
