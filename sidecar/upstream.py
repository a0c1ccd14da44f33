"""The sidecar's HTTP client of the tracking server (the only holder of the API key)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx
import msgspec

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
    RunUpdateRequest,
    encode_json,
)

T = TypeVar("T")

#: An ``IngestBatch`` up to its chunk array's header: the same bytes ``ingest_body`` writes.
_INGEST_HEAD = ingest_body([])[:-1]


def ingest_body_parts(chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The pieces of ``ingest_body(chunks)``, the chunks themselves not copied."""
    n = len(chunks)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 2**16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return [_INGEST_HEAD + header, *chunks]


def gzip_body(parts: Sequence[bytes | memoryview]) -> bytes:
    """``gzip.compress(b"".join(parts), compresslevel=1)``, without joining the parts first.

    Level 1: most of the size win for a small share of the CPU. Streaming over the parts
    (views of the spool records) saves a copy of the whole batch.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip framing
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)


class Upstream:
    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        headers = {"user-agent": "pluto-sidecar"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url + API_PREFIX, headers=headers,
                                         timeout=timeout)

    async def open_run(self, request: RunCreate) -> RunAttached:
        return await self._call("POST", "/runs", RunAttached, encode_json(request), JSON)

    async def update_run(self, request: RunUpdateRequest) -> RunInfo:
        path = f"/runs/{quote(request.run_ref, safe='')}?project={quote(request.project)}"
        return await self._call("PATCH", path, RunInfo, encode_json(request.update), JSON)

    async def prepare(self, chunks: Sequence[bytes | memoryview]) -> bytes:
        """The compressed ``IngestBatch`` body of ``chunks``, for ``send_ingest``."""
        # Compressed in a worker thread: zlib lets go of the GIL, so the event loop keeps
        # reading and acknowledging clients' frames meanwhile (on another core).
        return await asyncio.to_thread(gzip_body, ingest_body_parts(chunks))

    async def send_ingest(self, body: bytes) -> IngestResult:
        return await self._call("POST", "/ingest", IngestResult, body, MSGPACK, gzipped=True)

    async def _call(self, method: str, path: str, reply: type[T], body: bytes,
                    content_type: str, gzipped: bool = False) -> T:
        headers = {"content-type": content_type, "accept": MSGPACK}
        if gzipped:
            headers["content-encoding"] = "gzip"
        try:
            response = await self._client.request(method, path, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise RequestRejected(response.status_code, error_detail(response))
        return msgspec.msgpack.decode(response.content, type=reply)

    async def close(self) -> None:
        await self._client.aclose()
