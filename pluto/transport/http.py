"""Direct HTTP transport: the SDK talks to the tracking server itself."""

from __future__ import annotations

import random
import time
from collections.abc import Generator
from typing import Any, TypeVar

import httpx
import msgspec

from pluto.credentials import ApiKey
from pluto.errors import RequestRejected, ServerUnavailable
from pluto.transport.base import Transport
from pluto.wire import (
    API_PREFIX,
    JSON,
    MSGPACK,
    IngestResult,
    RunAttached,
    RunCreate,
    RunInfo,
    RunUpdate,
    encode_json,
)

T = TypeVar("T")

#: The host name requests carry when they go through the sidecar's API socket.
SIDECAR_API_BASE = "http://pluto-sidecar"

_INGEST_HEAD = msgspec.msgpack.encode({"chunks": []})[:-1]  # fixmap(1) "chunks" then array


def ingest_body_head(n: int) -> bytes:
    """What ``ingest_body`` writes before the first of ``n`` chunks: the map, then the
    chunk array's header. The sidecar streams a body from it and the chunks' bytes."""
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 2**16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return _INGEST_HEAD + header


def check_server_url(url: str) -> str:
    """``url`` as given when it can name a pluto server; ``ValueError`` saying what to set
    otherwise. Without this, "localhost:7300" or "ftp://x" was retried for all of
    ``init_timeout`` as if the server were down."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        problem = str(exc)
    else:
        problem = "" if parsed.scheme in ("http", "https") and parsed.host else (
            "it needs http:// or https:// and a host")
    if problem:
        raise ValueError(f"PLUTO_URL (or url=) {url!r} is not a server URL: {problem}; set "
                         "it to http://HOST:PORT, e.g. http://127.0.0.1:7300")
    return url


class _BearerKey(httpx.Auth):
    """Sends the key's current value with each request: a key that follows its file
    (``ApiKey``) changes while the client lives."""

    def __init__(self, key: ApiKey) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        authorization = self.key.authorization
        if authorization is not None:
            request.headers["authorization"] = authorization
        yield request


def ingest_body(chunks: list[bytes]) -> bytes:
    """An ``IngestBatch`` built from already-encoded chunks, without re-encoding them."""
    return ingest_body_head(len(chunks)) + b"".join(chunks)


class ApiClient:
    """A small typed client of the server's JSON/msgpack API."""

    def __init__(self, url: str, api_key: str | ApiKey | None, timeout: float = 30.0, *,
                 uds: str | None = None) -> None:
        """``api_key``: a fixed key, or an ``ApiKey`` read again from its file when that
        changes (a long-lived client such as the operator's). ``uds``: reach the server
        through the pod sidecar's API socket at this path (the sidecar adds the
        credentials; ``url`` then only names it in messages)."""
        self.url = url.rstrip("/")
        self.uds = uds
        self.timeout = timeout
        key = api_key if isinstance(api_key, ApiKey) else ApiKey(api_key)
        transport = httpx.HTTPTransport(uds=uds) if uds else None
        base = SIDECAR_API_BASE if uds else self.url
        self._client = httpx.Client(base_url=base + API_PREFIX,
                                    headers={"user-agent": "pluto-sdk"}, auth=_BearerKey(key),
                                    timeout=timeout, transport=transport)

    @property
    def http(self) -> httpx.Client:
        """The underlying client, for streaming transfers."""
        return self._client

    def where(self) -> str:
        if self.uds:
            return f"the pod's pluto sidecar ({self.uds})"
        return f"the pluto server at {self.url}"

    def call(self, method: str, path: str, reply: type[T], *, body: Any = None,
             params: dict[str, Any] | None = None, msgpack_reply: bool = False,
             raw_body: bytes | None = None, content_type: str = JSON,
             timeout: float | None = None) -> T:
        """One request; ``timeout`` (seconds) instead of the client's for this one."""
        headers = {"accept": MSGPACK if msgpack_reply else JSON}
        content: bytes | None = raw_body
        if body is not None:
            content = encode_json(body)
        if content is not None:
            headers["content-type"] = content_type
        try:
            response = self._client.request(
                method, path, content=content, params=params, headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
        except httpx.TransportError as exc:
            raise ServerUnavailable(
                f"cannot reach {self.where()}: {exc.__class__.__name__}: {exc}; "
                + ("is the sidecar container running?" if self.uds else
                   "start it with 'pluto server' or set PLUTO_URL")
            ) from exc
        if response.status_code >= 400:
            raise RequestRejected(response.status_code, error_detail(response))
        if response.headers.get("content-type", "").startswith(MSGPACK):
            return msgspec.msgpack.decode(response.content, type=reply)
        return msgspec.json.decode(response.content, type=reply)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def error_detail(response: httpx.Response) -> str:
    """The server's ``detail`` sentence of an error answer (or what the body says)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else response.text[:500] or response.reason_phrase


class HttpTransport(Transport):
    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        self.client = ApiClient(url, api_key, timeout)

    @property
    def destination(self) -> str:
        return self.client.url

    def open_run(self, request: RunCreate, timeout: float) -> RunAttached:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            # Each try within what is left: a server that takes the connection and never
            # answers must not hold init() for the client's whole (longer) timeout.
            left = max(deadline - time.monotonic(), 0.1)
            try:
                return self.client.call("POST", "/runs", RunAttached, body=request,
                                        timeout=min(self.client.timeout, left))
            except ServerUnavailable as exc:
                last = exc
            except RequestRejected as exc:
                if exc.permanent:
                    raise
                last = ServerUnavailable(str(exc))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"pluto.init() gave up after {timeout:g}s: {last}"
                ) from last
            # Sleep with jitter, but never past the deadline: the last try is at it.
            time.sleep(min(remaining, delay * (0.5 + random.random())))
            delay = min(delay * 2, 2.0)

    def update_run(self, run_id: int, request: RunUpdate) -> RunInfo:
        return self.client.call("PATCH", f"/runs/{run_id}", RunInfo, body=request)

    def deliver(self, chunks: list[bytes]) -> IngestResult:
        return self.client.call("POST", "/ingest", IngestResult, raw_body=ingest_body(chunks),
                                content_type=MSGPACK, msgpack_reply=True)

    def close(self) -> None:
        self.client.close()
