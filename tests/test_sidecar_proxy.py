"""The sidecar's API socket: the server's HTTP API for training processes that hold no key.

Real processes throughout: ``pluto sidecar`` serving ``api.sock`` beside ``pluto.sock``, the
SDK's ``ApiClient(..., uds=...)`` on the client side, and upstream either a real
``pluto server --auth`` or, where the test needs routes the server does not have (a 300 MB
upload that is only counted, an answer cut off half-way), a small aiohttp server in its own
process on a loopback port that reports what reached it.

What a pod relies on, and what these tests pin:

- a training process without any key reaches a server that requires one; whatever
  credentials it sends are replaced by the sidecar's, and with no key configured none go;
- method, path, query, status and end-to-end headers pass through, hop-by-hop ones do not;
- bodies stream both ways: 300 MB up and down arrive byte for byte while the sidecar's RSS
  stays within a few MB of where it was;
- an answer the server breaks off is not passed off as whole; an unreachable server is a 502
  whose detail says which URL; a path outside ``/api/v1/`` is a 404 the server never sees;
- the socket is mode 0660, a stale file is replaced, a live socket never stolen, and
  ``/readyz`` fails when it is gone; SIGTERM lets an upload in flight finish;
- the key appears in no log line and no answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.postgres import free_port
from support.processes import die_with_parent, tail, terminate
from support.server_process import ServerProcess, clean_env, create_api_key
from support.sidecar_process import SidecarProcess, SidecarStartError

from pluto.errors import RequestRejected
from pluto.transport.http import ApiClient

SidecarFactory = Callable[..., SidecarProcess]

KEY = "pluto_sidecarkey_" + "s" * 43
MiB = 1024 * 1024
BIG = 300 * MiB
#: How much the sidecar's RSS may grow while 300 MB go through it (it would be ~300 MB if
#: a body were held whole; streaming stays within a few MB).
RSS_GROWTH_LIMIT = 24 * MiB

# -- the stand-in upstream -------------------------------------------------------------------

#: A tiny upstream for what the tracking server has no route for. It runs in its own process
#: so that nothing it holds counts toward the sidecar's memory or the test's.
UPSTREAM = r'''
import asyncio, hashlib, json, sys
from aiohttp import web

BLOCK = 1024 * 1024

def block(i):
    return i.to_bytes(8, "little") * (BLOCK // 8)

async def echo(request):
    body = await request.read()
    status = int(request.query.get("status", "200"))
    reply = web.json_response({
        "method": request.method, "raw_path_qs": request.rel_url.raw_path_qs,
        "headers": [[k.lower(), v] for k, v in request.headers.items()],
        "body": body.decode("latin-1"),
    }, status=status)
    reply.headers["x-upstream"] = "yes"
    reply.headers.add("set-cookie", "a=1")
    reply.headers.add("set-cookie", "b=2")
    return reply

UPLOADS = []  # what each /count request saw, cut-off ones included

async def count(request):
    digest, n = hashlib.sha256(), 0
    try:
        async for piece in request.content.iter_any():
            digest.update(piece)
            n += len(piece)
    except BaseException:
        UPLOADS.append({"bytes": n, "complete": False})
        raise
    UPLOADS.append({"bytes": n, "complete": True})
    return web.json_response({"bytes": n, "sha256": digest.hexdigest(),
                              "content_length": request.headers.get("content-length"),
                              "chunked": "chunked" in request.headers.get("transfer-encoding", "")})

async def blob(request):
    size = int(request.query["size"])
    reply = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    reply.content_length = size
    await reply.prepare(request)
    sent, i = 0, 0
    while sent < size:
        piece = block(i)[: size - sent]
        await reply.write(piece)
        sent += len(piece)
        i += 1
    await reply.write_eof()
    return reply

async def broken(request):
    reply = web.StreamResponse()
    reply.content_length = 10 * BLOCK
    await reply.prepare(request)
    await reply.write(block(0))
    await asyncio.sleep(0.2)
    request.transport.abort()
    return reply

SLOW = []  # how each /slow request ended: "cut" (its connection closed) or "answered"

async def slow(request):
    for _ in range(600):  # 30 s
        await asyncio.sleep(0.05)
        if request.transport is None or request.transport.is_closing():
            SLOW.append("cut")
            return web.Response()
    SLOW.append("answered")
    return web.json_response({})

app = web.Application(handler_args={"max_line_size": 65536, "max_field_size": 65536})
app.router.add_route("*", "/api/v1/echo{tail:.*}", echo)
app.router.add_route("*", "/api/v1/count", count)
app.router.add_get("/api/v1/blob", blob)
app.router.add_get("/api/v1/broken", broken)
app.router.add_get("/api/v1/uploads", lambda request: web.json_response(UPLOADS))
app.router.add_get("/api/v1/slow", slow)
app.router.add_get("/api/v1/slow-ended", lambda request: web.json_response(SLOW))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
'''


def block(i: int) -> bytes:
    """The stand-in's ``block(i)``: 1 MiB, different for every index."""
    return i.to_bytes(8, "little") * (MiB // 8)


def blocks(size: int) -> Iterator[bytes]:
    sent, i = 0, 0
    while sent < size:
        piece = block(i)[: size - sent]
        yield piece
        sent += len(piece)
        i += 1


def sha256_of(size: int) -> str:
    digest = hashlib.sha256()
    for piece in blocks(size):
        digest.update(piece)
    return digest.hexdigest()


class Upstream:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.script = directory / "upstream.py"
        self.log = directory / "upstream.log"
        self.script.write_text(UPSTREAM)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Upstream:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                         preexec_fn=die_with_parent())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, tail(self.log)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.05)
        raise AssertionError("the stand-in upstream did not start:\n" + tail(self.log))

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("upstream")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[SidecarProcess]:
    """One sidecar with a key in front of the stand-in, shared by the pass-through tests."""
    proc = SidecarProcess(tmp_path_factory.mktemp("proxy-sidecar"), upstream.url,
                          env={"PLUTO_API_KEY": KEY}, extra_args=["--sys-interval", "0"])
    with proc:
        yield proc
    assert KEY not in proc.logs(), "the API key appeared in the sidecar's log"


def api_socket(sidecar: SidecarProcess) -> Path:
    return sidecar.directory / "api.sock"


@pytest.fixture
def client(sidecar: SidecarProcess) -> Iterator[ApiClient]:
    """What the SDK in a training container uses: no key, the sidecar's API socket."""
    api = ApiClient("http://unused.invalid", None, timeout=60, uds=str(api_socket(sidecar)))
    yield api
    api.close()


def echoed(response: httpx.Response) -> tuple[dict[str, list[str]], dict[str, Any]]:
    assert response.headers.get("x-upstream") == "yes", response.text
    body = response.json()
    headers: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        headers.setdefault(name, []).append(value)
    return headers, body


def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(sidecar.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


class RssWatch:
    """Samples a process's RSS every 10 ms on a thread; ``peak - baseline`` is the growth."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.01)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def raw_request(path: Path, request_line: str) -> tuple[int, bytes]:
    """Send one request line as is (httpx would normalise ``..`` away); status and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(f"{request_line}\r\nHost: pluto-sidecar\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- credentials -----------------------------------------------------------------------------


def test_a_process_without_a_key_reaches_a_server_that_requires_one(
        tmp_path: Path, sidecar_factory: SidecarFactory) -> None:
    with ServerProcess(tmp_path / "pluto-data", extra_args=["--auth"]) as server:
        key = create_api_key(server.data_dir, "sidecar")
        assert httpx.get(server.url + "/api/v1/projects").status_code == 401  # auth is on
        side = sidecar_factory(server.url, env={"PLUTO_API_KEY": key})
        keyless = ApiClient(server.url, None, uds=str(api_socket(side)))
        impostor = ApiClient(server.url, "pluto_000000000000_" + "x" * 43,
                             uds=str(api_socket(side)))
        try:
            created = keyless.http.post("/runs", json={"project": "proxied", "run_id": "job-1"})
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            fetched = keyless.http.get(f"/runs/{run_id}")
            assert fetched.status_code == 200, fetched.text
            assert fetched.json()["run_id"] == "job-1"
            assert fetched.headers["content-type"].startswith("application/json")
            # A gzipped answer (the server compresses big ones) comes through as it was sent
            # and reads back whole.
            lines = [f"step {i}: loss {1 / (i + 1)}" for i in range(500)]
            ingested = keyless.http.post("/ingest", json={"chunks": [{
                "run": run_id, "session": "s", "seq": 0, "writer": 0,
                "logs": [[0.0, 1, line] for line in lines]}]})
            assert ingested.status_code == 200, ingested.text
            page = keyless.http.get(f"/runs/{run_id}/logs", params={"limit": 500},
                                    headers={"accept-encoding": "gzip"})
            assert page.status_code == 200, page.text
            assert page.headers["content-encoding"] == "gzip"
            assert page.num_bytes_downloaded < len(page.content) / 2
            assert [entry["line"] for entry in page.json()["lines"]] == lines
            # A bogus key from the client does not matter: the sidecar's replaces it.
            listed = impostor.http.get("/projects")
            assert listed.status_code == 200, listed.text
            assert "proxied" in json.dumps(listed.json())
            # A server error answer comes back as the server wrote it.
            with pytest.raises(RequestRejected) as missing:
                keyless.call("GET", "/runs/999999", dict)
            assert missing.value.status_code == 404
        finally:
            keyless.close()
            impostor.close()
        side.stop()
        assert key not in side.logs() and key not in server.logs()


def test_a_refused_key_is_read_again_from_its_file_for_the_next_request(
        tmp_path: Path, sidecar_factory: SidecarFactory) -> None:
    """A Secret mounted as a file changes under the sidecar when the key is rotated: the
    request that met the old key gets the server's 401, the next one carries the new key."""
    with ServerProcess(tmp_path / "pluto-data", extra_args=["--auth"]) as server:
        key = create_api_key(server.data_dir, "sidecar")
        key_file = tmp_path / "api-key"
        key_file.write_text("pluto_000000000000_" + "x" * 43 + "\n")
        side = sidecar_factory(server.url, extra_args=["--api-key-file", str(key_file)])
        with ApiClient(server.url, None, uds=str(api_socket(side))) as keyless:
            assert keyless.http.get("/projects").status_code == 401
            key_file.write_text(key + "\n")
            assert keyless.http.get("/projects").status_code == 200
        assert key not in side.logs()


def test_the_client_credentials_never_reach_the_server(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    response = client.http.get("/echo", headers={"authorization": "Bearer mine",
                                                 "x-api-key": "mine-too"})
    headers, _ = echoed(response)
    assert headers["authorization"] == [f"Bearer {KEY}"]
    assert "x-api-key" not in headers
    assert KEY not in response.headers.get("x-upstream", "")


def test_with_no_key_configured_no_credentials_are_forwarded(
        upstream: Upstream, sidecar_factory: SidecarFactory) -> None:
    side = sidecar_factory(upstream.url, extra_args=["--sys-interval", "0"])
    with ApiClient(upstream.url, "client-key", uds=str(api_socket(side))) as keyed:
        headers, _ = echoed(keyed.http.get("/echo", headers={"x-api-key": "client-key"}))
    assert "authorization" not in headers and "x-api-key" not in headers


# -- what passes through ---------------------------------------------------------------------


def test_method_path_query_status_and_end_to_end_headers_pass_through(
        client: ApiClient, upstream: Upstream) -> None:
    response = client.http.request(
        "PATCH", "/echo/runs/a%2Fb?status=201&q=x%20y&q=2",
        content=b'{"x": 1}',
        headers={"content-type": "application/json", "accept": "application/msgpack",
                 "x-content-sha256": "ab" * 32, "x-custom": "kept",
                 "connection": "keep-alive, x-hop", "x-hop": "per-connection",
                 "te": "trailers", "upgrade": "h2c", "keep-alive": "timeout=5"})
    assert response.status_code == 201
    headers, body = echoed(response)
    assert body["method"] == "PATCH"
    assert body["raw_path_qs"] == "/api/v1/echo/runs/a%2Fb?status=201&q=x%20y&q=2"
    assert body["body"] == '{"x": 1}'
    assert headers["content-type"] == ["application/json"]
    assert headers["content-length"] == ["8"]
    assert headers["accept"] == ["application/msgpack"]
    assert headers["x-content-sha256"] == ["ab" * 32]
    assert headers["x-custom"] == ["kept"]
    assert headers["host"] == [f"127.0.0.1:{upstream.port}"]
    for hop in ("x-hop", "te", "upgrade", "keep-alive", "transfer-encoding"):
        assert hop not in headers, hop
    assert headers.get("connection", ["keep-alive"]) == ["keep-alive"]  # httpx's own
    # Answer headers, repeated ones included, come back.
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["content-length"]) == len(response.content)


def test_a_long_query_string_is_not_cut_by_the_proxy(client: ApiClient) -> None:
    keys = ",".join(f"train/metric_{i}" for i in range(2000))  # ~30 KB, as a query may carry
    response = client.http.get("/echo", params={"keys": keys})
    assert response.status_code == 200, response.text
    _, body = echoed(response)
    assert body["raw_path_qs"].endswith(str(httpx.QueryParams({"keys": keys})))


def test_a_large_upload_streams_through_with_bounded_memory(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    bytes_before = metric(sidecar, "pluto_sidecar_api_request_bytes_total")
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for piece in blocks(BIG):
            digest.update(piece)
            yield piece

    assert sidecar.pid is not None
    started = time.monotonic()
    with RssWatch(sidecar.pid) as rss:
        response = client.http.put("/count", content=body(),
                                   headers={"content-length": str(BIG),
                                            "content-type": "application/octet-stream"})
    seconds = time.monotonic() - started
    assert response.status_code == 200, response.text
    arrived = response.json()
    assert arrived == {"bytes": BIG, "sha256": digest.hexdigest(),
                       "content_length": str(BIG), "chunked": False}
    print(f"\nupload {BIG / MiB:.0f} MiB in {seconds:.1f}s; sidecar RSS "
          f"{rss.baseline / MiB:.1f} -> peak {rss.peak / MiB:.1f} MiB "
          f"(+{rss.growth / MiB:.1f})")
    assert rss.growth < RSS_GROWTH_LIMIT, f"the sidecar's RSS grew {rss.growth / MiB:.1f} MiB"
    assert metric(sidecar, "pluto_sidecar_api_request_bytes_total") - bytes_before >= BIG


def test_a_large_download_streams_back_with_bounded_memory(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    bytes_before = metric(sidecar, "pluto_sidecar_api_response_bytes_total")
    digest, received = hashlib.sha256(), 0
    assert sidecar.pid is not None
    started = time.monotonic()
    with RssWatch(sidecar.pid) as rss, \
            client.http.stream("GET", "/blob", params={"size": BIG}) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(BIG)
        for piece in response.iter_raw():
            digest.update(piece)
            received += len(piece)
    seconds = time.monotonic() - started
    assert received == BIG
    assert digest.hexdigest() == sha256_of(BIG)
    print(f"\ndownload {BIG / MiB:.0f} MiB in {seconds:.1f}s; sidecar RSS "
          f"{rss.baseline / MiB:.1f} -> peak {rss.peak / MiB:.1f} MiB "
          f"(+{rss.growth / MiB:.1f})")
    assert rss.growth < RSS_GROWTH_LIMIT, f"the sidecar's RSS grew {rss.growth / MiB:.1f} MiB"
    assert metric(sidecar, "pluto_sidecar_api_response_bytes_total") - bytes_before >= BIG


def test_a_chunked_upload_arrives_whole(client: ApiClient) -> None:
    size = 20 * MiB + 12345
    response = client.http.post("/count", content=blocks(size))  # no length: chunked
    assert response.status_code == 200, response.text
    arrived = response.json()
    assert (arrived["bytes"], arrived["sha256"]) == (size, sha256_of(size))
    assert arrived["content_length"] is None


def test_a_length_beside_chunked_framing_is_dropped_not_forwarded(
        sidecar: SidecarProcess) -> None:
    """RFC 9112 6.3: with transfer-encoding a proxy ignores and drops content-length. It was
    forwarded beside the chunked body the proxy sends on: the server's connection was reset
    and the client got a 500 (found by a security review; nothing was smuggled)."""
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(api_socket(sidecar)))
        sock.sendall(b"POST /api/v1/count HTTP/1.1\r\nHost: pluto-sidecar\r\n"
                     b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", data
    arrived = json.loads(answer)
    assert (arrived["bytes"], arrived["content_length"]) == (11, None), arrived


def test_an_answer_the_server_breaks_off_is_not_passed_off_as_whole(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    before = metric(sidecar, "pluto_sidecar_api_requests_total", status="broken")
    started = time.monotonic()
    # The declared length is not reached: the client knows at once (the connection is cut),
    # rather than reading a short body as whole or waiting out its timeout.
    with pytest.raises(httpx.RemoteProtocolError, match=r"incomplete|closed|peer"):
        client.http.get("/broken").read()
    assert time.monotonic() - started < 10
    assert metric(sidecar, "pluto_sidecar_api_requests_total", status="broken") == before + 1
    assert client.http.get("/echo").status_code == 200  # and the socket serves on


def test_a_client_that_gives_up_mid_upload_cuts_the_upload_to_the_server(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    before = metric(sidecar, "pluto_sidecar_api_requests_total", status="broken")
    uploads = len(client.http.get("/uploads").json())

    def gives_up() -> Iterator[bytes]:
        for i, piece in enumerate(blocks(100 * MiB)):
            if i == 5:
                raise RuntimeError("the training process was killed")
            yield piece

    with pytest.raises(RuntimeError):
        client.http.put("/count", content=gives_up(),
                        headers={"content-length": str(100 * MiB)})
    deadline = time.monotonic() + 10
    while len(seen := client.http.get("/uploads").json()) == uploads:
        assert time.monotonic() < deadline, "the server never saw the upload end"
        time.sleep(0.05)
    assert seen[-1]["complete"] is False and seen[-1]["bytes"] <= 5 * MiB
    assert metric(sidecar, "pluto_sidecar_api_requests_total", status="broken") == before + 1
    assert metric(sidecar, "pluto_sidecar_api_in_flight") == 0


def test_a_client_that_gives_up_waiting_for_the_answer_cuts_the_request_to_the_server(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    """The whole request was forwarded and the server is still working on it when the
    client times out: the proxy closes its request too rather than wait for an answer that
    nobody will read."""
    before = metric(sidecar, "pluto_sidecar_api_requests_total", status="broken")
    with pytest.raises(httpx.ReadTimeout):
        client.http.get("/slow", timeout=0.5)
    deadline = time.monotonic() + 10
    while not (ended := client.http.get("/slow-ended").json()):
        assert time.monotonic() < deadline, "the server's request was never cut"
        time.sleep(0.05)
    assert ended == ["cut"]
    assert metric(sidecar, "pluto_sidecar_api_requests_total", status="broken") == before + 1
    assert metric(sidecar, "pluto_sidecar_api_in_flight") == 0


def test_a_request_that_is_not_http_gets_a_400_and_a_line_in_the_sidecars_own_log(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    """uvicorn's own complaints come out as the sidecar's JSON lines (one format for whoever
    reads its log), and the socket serves on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(api_socket(sidecar)))
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    deadline = time.monotonic() + 10
    while not [e for e in sidecar.events() if "Invalid HTTP request" in str(e.get("event"))]:
        assert time.monotonic() < deadline, sidecar.logs()[-2000:]
        time.sleep(0.05)
    assert not [line for line in sidecar.logs().splitlines()
                if "Invalid HTTP request" in line and not line.startswith("{")]
    assert client.http.get("/echo").status_code == 200


def test_requests_are_counted_in_the_sidecar_metrics(
        client: ApiClient, sidecar: SidecarProcess) -> None:
    ok = metric(sidecar, "pluto_sidecar_api_requests_total", status="2xx")
    client_errors = metric(sidecar, "pluto_sidecar_api_requests_total", status="4xx")
    assert client.http.get("/echo").status_code == 200
    assert client.http.get("/echo", params={"status": "409"}).status_code == 409
    assert metric(sidecar, "pluto_sidecar_api_requests_total", status="2xx") == ok + 1
    assert metric(sidecar, "pluto_sidecar_api_requests_total", status="4xx") == client_errors + 1
    assert metric(sidecar, "pluto_sidecar_api_in_flight") == 0


# -- what does not pass ----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/metrics", "/api/v2/runs", "/api/v1", "/api/v1/../metrics",
                                    "/api/v1/%2e%2e/metrics", "/api/v1/echo/../../x"])
def test_a_path_outside_the_api_is_a_404_the_server_never_sees(
        sidecar: SidecarProcess, target: str) -> None:
    status, body = raw_request(api_socket(sidecar), f"GET {target} HTTP/1.1")
    assert status == 404
    detail = json.loads(body)["detail"]
    assert "/api/v1/" in detail and "sidecar" in detail  # the sidecar's answer, not upstream's


def test_an_unreachable_server_is_a_502_that_names_it(
        tmp_path: Path, sidecar_factory: SidecarFactory) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    side = sidecar_factory(nowhere, env={"PLUTO_API_KEY": KEY},
                           extra_args=["--sys-interval", "0"])
    with ApiClient(nowhere, None, uds=str(api_socket(side))) as api, \
            pytest.raises(RequestRejected) as rejected:
        api.call("GET", "/projects", dict)
    assert rejected.value.status_code == 502
    message = str(rejected.value)
    assert f"the pluto sidecar cannot reach the server at {nowhere}" in message
    assert "ConnectError" in message
    assert KEY not in message
    side.stop()
    assert KEY not in side.logs()


# -- the socket ------------------------------------------------------------------------------


def test_the_api_socket_is_group_only(sidecar: SidecarProcess) -> None:
    mode = api_socket(sidecar).stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_a_stale_socket_file_is_replaced(upstream: Upstream, tmp_path: Path,
                                         sidecar_factory: SidecarFactory) -> None:
    directory = tmp_path / "sidecar-0"  # where sidecar_factory puts its first sidecar
    directory.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "api.sock"))  # bound, never listening: what a crash leaves
    stale.close()
    side = sidecar_factory(upstream.url, extra_args=["--sys-interval", "0"])
    assert side.directory == directory
    with ApiClient(upstream.url, None, uds=str(api_socket(side))) as api:
        assert api.http.get("/echo").status_code == 200
    assert any(e.get("event") == "replaced a stale socket file"
               and str(e.get("socket", "")).endswith("api.sock") for e in side.events())


def test_a_live_api_socket_is_never_stolen(upstream: Upstream, tmp_path: Path) -> None:
    directory = tmp_path / "other"
    directory.mkdir()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(directory / "api.sock"))
    live.listen()
    try:
        side = SidecarProcess(directory, upstream.url)
        with pytest.raises(SidecarStartError, match=r"another sidecar is listening on .*api\.sock"):
            side.start(timeout=20)
        assert side.proc is not None and side.proc.wait(10) == 1
        assert (directory / "api.sock").is_socket()
        assert not side.socket.exists(), "the main socket was taken although it must not start"
    finally:
        live.close()


def test_readyz_fails_while_the_api_socket_is_gone(sidecar_factory: SidecarFactory,
                                                   upstream: Upstream) -> None:
    side = sidecar_factory(upstream.url, extra_args=["--sys-interval", "0"])
    assert httpx.get(side.health_url + "/readyz").status_code == 200
    api_socket(side).unlink()  # nobody can connect any more
    ready = httpx.get(side.health_url + "/readyz")
    assert ready.status_code == 503
    assert "API socket" in ready.text and "api.sock" in ready.text


def test_the_flag_and_the_environment_choose_the_path_and_empty_turns_it_off(
        upstream: Upstream, tmp_path: Path, sidecar_factory: SidecarFactory) -> None:
    elsewhere = tmp_path / "elsewhere" / "proxy.sock"
    flagged = sidecar_factory(upstream.url, extra_args=["--api-socket", str(elsewhere)])
    assert elsewhere.is_socket() and not api_socket(flagged).exists()
    with ApiClient(upstream.url, None, uds=str(elsewhere)) as api:
        assert api.http.get("/echo").status_code == 200

    from_env = tmp_path / "env.sock"
    env_side = sidecar_factory(upstream.url, env={"PLUTO_SIDECAR_API_SOCKET": str(from_env)})
    assert from_env.is_socket() and not api_socket(env_side).exists()

    off = sidecar_factory(upstream.url, extra_args=["--api-socket", ""])
    assert off.socket.is_socket() and not api_socket(off).exists()
    assert httpx.get(off.health_url + "/readyz").status_code == 200


def test_sigterm_lets_an_upload_in_flight_finish(
        upstream: Upstream, sidecar_factory: SidecarFactory) -> None:
    side = sidecar_factory(upstream.url, extra_args=["--drain-seconds", "20",
                                                     "--sys-interval", "0"])
    size = 40 * MiB
    signalled = threading.Event()

    def slow_body() -> Iterator[bytes]:
        for i, piece in enumerate(blocks(size)):
            if i == 10:
                assert side.proc is not None
                side.proc.send_signal(signal.SIGTERM)  # mid-upload
                signalled.set()
            if i >= 10:
                time.sleep(0.05)  # the rest takes ~1.5 s after the signal
            yield piece

    with ApiClient(upstream.url, None, timeout=30, uds=str(api_socket(side))) as api:
        response = api.http.put("/count", content=slow_body(),
                                headers={"content-length": str(size)})
    assert signalled.is_set()
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == size
    assert response.json()["sha256"] == sha256_of(size)
    assert side.proc is not None and side.proc.wait(20) == 0
    assert not api_socket(side).exists()


# -- the key stays in the sidecar ------------------------------------------------------------


def test_the_key_is_not_on_any_command_line_or_in_the_clients_environment(
        sidecar: SidecarProcess) -> None:
    assert sidecar.pid is not None
    assert all(KEY not in arg for arg in psutil.Process(sidecar.pid).cmdline())
    assert "PLUTO_API_KEY" not in sidecar.client_env()
    assert os.environ.get("PLUTO_API_KEY") != KEY
