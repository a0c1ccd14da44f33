"""A chunk's point columns as numpy arrays, read from MessagePack without a Python object each.

Decoding an ingest body into ``Chunk`` makes a Python int or float of every step, value and
time, and ingest then turns those lists into arrays: together about 0.18 CPU s per million
points, most of what the server spends on a point (docs/benchmarks.md). So a MessagePack
body is decoded into :class:`PackedIngestBatch`, whose chunks keep each column as the bytes
of its MessagePack array (``msgspec.Raw``), and :func:`points` reads those bytes with numpy.

MessagePack gives every element its own type byte, so an array is a fixed-stride table only
when all its elements have the same encoding. The SDK's floats always do (``0xcb`` and 8
big-endian bytes), and so do key indexes (below 128: one byte each) and the steps of most
chunks (all ``uint16``, or all ``uint32``, ...). Such an array is read as an ``(n, stride)``
byte table: if the type byte of every row is the same one and the sizes add up, element
``k`` starts at ``k * stride`` (each element before it being ``stride`` bytes long), so the
table *is* the array. Anything else (a chunk whose steps cross 127, 255 or 65535, an integer
value, a float32) is decoded by msgspec as before: the same answer, the same errors, at the
old speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

from pluto.wire import Chunk, ChunkHeader, msgpack_array_header
from pluto_server.errors import Unprocessable

__all__ = ["Array", "PackedChunk", "PackedIngestBatch", "Points", "points"]

Array: TypeAlias = npt.NDArray[Any]

_EMPTY = msgspec.Raw(b"\x90")
#: MessagePack's unsigned integer types: type byte -> big-endian dtype of what follows.
_UNSIGNED = {0xCC: ">u1", 0xCD: ">u2", 0xCE: ">u4", 0xCF: ">u8"}
_FLOAT64 = 0xCB
#: What ingest stores (``metric_blocks``): little-endian, whatever this machine's order.
_INT64 = np.dtype("<i8")
_FLOAT64_LE = np.dtype("<f8")


class PackedChunk(ChunkHeader, kw_only=True, forbid_unknown_fields=True):
    """A ``Chunk`` as the server decodes it from MessagePack: columns not yet decoded."""

    key_index: msgspec.Raw = _EMPTY
    steps: msgspec.Raw = _EMPTY
    values: msgspec.Raw = _EMPTY
    times: msgspec.Raw = _EMPTY


class PackedIngestBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An ``IngestBatch`` (the documented body) as the server decodes it from MessagePack."""

    chunks: list[PackedChunk]


@dataclass(frozen=True, slots=True)
class Points:
    """A chunk's points as arrays: int64 key indexes and steps, float64 values and times,
    little-endian. An out-of-range step or key index is -1 here (checked by ``ingest.columns``)."""

    key_index: Array
    steps: Array
    values: Array
    times: Array

    def __len__(self) -> int:
        return len(self.steps)


def points(chunk: ChunkHeader, where: str) -> Points:
    """The point columns of ``chunk`` (a ``PackedChunk`` or a ``Chunk``), as arrays.

    ``Unprocessable`` when a column is not an array of numbers, named as msgspec would
    have named it had it decoded the whole body (``$.chunks[N].steps[3]``); ``where``
    is that ``$.chunks[N]``.
    """
    if isinstance(chunk, PackedChunk):
        return Points(key_index=_integers(chunk.key_index, f"{where}.key_index"),
                      steps=_integers(chunk.steps, f"{where}.steps"),
                      values=_floats(chunk.values, f"{where}.values"),
                      times=_floats(chunk.times, f"{where}.times"))
    if isinstance(chunk, Chunk):
        return Points(key_index=_int64(chunk.key_index), steps=_int64(chunk.steps),
                      values=np.array(chunk.values, dtype=_FLOAT64_LE),
                      times=np.array(chunk.times, dtype=_FLOAT64_LE))
    raise TypeError(f"no point columns in a {type(chunk).__name__}")


def _elements(packed: msgspec.Raw) -> tuple[npt.NDArray[np.uint8], int] | None:
    """The bytes after the array's header, and how many elements they hold."""
    header = msgpack_array_header(packed)
    if header is None:
        return None
    size, count = header
    return np.frombuffer(packed, dtype=np.uint8)[size:], count


def _table(body: npt.NDArray[np.uint8], count: int,
           stride: int) -> npt.NDArray[np.uint8] | None:
    """The elements as an ``(count, stride)`` byte table, if the sizes fit."""
    return body.reshape(count, stride) if len(body) == count * stride else None


def _floats(packed: msgspec.Raw, where: str) -> Array:
    elements = _elements(packed)
    table = None if elements is None else _table(*elements, 9)
    if table is not None and (table[:, 0] == _FLOAT64).all():
        return np.ascontiguousarray(table[:, 1:]).view(">f8").reshape(-1).astype(_FLOAT64_LE)
    return np.array(_decode(packed, list[float], where), dtype=_FLOAT64_LE)


def _integers(packed: msgspec.Raw, where: str) -> Array:
    elements = _elements(packed)
    if elements is not None:
        body, count = elements
        if len(body) == count and (body < 0x80).all():  # positive fixints, a byte each
            return body.astype(_INT64)
        dtype = _UNSIGNED.get(int(body[0])) if count else None
        if dtype is not None:
            table = _table(body, count, 1 + np.dtype(dtype).itemsize)
            if table is not None and (table[:, 0] == body[0]).all():
                unsigned = np.ascontiguousarray(table[:, 1:]).view(dtype).reshape(-1)
                if dtype == ">u8" and unsigned.max() > np.iinfo(_INT64).max:
                    return np.full(count, -1, dtype=_INT64)
                return unsigned.astype(_INT64)
    return _int64(_decode(packed, list[int], where))


def _int64(numbers: list[int]) -> Array:
    try:
        return np.array(numbers, dtype=_INT64)
    except OverflowError:  # MessagePack and JSON carry integers past 2**63-1
        return np.full(len(numbers), -1, dtype=_INT64)


def _decode(packed: msgspec.Raw, kind: Any, where: str) -> Any:
    try:
        return msgspec.msgpack.decode(packed, type=kind)
    except msgspec.ValidationError as exc:
        # "... - at `$[3]`" names the element within the column: name the column too.
        message = str(exc)
        if " - at `$" in message:
            message = message.replace(" - at `$", f" - at `{where}", 1)
        else:
            message += f" - at `{where}`"
        raise Unprocessable(f"invalid IngestBatch: {message}") from None
