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

Bodies are streamed in both directions and never held whole: aiohttp stops reading the client
once about 128 KiB wait unforwarded, httpx writes each piece to the server as it arrives, and
the answer is written to the client a network read at a time with the writer's back-pressure.
A 300 MB upload through the proxy grows its RSS by a few MB at most
(tests/test_sidecar_proxy.py measures it).

The server is aiohttp's (``web.UnixSite``: it runs in the sidecar's asyncio loop and installs
no signal handlers; ``pluto_sidecar.main`` owns SIGTERM); the client is an
``httpx.AsyncClient`` like :class:`~pluto_sidecar.upstream.Upstream`'s. A client that goes
away cancels its request to the server (``handler_cancellation``).

The key never appears in a log line or an answer: errors name the server URL (scrubbed of
any inline password) and the exception, never a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
from aiohttp import web

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
#: host (the server's own is set), and ``expect`` (aiohttp answered the 100-continue itself).
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "x-api-key", "expect"}
#: A request to the server waits this long to connect ...
CONNECT_TIMEOUT = 10.0
#: ... and this long for each read or write (a big upload is finished, verified and stored
#: before the server answers, so this is generous; the client's own timeout still applies).
IO_TIMEOUT = 300.0
#: Idle keep-alive connections and requests still running when the sidecar stops are cut
#: after this long (the drain deadline has passed by then).
_CLOSE_GRACE = 0.5
_MAX_LINE = 64 * 1024


class ApiProxy:
    """Serves ``path`` and forwards what arrives to ``server_url``; see the module docstring.

    ``start()`` binds the socket (mode 0660) and refuses a path that exists: the caller decides
    whether an existing file is a stale socket to replace (:meth:`Sidecar.start
    <pluto_sidecar.sidecar.Sidecar.start>` does, as for its main socket). ``stop()`` stops
    accepting, lets requests in flight finish until the deadline, then closes.
    """

    def __init__(self, path: Path, server_url: str, api_key: str | None,
                 telemetry: Telemetry | None = None, *, connect_timeout: float = CONNECT_TIMEOUT,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.path = path
        self.url = server_url.rstrip("/")
        self.telemetry = telemetry or Telemetry(process_metrics=False)
        self._authorization = f"Bearer {api_key}" if api_key else None
        self._timeout = httpx.Timeout(io_timeout, connect=connect_timeout)
        self._client: httpx.AsyncClient | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.UnixSite | None = None
        self._in_flight = 0

    @property
    def listening(self) -> bool:
        """Accepting connections, and the socket file is still there for clients to find."""
        return self._site is not None and self.path.is_socket()

    @property
    def in_flight(self) -> int:
        """Requests being forwarded right now."""
        return self._in_flight

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("ApiProxy already started")
        if self.path.exists() or self.path.is_symlink():
            raise FileExistsError(f"{self.path} exists; the API socket never replaces a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Request lines and headers up to 64 KiB (aiohttp's default is 8 KiB): the proxy should
        # not be a narrower pipe than the server for a long query string.
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=_CLOSE_GRACE,
                               max_line_size=_MAX_LINE, max_field_size=_MAX_LINE)
        await runner.setup()
        site = web.UnixSite(runner, str(self.path))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        os.chmod(self.path, 0o660)  # the pod's containers share a group; nobody else
        # No base_url and no default headers: each request is built whole in _forward. Like
        # Upstream's, the client honours HTTPS_PROXY / SSL_CERT_FILE from the environment, so
        # both reach the server the same way.
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self.telemetry.api_in_flight.set_function(lambda: self._in_flight)
        self._runner, self._site = runner, site

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting; wait for requests in flight until ``deadline`` (monotonic); close.

        Requests still running then are cut (their clients see the connection close).
        Idempotent.
        """
        runner, site = self._runner, self._site
        if runner is None or site is None:
            return
        self._site = None
        await site.stop()  # no new connections; open ones keep being served
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        while self._in_flight and deadline is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            log_event(log, "API requests cut at the drain deadline", requests=self._in_flight,
                      level=logging.WARNING)
        self._runner = None
        await runner.cleanup()  # closes idle connections, cancels what still runs
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- requests -------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        started = time.monotonic()
        try:
            response = await self._forward(request)
        except asyncio.CancelledError:
            # The client went away mid-request (aiohttp cancels the handler): the request to
            # the server was closed with it, so the server saw an incomplete body.
            self.telemetry.api_requests.labels(status="broken").inc()
            log_event(log, "API client went away mid-request", method=request.method,
                      path=request.path, level=logging.DEBUG)
            raise
        finally:
            self._in_flight -= 1
        status = response.status
        self.telemetry.api_requests.labels(status=f"{status // 100}xx").inc()
        log_event(log, "API request", level=logging.DEBUG, method=request.method,
                  path=request.path, status=status,
                  seconds=round(time.monotonic() - started, 3))
        return response

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if not _proxied(request.rel_url.raw_path, request.path):
            return _error(404, f"the pluto sidecar's API socket serves {API_PREFIX}/... only; "
                          f"{request.path!r} is not under it")
        client = self._client
        if client is None:  # stopping
            return _error(503, "the pluto sidecar is stopping")
        headers = _end_to_end(request.headers.items(), _REQUEST_DROP,
                              request.headers.getall("connection", []))
        if self._authorization is not None:
            headers.append(("authorization", self._authorization))
        body = self._request_body(request) if request.body_exists else None
        outgoing = httpx.Request(request.method, self.url + request.rel_url.raw_path_qs,
                                 headers=headers, content=body)
        try:
            upstream = await client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            return self._failed(request, exc)
        try:
            return await self._relay(request, upstream)
        finally:
            await upstream.aclose()

    def _failed(self, request: web.Request, exc: httpx.TransportError) -> web.Response:
        """502 when the server cannot be reached, 504 when it did not answer in time."""
        server = scrub(self.url)
        log_event(log, "API request failed: the server did not answer", method=request.method,
                  path=request.path, server=server, error=_describe(exc), level=logging.WARNING)
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return _error(504, f"the server at {server} did not answer the pluto sidecar in "
                          f"time: {_describe(exc)}")
        return _error(502, f"the pluto sidecar cannot reach the server at {server}: "
                      f"{_describe(exc)}; is it running, and is the sidecar's --server "
                      "(PLUTO_URL) right?")

    async def _request_body(self, request: web.Request) -> AsyncIterator[bytes]:
        counter = self.telemetry.api_request_bytes
        async for piece in request.content.iter_any():
            counter.inc(len(piece))
            yield piece

    async def _relay(self, request: web.Request, upstream: httpx.Response) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status_code, reason=upstream.reason_phrase)
        response.headers.extend(_end_to_end(upstream.headers.multi_items(), HOP_BY_HOP,
                                            upstream.headers.get_list("connection")))
        await response.prepare(request)
        counter = self.telemetry.api_response_bytes
        try:
            async for piece in upstream.aiter_raw():
                counter.inc(len(piece))
                await response.write(piece)
        except httpx.TransportError as exc:
            # The status line is gone already: cut the connection so that the client sees a
            # truncated answer rather than a short one that looks whole.
            log_event(log, "the server broke off an answer", method=request.method,
                      path=request.path, error=_describe(exc), level=logging.WARNING)
            self.telemetry.api_requests.labels(status="broken").inc()
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


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


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)
