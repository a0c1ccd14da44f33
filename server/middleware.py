"""ASGI middleware that every request passes through, before any route runs."""

from __future__ import annotations

from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pluto.wire import API_PREFIX, JSON, REQUEST_ENCODINGS, encode_json

__all__ = ["AdvertiseRequestEncodings", "RefuseNulInUrls"]


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
