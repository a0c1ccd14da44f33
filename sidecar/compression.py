"""Ingest bodies compressed for the server: zstd where it takes it, gzip otherwise.

zstd at level 1 compresses a batch of chunks about eight times faster than gzip at level
1, and the server decompresses it about three times faster. Noisy float metrics come out
the same size (about 2.5 times smaller than the chunks, 8.4-8.7 bytes a point), repetitive
ones far smaller with zstd (docs/benchmarks.md). gzip stays for servers that have not said
they take zstd (``pluto_server.middleware.AdvertiseRequestEncodings``).

A body is built from pieces written one after the other, each compressed at once,
``PIECE`` at a time, into one buffer that ``finish`` hands over without a copy: neither the
input nor a second copy of the output is ever held whole. For a batch of one 4.5 MB chunk
that is several MB of the sidecar's peak RSS.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from typing import Literal, NamedTuple

import zstandard

__all__ = ["PIECE", "Body", "BodyStream", "Encoding", "compress_body"]

Encoding = Literal["zstd", "gzip"]

#: A body is compressed, and sent, this much at a time.
PIECE = 256 * 1024
#: zstd level 1 and gzip level 1: most of the size win for a small share of the CPU.
_LEVEL = 1
#: zstd's window: 128 KiB instead of level 1's 512 KiB. Metrics gain nothing from a longer
#: one (noisy floats compress as well, and faster), and it is sidecar memory, one window
#: for each body being built (two at once): the context takes 0.98 MB instead of 1.37.
_ZSTD_PARAMETERS = zstandard.ZstdCompressionParameters.from_level(_LEVEL, window_log=17)


class Body(NamedTuple):
    """A compressed request body and its ``Content-Encoding``."""

    data: bytes
    encoding: Encoding


class BodyStream:
    """Builds one compressed body (a zstd frame or a gzip member) from pieces.

    ``size``: how many bytes will be written in all, when known. zstd writes it into the
    frame and sizes its window to it (a decoder then needs no more memory than the body).
    """

    def __init__(self, encoding: Encoding, size: int | None = None) -> None:
        self.encoding: Encoding = encoding
        self._compressor: zstandard.ZstdCompressionObj | zlib._Compress
        if encoding == "zstd":
            # A context per body (about 20 us): bodies may be built in two threads at once.
            self._compressor = zstandard.ZstdCompressor(
                compression_params=_ZSTD_PARAMETERS).compressobj(
                    size=-1 if size is None else size)
        else:
            self._compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, 31)  # 31: gzip framing
        self._body = io.BytesIO()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), PIECE):
            self._body.write(self._compressor.compress(view[start:start + PIECE]))

    def finish(self) -> Body:
        self._body.write(self._compressor.flush())
        return Body(self._body.getvalue(), self.encoding)


def compress_body(parts: Sequence[bytes | memoryview], encoding: Encoding) -> Body:
    """``parts`` joined and compressed, without joining them."""
    stream = BodyStream(encoding, sum(len(part) for part in parts))
    for part in parts:
        stream.write(part)
    return stream.finish()
