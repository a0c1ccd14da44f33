"""Where the bytes of files and checkpoints live: content-addressed, immutable blobs.

A blob's key is derived from its SHA-256 (``blob_key``), so a checkpoint that is forked
to another run, or a file uploaded twice, is stored once: forking a checkpoint copies
its manifest, never its bytes. A store writes a blob so that it becomes visible only
whole and verified: the local store renames a fully written, fsynced temporary file; the
S3 store completes a multipart upload only after the byte count and the digest matched.
An interrupted upload therefore never leaves a blob that anything could list.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

#: Bytes read or written per step: the unit of bounded memory in both directions.
CHUNK_BYTES = 1024 * 1024


class BlobError(Exception):
    """A storage problem, with a sentence that says what to change."""


class BlobNotFound(BlobError):
    pass


class BucketNotFound(BlobError):
    pass


class StorageDenied(BlobError):
    """The store refused the credentials, or they do not allow this operation."""


class StorageUnavailable(BlobError):
    """The store could not be reached (worth retrying)."""


class ChecksumMismatch(BlobError):
    pass


class SizeMismatch(BlobError):
    pass


@dataclass(frozen=True)
class ObjectEntry:
    key: str  # relative to the store's root
    size: int


def verified(written: int, size: int, digest: hashlib._Hash, sha256: str | None) -> str:
    """The digest of a finished upload, or the error that keeps it from being stored."""
    if written != size:
        raise SizeMismatch(f"{written} bytes arrived of the {size} announced")
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256:
        raise ChecksumMismatch(
            f"the bytes received hash to sha256 {actual}, not the {sha256} announced; "
            "the file changed while it was uploaded, or was corrupted on the way"
        )
    return actual


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


class BlobStore(abc.ABC):
    """Keys are ``/``-separated paths relative to the store's root (directory or prefix)."""

    #: Where the store is, for logs and the health answer (``file:///...``, ``s3://b/p``).
    url: str

    @abc.abstractmethod
    async def put(self, key: str, chunks: AsyncIterable[bytes], *, size: int,
                  sha256: str | None = None) -> str:
        """Store exactly ``size`` bytes under ``key`` and return their SHA-256 (hex).

        The object becomes visible only once all of it is written and, when ``sha256``
        is given, its digest matched: otherwise ``SizeMismatch`` or ``ChecksumMismatch``
        is raised and nothing is left behind. An existing object under ``key`` is
        replaced (blobs are content-addressed, so it held the same bytes).
        """

    @abc.abstractmethod
    async def size_of(self, key: str) -> int | None:
        """The object's size, or None when there is none."""

    @abc.abstractmethod
    async def read(self, key: str, *, chunk_size: int = CHUNK_BYTES
                   ) -> tuple[int, AsyncIterator[bytes]]:
        """The object's size and its bytes in chunks; ``BlobNotFound`` when missing."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object (no error when it is already gone)."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[ObjectEntry]:
        """Every object whose key starts with ``prefix``, sorted by key."""

    async def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections."""


class LocalBlobStore(BlobStore):
    """A directory: objects are files, written to ``.tmp/`` and renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        # A server killed mid-upload leaves a temporary file; it was never visible.
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path.is_relative_to(self._tmp):
            raise BlobError(f"invalid storage key {key!r}")
        return path

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, size: int,
                  sha256: str | None = None) -> str:
        final = self._path(key)
        temporary = self._tmp / uuid.uuid4().hex
        digest = hashlib.sha256()
        written = 0
        handle = await asyncio.to_thread(open, temporary, "wb")
        try:
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise SizeMismatch(f"more than the {size} bytes announced were sent")
                digest.update(chunk)
                await asyncio.to_thread(handle.write, chunk)
            actual = verified(written, size, digest, sha256)
            await asyncio.to_thread(_flush_and_sync, handle)
            handle.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, final)
            await asyncio.to_thread(_sync_directory, final.parent)
            return actual
        finally:
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    async def size_of(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    async def read(self, key: str, *, chunk_size: int = CHUNK_BYTES
                   ) -> tuple[int, AsyncIterator[bytes]]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"no object {key!r} in {self.url}") from None
        size = os.fstat(handle.fileno()).st_size

        async def chunks() -> AsyncIterator[bytes]:
            with handle:
                while chunk := await asyncio.to_thread(handle.read, chunk_size):
                    yield chunk

        return size, chunks()

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    async def list(self, prefix: str) -> list[ObjectEntry]:
        # Walk only the deepest directory the prefix names, not the whole store.
        directory = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root

        def walk() -> list[ObjectEntry]:
            found: list[ObjectEntry] = []
            if not directory.is_dir():
                return found
            for path in directory.rglob("*"):
                if path.is_file() and not path.is_relative_to(self._tmp):
                    key = path.relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        found.append(ObjectEntry(key, path.stat().st_size))
            return sorted(found, key=lambda entry: entry.key)

        return await asyncio.to_thread(walk)


def _flush_and_sync(handle: object) -> None:
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 beyond what boto3 reads from the usual AWS variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``): flags of ``pluto server`` that win over them."""

    endpoint_url: str | None = None
    region: str | None = None
    #: Parts of a multipart upload; also the threshold above which one is used.
    part_bytes: int = 16 * 1024 * 1024


def open_store(url: str, s3: S3Options | None = None) -> BlobStore:
    """``/path``, ``file:///path`` or ``s3://bucket/prefix``."""
    if url.startswith("s3://"):
        from pluto_server.blobs_s3 import S3BlobStore

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise BlobError(f"storage URL {url!r} names no bucket: use s3://BUCKET/PREFIX")
        return S3BlobStore(bucket, prefix.strip("/"), s3 or S3Options())
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise BlobError(f"unknown storage URL {url!r}: use a directory, file:///DIR or "
                        "s3://BUCKET/PREFIX")
    return LocalBlobStore(Path(url))
