"""The sidecar's HTTP client of the tracking server (the only holder of the API key)."""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx
import msgspec

from pluto.credentials import ApiKey
from pluto.errors import RequestRejected, ServerUnavailable
from pluto.transport.http import error_detail, ingest_body
from pluto.wire import (
    API_PREFIX,
    JSON,
    MSGPACK,
    IngestResult,
    RunAttached,
    RunCreate,
    RunInfo,
    RunList,
    RunUpdateRequest,
    encode_json,
)

T = TypeVar("T")

#: An ``IngestBatch`` up to its chunk array's header: the same bytes ``ingest_body`` writes.
_INGEST_HEAD = ingest_body([])[:-1]


def ingest_body_head(n: int) -> bytes:
    """What ``ingest_body`` writes before the first of ``n`` chunks."""
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 2**16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return _INGEST_HEAD + header


def ingest_body_parts(chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The pieces of ``ingest_body(chunks)``, the chunks themselves not copied."""
    return [ingest_body_head(len(chunks)), *chunks]


#: ``GzipStream`` compresses this much at a time, and a body is sent this much at a time.
_GZIP_PIECE = 256 * 1024


class GzipStream:
    """Builds a gzip member (level 1) from pieces written one after the other.

    Level 1: most of the size win for a small share of the CPU. Each piece is compressed
    at once, ``_GZIP_PIECE`` at a time, into one buffer that ``finish`` hands over without
    a copy: neither the input nor a second copy of the output is ever held whole. For a
    batch of one 4.5 MB chunk that is several MB of the sidecar's peak RSS.
    """

    def __init__(self) -> None:
        self._compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip framing
        self._body = io.BytesIO()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _GZIP_PIECE):
            self._body.write(self._compressor.compress(view[start:start + _GZIP_PIECE]))

    def finish(self) -> bytes:
        self._body.write(self._compressor.flush())
        return self._body.getvalue()


def gzip_body(parts: Sequence[bytes | memoryview]) -> bytes:
    """``gzip.compress(b"".join(parts), compresslevel=1)``, without joining the parts."""
    stream = GzipStream()
    for part in parts:
        stream.write(part)
    return stream.finish()


class Upstream:
    def __init__(self, url: str, api_key: ApiKey | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or ApiKey(None)
        self._client = httpx.AsyncClient(base_url=self.url + API_PREFIX,
                                         headers={"user-agent": "pluto-sidecar"},
                                         timeout=timeout)

    async def open_run(self, request: RunCreate) -> RunAttached:
        return await self._call("POST", "/runs", RunAttached, encode_json(request), JSON)

    async def update_run(self, request: RunUpdateRequest, run: int) -> RunInfo:
        """Apply ``request`` to the run with numeric id ``run`` (the run ``request`` names by
        external id): an all-digit external id in the path would be read as a numeric id."""
        path = f"/runs/{run}?project={quote(request.project, safe='')}"
        return await self._call("PATCH", path, RunInfo, encode_json(request.update), JSON)

    async def find_run_number(self, project: str, run_ref: str) -> int:
        """The numeric id of the run of ``project`` whose external id is ``run_ref``;
        ``RequestRejected`` (404) when there is none."""
        path = (f"/projects/{quote(project, safe='')}/runs?run_id={quote(run_ref, safe='')}"
                "&limit=1")
        runs = await self._call("GET", path, RunList, b"", JSON)
        for run in runs.runs:
            if run.run_id == run_ref:
                return run.id
        raise RequestRejected(404, f"run {run_ref!r} does not exist in project {project!r}")

    async def prepare(self, chunks: Sequence[bytes | memoryview]) -> bytes:
        """The compressed ``IngestBatch`` body of ``chunks``, for ``send_ingest``."""
        # Compressed in a worker thread: zlib lets go of the GIL, so the event loop keeps
        # reading and acknowledging clients' frames meanwhile (on another core).
        return await asyncio.to_thread(gzip_body, ingest_body_parts(chunks))

    async def send_ingest(self, body: bytes) -> IngestResult:
        return await self._call("POST", "/ingest", IngestResult, body, MSGPACK, gzipped=True)

    async def _call(self, method: str, path: str, reply: type[T], body: bytes,
                    content_type: str, gzipped: bool = False) -> T:
        headers = {"content-type": content_type, "accept": MSGPACK,
                   "content-length": str(len(body))}
        if gzipped:
            headers["content-encoding"] = "gzip"
        # Per request, not once on the client: the key can change (``ApiKey.reload``).
        authorization = self.api_key.authorization
        if authorization is not None:
            headers["authorization"] = authorization
        try:
            response = await self._client.request(method, path, content=_pieces(body),
                                                  headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise RequestRejected(response.status_code, error_detail(response))
        return msgspec.msgpack.decode(response.content, type=reply)

    async def close(self) -> None:
        await self._client.aclose()


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """``body`` a piece at a time: given whole, h11 would copy it into one buffer with the
    request line and headers, and asyncio keep what the socket did not take at once in
    another (a batch of one big chunk is MBs; the sidecar's RSS counts)."""
    view = memoryview(body)
    for start in range(0, len(view), _GZIP_PIECE):
        yield bytes(view[start:start + _GZIP_PIECE])
