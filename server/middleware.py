"""ASGI middleware that every request passes through, before any route runs."""

from __future__ import annotations

from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pluto.wire import API_PREFIX, JSON, MSGPACK, REQUEST_ENCODINGS, encode_json

__all__ = ["AdvertiseRequestEncodings", "CompressAnswers", "RefuseNulInUrls"]


class RefuseNulInUrls:
    """A NUL character in a path or query is refused with 422 before any route runs:
    PostgreSQL cannot store or compare strings holding one (it would be a 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
                "\x00" in scope.get("path", "")
                or b"%00" in scope.get("query_string", b"").lower()):
            response = Response(
                encode_json({"detail": "the URL holds a NUL character (%00): remove it"}),
                status_code=422, media_type=JSON)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class AdvertiseRequestEncodings:
    """Every API response says which request body codings the server takes
    (``Accept-Encoding: zstd, gzip``, RFC 7694 section 3).

    A client learns from its first answer that it may compress with zstd; until then it
    uses gzip, which every version of the server took. An older server read a coding it did
    not know as no coding at all and refused the body as not valid MessagePack, for good,
    so a sidecar must not try zstd on a server that has not said it takes it.
    """

    HEADER = ", ".join(REQUEST_ENCODINGS)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_advertising(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["accept-encoding"] = self.HEADER
            await send(message)

        await self.app(scope, receive, send_advertising)


class CompressAnswers(GZipMiddleware):
    """Answers of 1 KiB or more go gzipped to a client that accepts gzip (browsers, httpx):
    JSON, the dashboard's pages and scripts.

    A dashboard page loads plotly.js (4.8 MB, 1.7 MB gzipped) and a metrics answer per chart
    (88 KB for a key in 1,000 buckets, 36 KB gzipped): over ``kubectl port-forward`` or an
    ingress those bytes are most of the wait. Level 1: 2.4-2.9 times smaller, at 100-150 MB/s
    on this project's machine; level 9 (Starlette's default) is 4-14 % smaller for four to ten
    times the CPU (docs/api.md). Big answers are compressed in a worker thread (Starlette's own).

    Not compressed: file and checkpoint downloads (``application/octet-stream``). The client
    checks their digest and writes them to disk; model weights hardly compress, and at GBs a
    deflate pass would make the server's CPU the limit of every download. Nor MessagePack
    answers, which programs ask for (the SDK, ``pluto.query``): already half the size of the
    JSON, their floats are 8 random bytes each, so gzip gains 1.5-1.8 times where JSON gains
    2.4-2.9, and a raw series of 100,000 points would wait 33 ms for it.
    """

    MINIMUM_BYTES = 1024
    LEVEL = 1

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, minimum_size=self.MINIMUM_BYTES, compresslevel=self.LEVEL,
                         exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES,
                                                "application/octet-stream", MSGPACK))
