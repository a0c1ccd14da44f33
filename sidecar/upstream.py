"""The sidecar's HTTP client of the tracking server (the only holder of the API key)."""

from __future__ import annotations

import gzip
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

    async def ingest(self, chunks: list[bytes]) -> IngestResult:
        # gzip level 1: most of the size win for a small share of the CPU.
        body = gzip.compress(ingest_body(chunks), compresslevel=1)
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
