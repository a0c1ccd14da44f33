"""The API socket: an HTTP proxy of the tracking server's API for the pod's training processes.

Training containers hold no credentials (the API key is the sidecar's alone), yet the SDK needs
the server's HTTP API for more than metrics: uploading and downloading files and checkpoints,
listing them, queries. So the sidecar serves a second Unix socket (``api.sock`` beside
``pluto.sock``) on which every request under ``/api/v1/`` is forwarded to the server with the
sidecar's key, and the answer is streamed back. The SDK reaches it with
``ApiClient(..., uds=PATH)`` (``pluto.transport.http``).

What a request becomes on its way through:

- method, path, query string (exactly as sent, percent-encoding kept), and the end-to-end
  headers (``content-type``, ``content-length``, ``accept``, ``x-content-sha256``, ...) go to the
  server; hop-by-hop headers (``connection`` and what it names, ``transfer-encoding``, ``te``,
  ``upgrade``, ``keep-alive``, ``proxy-*``) and ``expect`` do not;
- credentials are the sidecar's, never the client's: ``authorization`` and ``x-api-key`` from
  the client are dropped and ``Authorization: Bearer KEY`` is set when the sidecar has a key;
- status, reason and end-to-end headers of the answer come back; the body is passed through
  as the server encoded it (a gzipped answer stays gzipped, its ``content-length`` right);
- paths outside ``/api/v1/`` are answered 404, an unreachable server 502 and a server that does
  not answer in time 504, each with a JSON ``{"detail": ...}`` that the SDK shows as the error.

Bodies are streamed in both directions and never held whole: uvicorn stops reading the client
once 64 KiB wait unforwarded, httpx writes each piece to the server as it arrives, and the
answer is written to the client a network read at a time with the writer's back-pressure.
A 300 MB upload through the proxy grows its RSS by a few MB at most
(tests/test_sidecar_proxy.py measures it).

The HTTP server is uvicorn's, over h11, serving a plain ASGI callable: the tracking server's
own stack, and about 8 MB less resident memory than aiohttp's, which the sidecar used before
(docs/benchmarks.md: the sidecar's RSS target is 60 MB). It runs in the sidecar's asyncio loop
through ``Server.startup`` / ``Server.shutdown``, never ``serve()``, which would install signal
handlers: ``pluto_sidecar.main`` owns SIGTERM. The client is an ``httpx.AsyncClient`` like
:class:`~pluto_sidecar.upstream.Upstream`'s. A client that goes away cancels its request to the
server, whether it leaves mid-upload or while the answer is on its way.

The key never appears in a log line or an answer: errors name the server URL (scrubbed of
any inline password) and the exception, never a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pluto.credentials import ApiKey
from pluto.wire import API_PREFIX
from pluto_sidecar.logs import log_event, scrub
from pluto_sidecar.telemetry import Telemetry

__all__ = ["HOP_BY_HOP", "ApiProxy"]

log = logging.getLogger("pluto.sidecar.proxy")

#: Headers that concern one connection, not the request (RFC 9110 7.6.1), never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
#: Also dropped from requests: the client's credentials (the sidecar's replace them), the
#: host (the server's own is set), and ``expect`` (uvicorn answered the 100-continue itself).
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "x-api-key", "expect"}
#: A request to the server waits this long to connect ...
CONNECT_TIMEOUT = 10.0
#: ... and this long for each read or write (a big upload is finished, verified and stored
#: before the server answers, so this is generous; the client's own timeout still applies).
IO_TIMEOUT = 300.0
#: Idle keep-alive connections and requests still running when the sidecar stops are cut
#: after this long, in seconds (the drain deadline has passed by then).
_CLOSE_GRACE = 1
#: Request line and headers up to 64 KiB (h11's default is 16 KiB): the proxy should not be
#: a narrower pipe than the server for a long query string.
_MAX_HEAD = 64 * 1024
#: The SDK keeps connections to the socket open between requests; nothing is gained by
#: closing them sooner (uvicorn's default is 5 s).
_KEEP_ALIVE = 60


class _AnswerBrokenOff(Exception):
    """Raised out of the ASGI callable so that uvicorn cuts the client's connection."""


class _ClientGone(Exception):
    """The client closed its connection before the whole answer was on its way."""


class ApiProxy:
    """Serves ``path`` and forwards what arrives to ``server_url``; see the module docstring.

    ``start()`` binds the socket (mode 0660) and refuses a path that exists: the caller decides
    whether an existing file is a stale socket to replace (:meth:`Sidecar.start
    <pluto_sidecar.sidecar.Sidecar.start>` does, as for its main socket). ``stop()`` stops
    accepting, lets requests in flight finish until the deadline, then closes.
    """

    def __init__(self, path: Path, server_url: str, api_key: ApiKey | None,
                 telemetry: Telemetry | None = None, *, connect_timeout: float = CONNECT_TIMEOUT,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.path = path
        self.url = server_url.rstrip("/")
        self.telemetry = telemetry or Telemetry(process_metrics=False)
        self.api_key = api_key or ApiKey(None)
        self._timeout = httpx.Timeout(io_timeout, connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._in_flight = 0

    @property
    def listening(self) -> bool:
        """Accepting connections, and the socket file is still there for clients to find."""
        return self._server is not None and self.path.is_socket()

    @property
    def in_flight(self) -> int:
        """Requests being forwarded right now."""
        return self._in_flight

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("ApiProxy already started")
        if self.path.exists() or self.path.is_symlink():
            raise FileExistsError(f"{self.path} exists; the API socket never replaces a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _route_uvicorn_log()
        config = uvicorn.Config(
            self._asgi, http="h11", ws="none", lifespan="off", interface="asgi3",
            log_config=None, log_level="warning", access_log=False, proxy_headers=False,
            server_header=False, date_header=False, timeout_keep_alive=_KEEP_ALIVE,
            timeout_graceful_shutdown=_CLOSE_GRACE, h11_max_incomplete_event_size=_MAX_HEAD)
        config.load()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            # Before asyncio calls listen(): no client can connect while the mode is wrong.
            os.chmod(self.path, 0o660)  # the pod's containers share a group; nobody else
            server = uvicorn.Server(config)
            # What Server.serve() sets up before startup(), less its signal handlers.
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[listener])
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise
        # No base_url and no default headers: each request is built whole in _exchange. Like
        # Upstream's, the client honours HTTPS_PROXY / SSL_CERT_FILE from the environment, so
        # both reach the server the same way.
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self.telemetry.api_in_flight.set_function(lambda: self._in_flight)
        self._server = server

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting; wait for requests in flight until ``deadline`` (monotonic); close.

        Requests still running then are cut (their clients see the connection close).
        Idempotent.
        """
        server = self._server
        if server is None:
            return
        self._server = None
        for listening in server.servers:
            listening.close()  # no new connections; open ones keep being served
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        while self._in_flight and deadline is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            log_event(log, "API requests cut at the drain deadline", requests=self._in_flight,
                      level=logging.WARNING)
        await server.shutdown()  # closes idle connections, cancels what still runs
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- requests -------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":  # no lifespan, no websockets: nothing else arrives
            return
        request = _Request.from_scope(scope)
        self._in_flight += 1
        started = time.monotonic()
        exchange = asyncio.ensure_future(self._exchange(request, receive, send))
        watch = asyncio.ensure_future(_client_leaves(request, receive))
        try:
            await asyncio.wait({exchange, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not exchange.done() and not request.answered:
                raise _ClientGone
            status = await exchange
        except _ClientGone:
            # Mid-upload (the body ended early) or while the answer was awaited: closing the
            # request to the server, by cancelling it, makes the server see an incomplete
            # body, never a whole one.
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError, _ClientGone):
                await exchange
            self.telemetry.api_requests.labels(status="broken").inc()
            log_event(log, "API client went away mid-request", method=request.method,
                      path=request.path, level=logging.DEBUG)
            return
        except _AnswerBrokenOff:
            self.telemetry.api_requests.labels(status="broken").inc()
            raise
        finally:
            self._in_flight -= 1
            exchange.cancel()
            watch.cancel()
        self.telemetry.api_requests.labels(status=f"{status // 100}xx").inc()
        log_event(log, "API request", level=logging.DEBUG, method=request.method,
                  path=request.path, status=status,
                  seconds=round(time.monotonic() - started, 3))

    async def _exchange(self, request: _Request, receive: _Receive, send: _Send) -> int:
        """Forward ``request``, send back the answer, return its status."""
        if not _proxied(request.raw_path, request.path):
            return await _send_error(
                request, send, 404, f"the pluto sidecar's API socket serves {API_PREFIX}/... "
                f"only; {request.path!r} is not under it")
        client = self._client
        if client is None:  # stopping
            return await _send_error(request, send, 503, "the pluto sidecar is stopping")
        headers = _end_to_end(request.headers, _REQUEST_DROP, request.header_values("connection"))
        if request.header_values("transfer-encoding"):
            # RFC 9112 6.3: with transfer-encoding the length is to be ignored, and a proxy
            # must drop it. Forwarded, it framed the chunked body we send differently
            # (the server's connection was reset, the client got a 500).
            headers = [(name, value) for name, value in headers
                       if name.lower() != "content-length"]
        authorization = self.api_key.authorization
        if authorization is not None:
            headers.append(("authorization", authorization))
        body = self._request_body(request, receive) if request.has_body else None
        if body is None:
            request.body_read.set()
        outgoing = httpx.Request(request.method, self.url + request.target, headers=headers,
                                 content=body)
        try:
            upstream = await client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            status, detail = self._failed(request, exc)
            return await _send_error(request, send, status, detail)
        try:
            return await self._relay(request, upstream, send)
        finally:
            await upstream.aclose()

    def _failed(self, request: _Request, exc: httpx.TransportError) -> tuple[int, str]:
        """502 when the server cannot be reached, 504 when it did not answer in time."""
        server = scrub(self.url)
        log_event(log, "API request failed: the server did not answer", method=request.method,
                  path=request.path, server=server, error=_describe(exc), level=logging.WARNING)
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return 504, (f"the server at {server} did not answer the pluto sidecar in time: "
                         f"{_describe(exc)}")
        return 502, (f"the pluto sidecar cannot reach the server at {server}: "
                     f"{_describe(exc)}; is it running, and is the sidecar's --server "
                     "(PLUTO_URL) right?")

    async def _request_body(self, request: _Request, receive: _Receive) -> AsyncIterator[bytes]:
        counter = self.telemetry.api_request_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone  # through httpx, which closes its request to the server
            piece = message.get("body", b"")
            if piece:
                counter.inc(len(piece))
                yield piece
            if not message.get("more_body", False):
                request.body_read.set()
                return

    async def _relay(self, request: _Request, upstream: httpx.Response, send: _Send) -> int:
        headers = _end_to_end(upstream.headers.multi_items(), HOP_BY_HOP,
                              upstream.headers.get_list("connection"))
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": [(name.encode("latin-1"), value.encode("latin-1"))
                                for name, value in headers]})
        counter = self.telemetry.api_response_bytes
        try:
            async for piece in upstream.aiter_raw():
                counter.inc(len(piece))
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except httpx.TransportError as exc:
            # The status line is gone already: cut the connection so that the client sees a
            # truncated answer rather than a short one that looks whole.
            log_event(log, "the server broke off an answer", method=request.method,
                      path=request.path, error=_describe(exc), level=logging.WARNING)
            raise _AnswerBrokenOff from exc
        request.answered = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return upstream.status_code


_Receive = Any  # uvicorn's ASGIReceiveCallable; kept loose so that mypy needs no ASGI stubs
_Send = Any


@dataclass
class _Request:
    """What the proxy needs of an ASGI ``scope``, decoded once."""

    method: str
    #: Percent-encoded path as the client sent it, and the whole target with the query.
    raw_path: str
    target: str
    #: Decoded path (for checks and log lines).
    path: str
    headers: list[tuple[str, str]]
    #: Set once the body has been read whole (at once when there is none).
    body_read: asyncio.Event = field(default_factory=asyncio.Event)
    #: The last piece of the answer is being sent: the client leaving now changes nothing.
    answered: bool = False

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> _Request:
        raw_path = scope["raw_path"].decode("latin-1")
        query = scope["query_string"].decode("latin-1")
        return cls(method=scope["method"], raw_path=raw_path,
                   target=f"{raw_path}?{query}" if query else raw_path, path=scope["path"],
                   headers=[(name.decode("latin-1"), value.decode("latin-1"))
                            for name, value in scope["headers"]])

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def has_body(self) -> bool:
        """HTTP/1.1 framing: a body comes with a length or with transfer-encoding."""
        return any(key in {"content-length", "transfer-encoding"} for key, _ in self.headers)


async def _client_leaves(request: _Request, receive: _Receive) -> None:
    """Returns when the client closes its connection after sending its whole request."""
    await request.body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_error(request: _Request, send: _Send, status: int, detail: str) -> int:
    body = json.dumps({"detail": detail}).encode()
    request.answered = True
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


def _proxied(raw_path: str, path: str) -> bool:
    """Under ``/api/v1/``, with no dot segment that could climb out of it on the server."""
    if not raw_path.startswith(API_PREFIX + "/"):
        return False
    return not any(part in {".", ".."} for part in path.split("/"))


def _end_to_end(items: Iterable[tuple[str, str]], drop: frozenset[str],
                connection: Iterable[str]) -> list[tuple[str, str]]:
    """``items`` without the ``drop`` headers and those the ``connection`` values name."""
    named = {token.strip().lower() for value in connection for token in value.split(",")}
    return [(name, value) for name, value in items
            if name.lower() not in drop and name.lower() not in named]


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {scrub(str(exc))}" if str(exc) else type(exc).__name__


class _UvicornToSidecarLog(logging.Handler):
    """uvicorn's own lines (a malformed request, say) as the sidecar's JSON lines.

    Two of its errors are the proxy's doing and already logged by it: the exception it raises
    to cut a connection whose answer the server broke off, and the cancellation of requests
    still running at the drain deadline. Those are not repeated.
    """

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, _AnswerBrokenOff | asyncio.CancelledError):
            return
        log_event(log, record.getMessage(), level=record.levelno,
                  error=_describe(error) if isinstance(error, Exception) else None)


def _route_uvicorn_log() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(h, _UvicornToSidecarLog) for h in uvicorn_log.handlers):
        uvicorn_log.addHandler(_UvicornToSidecarLog())
    uvicorn_log.propagate = False
