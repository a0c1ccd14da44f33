"""The forwarder in process, against a real server: what it does with a batch the server refuses.

A batch read ahead is compressed while the one before it is at the server, and its records
then keep only their positions (their bytes were the largest thing in the sidecar's memory).
When the server refuses such a batch for good, the forwarder must read its records again from
the spool to find the bad chunk: the bad one goes to dead letters with the server's reason,
and every other chunk of the batch is still delivered, once.

Batches go as zstd once the server has said it takes it (gzip before, and for good after a
415 for zstd), each chunk still delivered once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from aiohttp import web
from support.server_process import ServerProcess

from pluto.wire import API_PREFIX, Chunk, encode_msgpack
from pluto_sidecar.compression import Encoding
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


# -- how batches are compressed ----------------------------------------------------------


class CodingProxy:
    """A reverse proxy in front of the real server that notes each ingest body's coding.

    It stands in for what cannot run here: an older server, which did not say which codings
    it takes (``advertise=False``: its answers lose ``Accept-Encoding``), a proxy before the
    server that refuses zstd bodies with 415 (``refuse_zstd``), and a server rolled back to
    such an older version after its first ingest answer (``rolled_back``: from then on its
    answers lose ``Accept-Encoding`` and it reads a zstd body as uncompressed, so as bad
    data, as that version did).
    """

    def __init__(self, target: str, *, advertise: bool = True, refuse_zstd: bool = False,
                 rolled_back: bool = False) -> None:
        self.target = target
        self.advertise = advertise
        self.refuse_zstd = refuse_zstd
        self.rolled_back = rolled_back
        self.codings: list[str] = []  # of the ingest bodies that reached the server
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{path:.*}", self._relay)
        # The body as sent, not decompressed: it goes on to the server as it came.
        self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._client = httpx.AsyncClient(base_url=self.target)
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._runner is not None and self._client is not None
        await self._client.aclose()
        await self._runner.cleanup()

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._client is not None
        coding = request.headers.get("content-encoding", "identity")
        if request.path.endswith("/ingest"):
            if self.refuse_zstd and coding == "zstd":
                self.refused += 1
                return web.json_response({"detail": "zstd is not allowed here"}, status=415)
            self.codings.append(coding)
        old = self.rolled_back and len(self.codings) > 1  # the first ingest was answered
        forwarded = {name.lower(): value for name, value in request.headers.items()
                     if name.lower() in ("content-type", "content-encoding", "accept")}
        if old and coding == "zstd":  # a coding the older version did not know: ignored
            del forwarded["content-encoding"]
        answer = await self._client.request(request.method, request.path_qs,
                                            content=await request.read(), headers=forwarded)
        headers = {"content-type": answer.headers["content-type"]}
        if self.advertise and not old:
            headers["accept-encoding"] = answer.headers["accept-encoding"]
        return web.Response(status=answer.status_code, body=answer.content, headers=headers)


def forward_through(server: ServerProcess, tmp_path: Path, proxy: CodingProxy, batches: int,
                    compression: Encoding = "zstd") -> Telemetry:
    """``batches`` batches of three chunks each of run "coded" through ``proxy`` to
    ``server``, and every chunk arrives once; the forwarder's telemetry."""
    httpx.post(f"{server.url}{API_PREFIX}/runs",
               json={"project": PROJECT, "run_id": "coded"}).raise_for_status()
    queue = DurableQueue(tmp_path / "queue", 1 << 30)
    seqs = range(3 * batches)
    for seq in seqs:
        queue.append(RecordKind.CHUNK, chunk(seq, "coded"))
    telemetry = Telemetry(process_metrics=False)

    async def scenario() -> None:
        url = await proxy.start()
        try:
            forwarder = Forwarder(
                queue, Upstream(url, None, compression=compression), RunRegistry(), telemetry,
                batch_max_bytes=3 * (len(chunk(0, "coded")) + 1), batch_max_age=0.0,
                dead_letter=tmp_path / "dead-letter.msgpack")
            await forward(queue, forwarder)
        finally:
            await proxy.stop()

    asyncio.run(scenario())
    answer = httpx.get(f"{server.url}{API_PREFIX}/runs/coded/metrics",
                       params={"project": PROJECT, "keys": ["loss"]})
    answer.raise_for_status()
    (series,) = answer.json()["series"]
    assert series["steps"] == [s for seq in seqs for s in (2 * seq, 2 * seq + 1)]
    assert not (tmp_path / "dead-letter.msgpack").exists()
    return telemetry


def test_batches_go_as_zstd_once_the_server_says_it_takes_it(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = server_factory()
    proxy = CodingProxy(server.url)
    forward_through(server, tmp_path, proxy, batches=6)
    # Nothing is known of the server before its first answer: gzip, which every version
    # takes (the batch read ahead meanwhile may be gzip too); zstd from then on.
    assert proxy.codings[0] == "gzip"
    first_zstd = proxy.codings.index("zstd")
    assert first_zstd <= 2
    assert set(proxy.codings[first_zstd:]) == {"zstd"}, proxy.codings


@pytest.mark.parametrize(("advertise", "compression"), [(False, "zstd"), (True, "gzip")],
                         ids=["server-that-does-not-say", "sidecar-told-gzip"])
def test_batches_stay_gzip_unless_the_server_says_it_takes_zstd_and_the_sidecar_may_use_it(
        server_factory: Callable[..., ServerProcess], tmp_path: Path, advertise: bool,
        compression: Encoding) -> None:
    server = server_factory()
    proxy = CodingProxy(server.url, advertise=advertise)
    telemetry = forward_through(server, tmp_path, proxy, batches=4, compression=compression)
    assert proxy.codings == ["gzip"] * 4
    assert telemetry.bytes_sent.labels(encoding="gzip")._value.get() > 0


def test_a_zstd_batch_refused_by_a_proxy_is_sent_again_as_gzip_and_nothing_is_buried(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = server_factory()
    proxy = CodingProxy(server.url, refuse_zstd=True)
    telemetry = forward_through(server, tmp_path, proxy, batches=6)
    assert proxy.refused == 1  # once: gzip for good after it
    assert set(proxy.codings) == {"gzip"}
    assert telemetry.retries._value.get() == 1
    assert telemetry.dead_letters._value.get() == 0


def test_a_zstd_batch_an_older_server_took_for_bad_data_is_sent_again_as_gzip(
        server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """The server said it takes zstd, then was rolled back to a version that did not (it
    reads a zstd body as uncompressed, and refuses it as not valid MessagePack, 422): the
    batch compressed in between goes again as gzip, and is not dead-lettered."""
    server = server_factory()
    proxy = CodingProxy(server.url, rolled_back=True)
    telemetry = forward_through(server, tmp_path, proxy, batches=6)
    first_zstd = proxy.codings.index("zstd")  # refused as bad data, 422
    assert proxy.codings[first_zstd + 1:] == ["gzip"] * (len(proxy.codings) - first_zstd - 1)
    assert telemetry.retries._value.get() == 1
    assert telemetry.dead_letters._value.get() == 0
