"""Files and checkpoints: the operations behind their routes.

Bytes stream between the request and the blob store in ``CHUNK_BYTES`` pieces, so a
checkpoint of any size costs a few MB of server memory. Database work runs in worker
threads (``Service`` is synchronous); store work stays on the event loop, where the
stores hand blocking calls to threads themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.wire import (
    BlobsMissing,
    BlobStored,
    CheckpointCreate,
    CheckpointFork,
    CheckpointInfo,
    CheckpointList,
    FileCreate,
    FileEntry,
    FileInfo,
    FileList,
)
from pluto_server import art, checkpoints
from pluto_server.auth import KeyIdentity
from pluto_server.blobs import (
    BlobError,
    BlobNotFound,
    BlobStore,
    BucketNotFound,
    ChecksumMismatch,
    S3Options,
    SizeMismatch,
    StorageDenied,
    StorageUnavailable,
    blob_key,
    open_store,
)
from pluto_server.errors import ApiError, BadRequest, Forbidden, NotFound, Unprocessable
from pluto_server.naming import check_storable_text
from pluto_server.runs import RunRow
from pluto_server.service import Service

T = TypeVar("T")

MAX_CHECKED_BLOBS = 100_000
#: What S3-compatible stores accept as a bucket name (AWS is stricter: lowercase, 3-63).
BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
#: An ART project or model name: one path segment of the bucket's layout.
ART_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9 ._@+=-]{0,255}$")


class StorageError(ApiError):
    """The server's storage failed or refused it: the operator has to act."""

    status_code = 502


class StorageBusy(ApiError):
    status_code = 503


@contextlib.contextmanager
def storage_errors(where: str, *, ours: bool = True) -> Iterator[None]:
    """Blob store errors as API answers; ``where`` says which storage it was. A bucket
    or object missing from the server's own storage, or its credentials refused there, is
    the operator's problem (502); from a bucket the caller named, it is the caller's (404,
    and 403 for a bucket the server's credentials may not read)."""
    try:
        yield
    except (ChecksumMismatch, SizeMismatch) as exc:
        raise Unprocessable(str(exc)) from None
    except (BlobNotFound, BucketNotFound) as exc:
        if ours:
            raise StorageError(f"{where}: {exc}") from None
        raise NotFound(f"{where}: {exc}") from None
    except StorageDenied as exc:
        if ours:
            raise StorageError(f"{where} refused the server's credentials: {exc}") from None
        raise Forbidden(f"{where} refused the server's credentials: {exc}; name a bucket "
                        "that the server's S3 credentials may read") from None
    except StorageUnavailable as exc:
        raise StorageBusy(f"{where} is unreachable, try again: {exc}") from None
    except BlobError as exc:
        raise StorageError(f"{where}: {exc}") from None


class Transfers:
    def __init__(self, service: Service, store: BlobStore, s3: S3Options) -> None:
        self.service = service
        self.store = store
        self.s3 = s3

    async def _db(self, func: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(func, *args)

    async def _write(self, func: Callable[[Connection], T]) -> T:
        """``func`` in a write transaction, once more if a concurrent writer won a unique
        constraint race (two ranks committing one step): the second try sees its row."""

        def attempt() -> T:
            with self.service.db.write() as conn:
                return func(conn)

        try:
            return await self._db(attempt)
        except sa.exc.IntegrityError:
            return await self._db(attempt)

    async def _run(self, ref: str, project: str | None, who: KeyIdentity | None) -> RunRow:
        return await self._db(self.service.find, ref, project, who)

    # -- blobs --------------------------------------------------------------

    async def missing(self, ref: str, project: str | None, who: KeyIdentity | None,
                      shas: list[str]) -> BlobsMissing:
        run = await self._run(ref, project, who)
        if len(shas) > MAX_CHECKED_BLOBS:
            raise Unprocessable(f"check at most {MAX_CHECKED_BLOBS} blobs per request")
        for sha in shas:
            checkpoints.check_sha256(sha)

        def query() -> dict[str, int]:
            with self.service.db.read() as conn:
                # Only this project's: another project's blob is uploaded again (its bytes
                # are stored once), so that nobody names bytes they could not produce.
                return checkpoints.blob_sizes(conn, sorted(set(shas)), run.project_id)

        known = await self._db(query)
        return BlobsMissing(missing=[sha for sha in dict.fromkeys(shas) if sha not in known])

    async def upload(self, ref: str, project: str | None, who: KeyIdentity | None,
                     sha256: str, size: int | None, body: AsyncIterator[bytes]) -> BlobStored:
        run = await self._run(ref, project, who)
        checkpoints.check_sha256(sha256)
        if size is None:
            raise BadRequest("a blob upload needs a Content-Length header (its size)")
        with storage_errors(f"storage {self.store.url}"):
            await self.store.put(blob_key(sha256), body, size=size, sha256=sha256)
        await self._record(sha256, size, run.project_id)
        return BlobStored(sha256=sha256, size=size)

    async def _record(self, sha256: str, size: int, project_id: int | None = None) -> None:
        await self._write(lambda conn: checkpoints.record_blob(conn, sha256, size, project_id))

    async def _have(self, sha256: str) -> bool:
        def query() -> bool:
            with self.service.db.read() as conn:
                return bool(checkpoints.blob_sizes(conn, [sha256]))

        return await self._db(query)

    async def _stream(self, entry: FileEntry) -> AsyncIterator[bytes]:
        with storage_errors(f"storage {self.store.url}"):
            size, chunks = await self.store.read(blob_key(entry.sha256))
        if size != entry.size:
            raise StorageError(f"storage {self.store.url} holds {size} bytes for "
                               f"{entry.path!r}, not {entry.size}: it was changed outside pluto")
        return chunks

    # -- checkpoints --------------------------------------------------------

    async def commit(self, ref: str, project: str | None, who: KeyIdentity | None,
                     req: CheckpointCreate) -> tuple[CheckpointInfo, bool]:
        checkpoints.check_manifest(req)
        run = await self._run(ref, project, who)
        return await self._write(lambda conn: checkpoints.create_checkpoint(conn, run.id, req))

    async def list(self, ref: str, project: str | None, who: KeyIdentity | None,
                   lineage_view: bool) -> CheckpointList:
        run = await self._run(ref, project, who)

        def read() -> list[CheckpointInfo]:
            with self.service.db.read() as conn:
                return checkpoints.list_checkpoints(conn, run.id, lineage_view=lineage_view)

        return CheckpointList(checkpoints=await self._db(read))

    async def resolve(self, ref: str, project: str | None, who: KeyIdentity | None, *,
                      not_after_step: int | None, step: int | None) -> CheckpointInfo:
        run = await self._run(ref, project, who)

        def read() -> CheckpointInfo:
            with self.service.db.read() as conn:
                return checkpoints.resolve(conn, run.id, run.display_id,
                                           not_after_step=not_after_step, step=step)

        return await self._db(read)

    async def checkpoint_file(self, ref: str, project: str | None, who: KeyIdentity | None,
                              step: int, path: str
                              ) -> tuple[FileEntry, AsyncIterator[bytes]]:
        run = await self._run(ref, project, who)

        def read() -> CheckpointInfo | None:
            with self.service.db.read() as conn:
                return checkpoints.get_checkpoint(conn, run.id, step)

        info = await self._db(read)
        if info is None:
            raise NotFound(f"run {run.display_id} has no checkpoint at step {step}; list them "
                           f"with 'pluto checkpoints list {run.display_id}'")
        entry = checkpoints.checkpoint_file(info, path)
        return entry, await self._stream(entry)

    async def fork(self, ref: str, project: str | None, who: KeyIdentity | None,
                   req: CheckpointFork) -> tuple[CheckpointInfo, bool]:
        target = await self._run(ref, project, who)
        check_storable_text(req.from_run, "from_run")
        check_storable_text(req.from_project or "", "from_project")
        if req.not_after_step is not None:
            checkpoints.check_step(req.not_after_step, "not_after_step")
        if req.from_s3_bucket:
            if who is not None and who.project is not None:
                # The server reads the bucket with its own S3 credentials, which reach any
                # bucket they can read, whoever's: not for a key limited to one project.
                raise Forbidden(f"this API key is limited to project {who.project!r}; "
                                "importing from an S3 bucket (from_s3_bucket) needs a key "
                                "that is not limited to a project")
            return await self._import_art(target, req)
        source_run = await self._run(req.from_run, req.from_project or target.project, who)

        def write(conn: Connection) -> tuple[CheckpointInfo, bool]:
            source = checkpoints.resolve(conn, source_run.id, source_run.display_id,
                                         not_after_step=req.not_after_step)
            return checkpoints.fork_into(conn, target.id, source)

        return await self._write(write)

    async def _import_art(self, target: RunRow, req: CheckpointFork) -> tuple[CheckpointInfo,
                                                                             bool]:
        assert req.from_s3_bucket is not None
        bucket = req.from_s3_bucket.removeprefix("s3://").strip("/")
        if not BUCKET_NAME.match(bucket):
            raise Unprocessable(f"from_s3_bucket {req.from_s3_bucket!r} is not a bucket name: "
                                "use letters, digits, '.', '-' or '_' (or s3://NAME)")
        project = req.from_project or target.project
        for what, name in (("from_run (the ART model)", req.from_run),
                           ("from_project (the ART project)", project)):
            if not ART_NAME.match(name) or name in (".", ".."):
                raise Unprocessable(f"{what} {name!r} is not a name ART uses: one path "
                                    "segment of letters, digits and . _ - @ + = or spaces")
        where = f"bucket {bucket!r}"
        with storage_errors(where, ours=False):
            source = open_store(f"s3://{bucket}", self.s3)
        try:
            with storage_errors(where, ours=False):
                found = await art.find(source, project, req.from_run, req.not_after_step)
            # Before a byte is copied: paths a download could not write are refused.
            checkpoints.check_file_paths([obj.key[len(found.prefix):] for obj in found.objects],
                                         f"the ART object under {found.prefix!r} at")
            with storage_errors(f"storage {self.store.url}"):
                files = await art.import_files(source, found, self.store, self._have,
                                               self._record)
        finally:
            await source.close()
        request = CheckpointCreate(step=found.step, files=files,
                                   metadata={"imported_from": "art"})

        return await self._write(lambda conn: checkpoints.create_checkpoint(
            conn, target.id, request, source_uri=f"s3://{bucket}/{found.prefix}"))

    # -- run files ----------------------------------------------------------

    async def commit_file(self, ref: str, project: str | None, who: KeyIdentity | None,
                          req: FileCreate) -> tuple[FileInfo, bool]:
        run = await self._run(ref, project, who)
        return await self._write(lambda conn: checkpoints.create_file(conn, run.id, req))

    async def list_files(self, ref: str, project: str | None, who: KeyIdentity | None
                         ) -> FileList:
        run = await self._run(ref, project, who)

        def read() -> list[FileInfo]:
            with self.service.db.read() as conn:
                return checkpoints.list_files(conn, run.id)

        return FileList(files=await self._db(read))

    async def file(self, ref: str, project: str | None, who: KeyIdentity | None, name: str
                   ) -> tuple[FileEntry, AsyncIterator[bytes]]:
        run = await self._run(ref, project, who)

        def read() -> FileInfo | None:
            with self.service.db.read() as conn:
                return checkpoints.get_file(conn, run.id, name)

        info = await self._db(read)
        if info is None:
            raise NotFound(f"run {run.display_id} has no file named {name!r}")
        entry = FileEntry(path=info.name, size=info.size, sha256=info.sha256)
        return entry, await self._stream(entry)
