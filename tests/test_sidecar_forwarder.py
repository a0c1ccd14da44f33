"""The forwarder in process, against a real server: what it does with a batch the server refuses.

A batch read ahead is compressed while the one before it is at the server, and its records
then keep only their positions (their bytes were the largest thing in the sidecar's memory).
When the server refuses such a batch for good, the forwarder must read its records again from
the spool to find the bad chunk: the bad one goes to dead letters with the server's reason,
and every other chunk of the batch is still delivered, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
from support.server_process import ServerProcess

from pluto.wire import API_PREFIX, Chunk, encode_msgpack
from pluto_sidecar.forwarder import Forwarder
from pluto_sidecar.queue import DurableQueue, RecordKind
from pluto_sidecar.registry import RunRegistry
from pluto_sidecar.telemetry import Telemetry
from pluto_sidecar.upstream import Upstream

PROJECT = "forwarding"


def chunk(seq: int, run_ref: str) -> bytes:
    return encode_msgpack(Chunk(run=0, project=PROJECT, run_ref=run_ref, session="writer-0",
                                seq=seq, writer=0, keys=["loss"], key_index=[0, 0],
                                steps=[2 * seq, 2 * seq + 1], values=[float(seq), 0.5],
                                times=[0.0, 0.0]))


async def forward(queue: DurableQueue, forwarder: Forwarder) -> None:
    """Step the forwarder until the spool is empty."""
    queue.start()
    try:
        for _ in range(50):
            if await forwarder.step():
                return
        raise AssertionError("the forwarder did not empty the spool")
    finally:
        await forwarder.upstream.close()
        await queue.stop()


def test_a_refused_batch_that_was_read_ahead_is_read_again_and_only_the_bad_chunk_is_buried(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = server_factory()
    httpx.post(f"{server.url}{API_PREFIX}/runs",
               json={"project": PROJECT, "run_id": "alive"}).raise_for_status()
    queue = DurableQueue(tmp_path / "queue", 1 << 30)
    # Three chunks fill a batch: the first batch is read as it is sent, the second ahead of
    # it (compressed, bytes dropped), with the bad chunk in its middle.
    seqs = [0, 1, 2, 3, 4, 5]
    batch_bytes = 3 * max(len(chunk(seq, "never-opened")) + 1 for seq in seqs)  # + kind byte
    for seq in seqs:
        queue.append(RecordKind.CHUNK, chunk(seq, "never-opened" if seq == 4 else "alive"))
    telemetry = Telemetry(process_metrics=False)
    forwarder = Forwarder(queue, Upstream(server.url, None), RunRegistry(), telemetry,
                          batch_max_bytes=batch_bytes, batch_max_age=0.0,
                          dead_letter=tmp_path / "dead-letter.msgpack")
    read_ahead: list[list[int]] = []
    prepare = forwarder._prepare

    async def spying_prepare():  # type: ignore[no-untyped-def]
        prepared = await prepare()
        read_ahead.append([len(record.payload) for record in prepared.records])
        return prepared

    forwarder._prepare = spying_prepare  # type: ignore[method-assign]
    asyncio.run(forward(queue, forwarder))

    # The batch with the bad chunk was read ahead, compressed, and its bytes dropped.
    assert read_ahead[0] == [0, 0, 0], read_ahead
    dead = msgspec.msgpack.decode((tmp_path / "dead-letter.msgpack").read_bytes())
    assert dead["status"] == 404 and "never-opened" in dead["detail"]
    refused = msgspec.msgpack.decode(msgspec.msgpack.encode(dead["record"]), type=Chunk)
    assert (refused.run_ref, refused.seq) == ("never-opened", 4)
    assert telemetry.dead_letters._value.get() == 1
    answer = httpx.get(f"{server.url}{API_PREFIX}/runs/alive/metrics",
                       params={"project": PROJECT, "keys": ["loss"]})
    answer.raise_for_status()
    (series,) = answer.json()["series"]
    assert series["steps"] == [s for seq in seqs if seq != 4 for s in (2 * seq, 2 * seq + 1)]
    assert queue.spool.empty
