"""The sidecar's copy-free data path, piece by piece (the end-to-end promises are in
``test_sidecar.py`` and ``tests/chaos/``).

- ``FrameStream`` hands out exactly the bytes a client sent, however the kernel splits
  them, big payloads read straight into the caller's buffer; a stream that ends early
  is an ``IncompleteReadError``, as with asyncio's streams.
- ``SidecarSpool`` writes the same records as ``pluto.spool.Spool`` (a plain ``Spool``
  reads them back, across segment rotation) and its reads leave the read position alone.
- ``ReceiveBudget`` holds a frame back while others fill the budget, and never for
  longer than ``max_wait``.
- The zstd and gzip bodies streamed from record views are the batch ``ingest_body`` builds.
- ``SidecarSpool.spans_from`` locates the records ``read_from`` returns, and
  ``stream_payloads`` gives their bytes back a piece at a time, refusing a record whose
  bytes no longer match its checksum.
- ``FramePool`` reads the next big frame into a buffer given back, keeps the biggest within
  its limit and lets them all go once idle; ``DurableQueue.holds`` tells which record still
  waits in memory for room (its buffer must not be read into again).
- A volume that fills again and again while a backlog drains is one episode in the log: one
  "spool volume full", and one "room again" (with how often it filled again) once the volume
  has kept room for ``ROOM_QUIET_SECONDS``; every record is still written and fsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import random
import socket
import time
from pathlib import Path

import pytest
import zstandard

from pluto.spool import Spool, SpoolFull
from pluto.transport.http import ingest_body
from pluto_sidecar import queue as queue_module
from pluto_sidecar.buffers import MIN_POOLED_BYTES, FramePool
from pluto_sidecar.compression import Encoding, compress_body
from pluto_sidecar.main import tune_malloc
from pluto_sidecar.queue import STREAM_PIECE, DurableQueue, SidecarSpool, SpoolCorrupt
from pluto_sidecar.stream import SCRATCH_BYTES, FrameStream, ReceiveBudget
from pluto_sidecar.upstream import ingest_body_parts


async def _serve_stream(sizes: list[int], data: bytes, pieces: list[int]) -> list[bytes]:
    """Send ``data`` in ``pieces`` through a socket pair; read it back as ``sizes``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    async def handler(stream: FrameStream) -> None:
        try:
            for size in sizes:
                if size <= SCRATCH_BYTES and size % 2:
                    got.append(await stream.read_exactly(size))
                else:
                    buffer = bytearray(size)
                    await stream.read_into(memoryview(buffer))
                    got.append(bytes(buffer))
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
        finally:
            stream.close()

    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: FrameStream(handler), ours)

    def send() -> None:
        offset = 0
        for piece in pieces:
            if offset >= len(data):
                break
            theirs.sendall(data[offset:offset + piece])
            offset += piece
            if random.random() < 0.1:
                time.sleep(0.001)
        if offset < len(data):
            theirs.sendall(data[offset:])
        # The reader may have taken every frame and closed already: nothing left to say.
        with contextlib.suppress(OSError):
            theirs.shutdown(socket.SHUT_WR)

    sender = asyncio.get_running_loop().run_in_executor(None, send)
    try:
        await asyncio.wait_for(done, 30)
    finally:
        await sender
        theirs.close()
    return got


def test_a_frame_stream_returns_exactly_what_was_sent() -> None:
    rng = random.Random(7)
    sizes = [12, 1, 3 * SCRATCH_BYTES + 5, 12, 999, 12, 5 * 1024 * 1024, 7, SCRATCH_BYTES,
             12, 0, 2 * SCRATCH_BYTES]
    data = rng.randbytes(sum(sizes))
    pieces = [rng.choice([1, 11, 13, 4096, 70_000, 300_000]) for _ in range(200)]
    got = asyncio.run(_serve_stream(sizes, data, pieces))
    offset = 0
    for size, part in zip(sizes, got, strict=True):
        assert part == data[offset:offset + size]
        offset += size


def test_a_stream_that_ends_inside_a_payload_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(_serve_stream([12, 2 * SCRATCH_BYTES], os.urandom(12 + 1000), [5]))
    with pytest.raises(asyncio.IncompleteReadError) as caught:
        asyncio.run(_serve_stream([13], b"abc", [1]))
    assert caught.value.partial == b"abc"


def test_the_sidecar_spool_writes_records_a_plain_spool_reads(tmp_path: Path) -> None:
    directory = tmp_path / "queue"
    spool = SidecarSpool(directory)
    spool.segment_bytes = 100_000  # rotate a few times
    records = [b"C" + os.urandom(random.randint(0, 60_000)) for _ in range(20)]
    for record in records:
        spool.append_record(bytearray(record))
    spool.append(b"Uold-style append")
    spool.sync()
    assert len(list(directory.glob("*.seg"))) > 2
    first = spool.read_from(spool.acked, 3, 10**9)
    assert [r.payload for r in first] == records[:3]
    assert spool.read_from(spool.acked, 3, 10**9) == first  # the read position did not move
    spool.close()

    plain = Spool(directory, fsync=False)
    assert plain.recovery.cut_bytes == 0
    assert [r.payload for r in plain.read(100)] == [*records, b"Uold-style append"]
    plain.close()


def test_spans_locate_what_read_from_returns_and_stream_the_same_bytes(tmp_path: Path) -> None:
    spool = SidecarSpool(tmp_path / "queue")
    spool.segment_bytes = 1_000_000  # rotate a few times
    records = [b"C" + os.urandom(random.randint(1, 700_000)) for _ in range(12)]
    records.insert(5, b"Ua small update")
    for record in records:
        spool.append_record(bytearray(record))
    spool.sync()
    assert len(list((tmp_path / "queue").glob("*.seg"))) > 2
    for start_at, limit, max_bytes in [(0, 100, 10**9), (0, 3, 10**9), (2, 100, 900_000)]:
        start = spool.read_from(spool.acked, start_at, 10**9)[-1].end if start_at else spool.acked
        read = spool.read_from(start, limit, max_bytes)
        spans = spool.spans_from(start, limit, max_bytes)
        assert [span.end for span in spans] == [record.end for record in read]
        assert [span.kind for span in spans] == [record.payload[:1] for record in read]
        pieces: list[bytes] = []
        spool.stream_payloads(spans, lambda piece, out=pieces: out.append(bytes(piece)))
        assert b"".join(pieces) == b"".join(record.payload[1:] for record in read)
        assert max(len(piece) for piece in pieces) <= STREAM_PIECE
    spool.close()


def test_streaming_a_record_whose_bytes_changed_on_disk_is_refused(tmp_path: Path) -> None:
    spool = SidecarSpool(tmp_path / "queue")
    for _ in range(3):
        spool.append_record(bytearray(b"C" + os.urandom(50_000)))
    spool.sync()
    spans = spool.spans_from(spool.acked, 10, 10**9)
    (segment,) = (tmp_path / "queue").glob("*.seg")
    with open(segment, "r+b") as handle:  # one bit of the second record's payload flips
        handle.seek(spans[1].payload + 20_000)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))
    spool.stream_payloads(spans[:1], lambda piece: None)  # the first is intact
    with pytest.raises(SpoolCorrupt, match="does not match its checksum"):
        spool.stream_payloads(spans, lambda piece: None)
    spool.close()


def test_the_receive_budget_holds_frames_back_until_there_is_room() -> None:
    async def scenario() -> None:
        budget = ReceiveBudget(100, max_wait=5.0)
        assert await budget.take(60) == 60
        second = asyncio.create_task(budget.take(60))
        await asyncio.sleep(0.05)
        assert not second.done()  # 120 > 100: waits
        budget.give(60)
        assert await asyncio.wait_for(second, 1) == 60
        # Bigger than the whole budget: read alone, once the others are done.
        big = asyncio.create_task(budget.take(500))
        await asyncio.sleep(0.05)
        assert not big.done()
        budget.give(60)
        assert await asyncio.wait_for(big, 1) == 500
        budget.give(500)
        assert budget.used == 0

        # A holder that never gives back delays the others by max_wait at most.
        stuck = ReceiveBudget(100, max_wait=0.2)
        await stuck.take(100)
        started = time.monotonic()
        await stuck.take(10)
        assert 0.15 < time.monotonic() - started < 2

    asyncio.run(scenario())


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_the_streamed_body_is_the_ingest_body(encoding: Encoding) -> None:
    decompress = {"zstd": zstandard.ZstdDecompressor().decompress, "gzip": gzip.decompress}
    chunks = [os.urandom(n) for n in (0, 1, 5000, 300_000)] * 5  # 20 chunks: a 0xdc header
    records = [b"C" + chunk for chunk in chunks]
    views = [memoryview(record)[1:] for record in records]
    body = compress_body(ingest_body_parts(views), encoding)
    assert body.encoding == encoding
    assert decompress[encoding](body.data) == ingest_body(chunks)
    assert decompress[encoding](compress_body(ingest_body_parts([]), encoding).data) == (
        ingest_body([]))


def test_malloc_tuning_leaves_an_explicit_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert tune_malloc() is False


def test_the_frame_pool_reads_the_next_big_frame_into_a_buffer_given_back() -> None:
    pool = FramePool(max_bytes=8 * MIN_POOLED_BYTES)
    big = pool.take(MIN_POOLED_BYTES + 1)
    assert len(big) >= MIN_POOLED_BYTES + 1
    pool.give(big)
    assert pool.take(MIN_POOLED_BYTES + 10) is big  # about the same size: the same buffer
    pool.give(big)
    assert pool.take(len(big) + 1) is not big  # too small for this frame: a new one
    small = pool.take(100)
    assert len(small) == 100
    pool.give(small)
    assert pool.pooled_bytes == len(big)  # small buffers come from the heap, not the pool


def test_the_frame_pool_keeps_the_biggest_buffers_within_its_limit() -> None:
    pool = FramePool(max_bytes=3 * MIN_POOLED_BYTES)
    sizes = [MIN_POOLED_BYTES, 2 * MIN_POOLED_BYTES, MIN_POOLED_BYTES, 3 * MIN_POOLED_BYTES]
    buffers = [pool.take(size) for size in sizes]
    for buffer in buffers:
        pool.give(buffer)
    assert pool.pooled_bytes <= pool.max_bytes
    assert pool.take(3 * MIN_POOLED_BYTES) is buffers[3]  # the biggest was kept
    alone = FramePool(max_bytes=MIN_POOLED_BYTES)
    huge = alone.take(5 * MIN_POOLED_BYTES)
    alone.give(huge)  # bigger than the limit, but the only one: kept
    assert alone.take(5 * MIN_POOLED_BYTES) is huge
    alone.give(huge)
    bigger = alone.take(6 * MIN_POOLED_BYTES)  # the kept one is too small: let go first
    assert bigger is not huge and alone.pooled_bytes == 0


def test_the_frame_pool_lets_its_buffers_go_when_idle() -> None:
    async def scenario() -> tuple[int, int]:
        pool = FramePool(max_bytes=8 * MIN_POOLED_BYTES, idle_seconds=0.2)
        pool.give(pool.take(MIN_POOLED_BYTES))
        kept = pool.pooled_bytes
        await asyncio.sleep(0.6)
        return kept, pool.pooled_bytes

    kept, after_idle = asyncio.run(scenario())
    assert kept >= MIN_POOLED_BYTES
    assert after_idle == 0


def test_the_queue_says_which_record_waits_in_memory_for_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        queue = DurableQueue(tmp_path / "queue", 1 << 30)
        written = memoryview(bytearray(b"Cwritten"))
        queue.append_record(written)
        assert not queue.holds(written)

        def no_room(record: object) -> object:
            raise SpoolFull(28, "no space left on the spool volume")

        monkeypatch.setattr(queue.spool, "append_record", no_room)
        waiting = memoryview(bytearray(b"Cwaiting"))
        queue.append_record(waiting)
        assert queue.holds(waiting)
        assert not queue.holds(memoryview(bytearray(b"Cwaiting")))  # the very object only
        assert not queue.holds(written)
        queue.spool.close()

    asyncio.run(scenario())


def test_a_volume_that_fills_again_while_draining_is_one_episode_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(queue_module, "HELD_RETRY_SECONDS", 0.02)
    monkeypatch.setattr(queue_module, "ROOM_QUIET_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="pluto.sidecar.spool")

    def lines(event: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith(event)]

    async def until(condition: object, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        queue = DurableQueue(tmp_path / "queue", 1 << 30)
        room = True
        write = queue.spool.append_record

        def append_if_room(record: memoryview) -> object:
            if not room:
                raise SpoolFull(28, "no space left on the spool volume")
            return write(record)

        monkeypatch.setattr(queue.spool, "append_record", append_if_room)
        queue.start()
        tickets = []
        for cycle in range(4):  # full, then room: as each acknowledgement frees some space
            room = False
            tickets.append(queue.append_record(memoryview(bytearray(b"C%d" % cycle))))
            assert queue.volume_full
            room = True
            await until(lambda: not queue.volume_full)
        for ticket in tickets:
            await asyncio.wait_for(queue.durable(ticket), 5)
        assert len(lines("spool volume full")) == 1
        assert not lines("spool volume has room again"), "logged before the quiet period"
        await until(lambda: lines("spool volume has room again"))
        (roomy,) = lines("spool volume has room again")
        assert roomy.fields["filled_again"] == 3  # type: ignore[attr-defined]

        room = False  # a new episode after the quiet period is logged again
        held = queue.append_record(memoryview(bytearray(b"Clater")))
        room = True
        await asyncio.wait_for(queue.durable(held), 5)
        assert len(lines("spool volume full")) == 2
        await queue.stop()  # the open episode ends with the queue
        assert len(lines("spool volume has room again")) == 2
        reopened = Spool(tmp_path / "queue", fsync=False)
        assert [r.payload for r in reopened.read(100)] == [
            b"C0", b"C1", b"C2", b"C3", b"Clater"]
        reopened.close()

    asyncio.run(scenario())
