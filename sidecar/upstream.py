"""The sidecar's HTTP client of the tracking server (the only holder of the API key)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar
from urllib.parse import quote

import httpx
import msgspec

from pluto.credentials import ApiKey
from pluto.errors import PlutoError, RequestRejected, ServerUnavailable
from pluto.transport.http import error_detail, ingest_body_head
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
from pluto_sidecar.compression import PIECE, Body, BodyStream, Encoding, compress_body
from pluto_sidecar.logs import log_event

log = logging.getLogger("pluto.sidecar.upstream")

T = TypeVar("T")


def ingest_body_parts(chunks: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """The pieces of ``ingest_body(chunks)``, the chunks themselves not copied."""
    return [ingest_body_head(len(chunks)), *chunks]


class EncodingRefused(PlutoError):
    """A zstd body was refused (4xx) by something that does not say it takes zstd: a proxy
    before the server (415), or a server rolled back to a version before zstd (422). The
    batch is sent again as gzip."""


class Upstream:
    """``compression``: "zstd" (zstd once the server has said it takes it, gzip until then
    and for good after a refusal, see ``EncodingRefused``) or "gzip" (always)."""

    def __init__(self, url: str, api_key: ApiKey | None, timeout: float = 30.0,
                 compression: Encoding = "zstd") -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or ApiKey(None)
        self.compression: Encoding = compression
        #: The server said it takes zstd bodies (``Accept-Encoding`` on an answer).
        self._zstd_offered = False
        #: A zstd body was refused (``EncodingRefused``): gzip from then on, whatever the
        #: server says.
        self._zstd_refused = False
        self._client = httpx.AsyncClient(base_url=self.url + API_PREFIX,
                                         headers={"user-agent": "pluto-sidecar"},
                                         timeout=timeout)

    @property
    def encoding(self) -> Encoding:
        """How the next ingest body is compressed."""
        zstd = self.compression == "zstd" and self._zstd_offered and not self._zstd_refused
        return "zstd" if zstd else "gzip"

    def body_stream(self, size: int) -> BodyStream:
        """A stream to build the next ingest body in, ``size`` bytes (see ``encoding``)."""
        return BodyStream(self.encoding, size)

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

    async def prepare(self, chunks: Sequence[bytes | memoryview]) -> Body:
        """The compressed ``IngestBatch`` body of ``chunks``, for ``send_ingest``."""
        # Compressed in a worker thread: zstd and zlib let go of the GIL, so the event loop
        # keeps reading and acknowledging clients' frames meanwhile (on another core).
        return await asyncio.to_thread(compress_body, ingest_body_parts(chunks), self.encoding)

    async def send_ingest(self, body: Body) -> IngestResult:
        return await self._call("POST", "/ingest", IngestResult, body.data, MSGPACK,
                                encoding=body.encoding)

    async def _call(self, method: str, path: str, reply: type[T], body: bytes,
                    content_type: str, encoding: Encoding | None = None) -> T:
        headers = {"content-type": content_type, "accept": MSGPACK,
                   "content-length": str(len(body))}
        if encoding is not None:
            headers["content-encoding"] = encoding
        # Per request, not once on the client: the key can change (``ApiKey.reload``).
        authorization = self.api_key.authorization
        if authorization is not None:
            headers["authorization"] = authorization
        try:
            response = await self._client.request(method, path, content=_pieces(body),
                                                  headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{self.url}: {exc.__class__.__name__}: {exc}") from exc
        offered = _offers_zstd(response)
        if response.status_code < 400 or offered:
            # Said on every answer, errors too; a server rolled back to a version before
            # zstd answers without it, and gets gzip again.
            self._zstd_offered = bool(offered)
        if encoding == "zstd" and 400 <= response.status_code < 500 and not offered:
            # Refused by something that does not say it takes zstd: a proxy before the
            # server (415), or a server rolled back to a version before zstd since the batch
            # was compressed (it read the body as uncompressed, so as bad data: 422). Not
            # the data's fault: sent again as gzip, never dead-lettered.
            self._zstd_refused = True
            log_event(log, "a zstd batch was refused by something that does not take zstd; "
                      "sending gzip from now on", status=response.status_code,
                      detail=error_detail(response), level=logging.WARNING)
            raise EncodingRefused(f"{self.url}: zstd refused ({response.status_code}): "
                                  f"{error_detail(response)}")
        if response.status_code >= 400:
            raise RequestRejected(response.status_code, error_detail(response))
        return msgspec.msgpack.decode(response.content, type=reply)

    async def close(self) -> None:
        await self._client.aclose()


def _offers_zstd(response: httpx.Response) -> bool | None:
    """Whether an answer says the server takes zstd bodies (``Accept-Encoding``, RFC 7694;
    ``zstd;q=0`` says it does not); None when it says nothing of codings."""
    offered = response.headers.get("accept-encoding")
    if offered is None:
        return None
    for coding in offered.split(","):
        name, _, parameters = coding.partition(";")
        if name.strip().lower() == "zstd":
            weight = parameters.strip().lower().removeprefix("q=") or "1"
            try:
                return float(weight) > 0
            except ValueError:
                return True  # a parameter other than q: not a refusal
    return False


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """``body`` a piece at a time: given whole, h11 would copy it into one buffer with the
    request line and headers, and asyncio keep what the socket did not take at once in
    another (a batch of one big chunk is MBs; the sidecar's RSS counts)."""
    view = memoryview(body)
    for start in range(0, len(view), PIECE):
        yield bytes(view[start:start + PIECE])
