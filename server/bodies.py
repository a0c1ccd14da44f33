"""Reading request bodies: size limits, zstd and gzip, and msgspec decoding with clear errors."""

from __future__ import annotations

import math
import zlib
from typing import Any, TypeVar

import msgspec
import zstandard
from starlette.requests import Request

from pluto.digits import parse_digits
from pluto.wire import MSGPACK, REQUEST_ENCODINGS, json_float
from pluto_server.errors import PayloadTooLarge, Unprocessable, UnsupportedEncoding

T = TypeVar("T")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, decompressed as its ``Content-Encoding`` says (zstd, gzip or none); refused
    with 413 as soon as it passes ``limit``, compressed or not, and with 415 when it is
    compressed some other way."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in (*REQUEST_ENCODINGS, "identity", ""):
        # Before reading: read as uncompressed, such a body would be refused as not valid
        # MessagePack or JSON, which says nothing of what to change.
        raise UnsupportedEncoding(
            f"content-encoding {encoding!r} is not supported: send the body as zstd, gzip "
            "or uncompressed (one coding, as this server's Accept-Encoding says)")
    declared = parse_digits(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(_too_large(declared, limit))
    received = bytearray()
    async for piece in request.stream():
        received += piece
        if len(received) > limit:
            raise PayloadTooLarge(_too_large(len(received), limit))
    if encoding == "gzip":
        return _gunzip(received, limit)
    if encoding == "zstd":
        return _unzstd(received, limit)
    return bytes(received)


def _gunzip(body: bytearray, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Unprocessable(f"the gzip body could not be decompressed: {exc}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(_too_large(len(inflated), limit) + " (after decompression)")
    return inflated


#: The largest zstd window a body may need: levels up to 19 compress within it. zstd's own
#: default is 128 MiB, memory one small request could make the server allocate.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
#: A zstd body is decompressed this much at a time: asking the reader for everything left
#: under the limit at once had it allocate a buffer of up to the limit (64 MiB) per read,
#: which made decompressing 2.4 times slower (129 against 54 ms per 2M points).
ZSTD_PIECE = 1024 * 1024


def _unzstd(body: bytearray, limit: int) -> bytes:
    """``body`` decompressed (all its frames), reading no more than ``limit + 1`` bytes of
    output: a small body that inflates to gigabytes is refused without being inflated."""
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
        body, read_across_frames=True)
    pieces: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            piece = reader.read(min(ZSTD_PIECE, limit + 1 - size))
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
    except zstandard.ZstdError as exc:
        hint = (f" (its window is over {ZSTD_MAX_WINDOW >> 20} MiB: compress with level 19 "
                "or lower, without --long)" if "memory" in str(exc).lower() else "")
        raise Unprocessable(f"the zstd body could not be decompressed: {exc}{hint}") from None
    if size > limit:
        raise PayloadTooLarge(_too_large(size, limit) + " (after decompression)")
    return b"".join(pieces)


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
    except RecursionError:
        # msgspec decodes nested arrays and maps recursively, within Python's recursion limit.
        raise Unprocessable(
            f"the {name or kind.__name__} body is nested too deeply (arrays and maps within "
            "arrays and maps, hundreds of levels down): flatten it"
        ) from None


#: A dict key JSON can store (``bytes`` as base64): the keys MessagePack may also carry, an
#: array (a tuple here), nil or a boolean, have no JSON form.
_JSON_KEY_TYPES = (str, int, float, bytes)


#: A key path as a linked list, innermost first: (parent trail, ".key" or "[index]"); the
#: root is (None, its name). Joined only for an error message.
_Trail = tuple[Any, str]


def storable_map(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A free-form map of a body (run config, checkpoint metadata) made storable as JSON, in
    place; ``Unprocessable`` naming the key path of a value that has no JSON form.

    JSON has no NaN or Infinity: they become the strings ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"`` (as the SDK sends them, and as metric answers spell them), where the JSON
    encoder would have stored a silent null. A MessagePack extension value, or a map key
    that is an array, nil or a boolean, cannot be stored at all: the encoder raised and the
    request got a 500. The walk keeps its own stack: a body nested as deeply as the decoder
    allows must not exhaust Python's.
    """
    stack: list[tuple[dict[Any, Any] | list[Any], _Trail]] = [(value, (None, what))]
    while stack:
        container, trail = stack.pop()
        is_map = isinstance(container, dict)
        entries = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in entries:
            if is_map and (type(key) is bool or not isinstance(key, _JSON_KEY_TYPES)):
                raise Unprocessable(
                    f"{_render(trail)} has a key {key!r} ({type(key).__name__}) that JSON "
                    "cannot store: use strings as keys"
                )
            kind = type(item)
            if kind is float:
                if not math.isfinite(item):
                    container[key] = json_float(item)
            elif kind is dict or kind is list:
                stack.append((item, (trail, _segment(key, is_map))))
            elif kind is msgspec.msgpack.Ext:
                where = _render((trail, _segment(key, is_map)))
                raise Unprocessable(
                    f"{where} is a MessagePack extension value (type {item.code}) that JSON "
                    "cannot store: send a number, string, boolean, null, array or map"
                )
    return value


def _segment(key: Any, of_map: bool) -> str:
    return f".{str(key)[:60]}" if of_map else f"[{key}]"


def _render(trail: _Trail) -> str:
    """``config.optimizer.betas[1]``."""
    segments: list[str] = []
    node: _Trail | None = trail
    while node is not None:
        node, segment = node
        segments.append(segment)
    return "".join(reversed(segments))


def _too_large(size: int, limit: int) -> str:
    return (
        f"request body of {size} bytes is larger than this server's limit of {limit} bytes; "
        "send smaller batches or raise the limit with 'pluto server --max-body-mb'"
    )


def wants_msgpack(request: Request) -> bool:
    return MSGPACK in request.headers.get("accept", "")


