"""Reading request bodies: size limits, gzip, and msgspec decoding with clear errors."""

from __future__ import annotations

import zlib
from typing import TypeVar

import msgspec
from starlette.requests import Request

from pluto.digits import parse_digits
from pluto.wire import MSGPACK
from pluto_server.errors import PayloadTooLarge, Unprocessable

T = TypeVar("T")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` (compressed or not)."""
    declared = parse_digits(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(_too_large(declared, limit))
    received = bytearray()
    async for piece in request.stream():
        received += piece
        if len(received) > limit:
            raise PayloadTooLarge(_too_large(len(received), limit))
    body = bytes(received)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise Unprocessable(f"the gzip body could not be decompressed: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(_too_large(len(body), limit) + " (after decompression)")
    return body


def decode(request: Request, body: bytes, kind: type[T], name: str | None = None) -> T:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    try:
        if content_type == MSGPACK:
            return msgspec.msgpack.decode(body, type=kind)
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        hint = " (check the field names: see /api/docs)" if "unknown field" in str(exc) else ""
        raise Unprocessable(f"invalid {name or kind.__name__}: {exc}{hint}") from None
    except msgspec.DecodeError as exc:
        fmt = "MessagePack" if content_type == MSGPACK else "JSON"
        raise Unprocessable(f"the body is not valid {fmt}: {exc}") from None


def _too_large(size: int, limit: int) -> str:
    return (
        f"request body of {size} bytes is larger than this server's limit of {limit} bytes; "
        "send smaller batches or raise the limit with 'pluto server --max-body-mb'"
    )


def wants_msgpack(request: Request) -> bool:
    return MSGPACK in request.headers.get("accept", "")


