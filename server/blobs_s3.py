"""The S3 blob store: objects under ``s3://BUCKET/PREFIX/``, on AWS or any S3-compatible server.

boto3 is blocking, so every call runs in a worker thread (``asyncio.to_thread``): the event
loop never waits on the network. A ``put`` streams: an object smaller than one part goes up
with one ``PutObject`` once all of it arrived and was checked; a larger one becomes a
multipart upload whose parts are sent as they fill (about two parts in memory at most), and
which is completed only after the byte count and the SHA-256 of the whole stream matched.
Any failure, mismatch or cancellation aborts the upload, so nothing half-written can ever be
listed or read.

Credentials, region and endpoint come from the usual AWS variables and files (boto3 reads
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``); ``S3Options`` (the flags of ``pluto server``) win over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import boto3
import boto3.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pluto_server.blobs import (
    CHUNK_BYTES,
    BlobError,
    BlobNotFound,
    BlobStore,
    BucketNotFound,
    ObjectEntry,
    S3Options,
    SizeMismatch,
    StorageDenied,
    StorageUnavailable,
    verified,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

T = TypeVar("T")

#: S3's limits on a multipart upload: every part but the last at least 5 MiB, 10,000 parts.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000

DEFAULT_REGION = "us-east-1"

_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidSecurity", "RequestTimeTooSkewed", "403", "Forbidden",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500",
    "Throttling", "ThrottlingException", "RequestLimitExceeded",
})
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
                         "a profile in ~/.aws/credentials)")


def _is_aws(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn")) or host == "amazonaws.com"


class S3BlobStore(BlobStore):
    """Objects under ``prefix`` in ``bucket``; keys are ``/``-joined relative to ``prefix``."""

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.url = f"s3://{bucket}/{self.prefix}"
        self._session = boto3.session.Session(region_name=options.region)
        # botocore reads AWS_DEFAULT_REGION (and profiles) but not AWS_REGION, which the
        # other AWS SDKs and the CLI honour first.
        self.region = (options.region or os.environ.get("AWS_REGION")
                       or self._session.region_name or DEFAULT_REGION)
        self._client = self._make_client(path_style=options.endpoint_url is not None)
        if options.endpoint_url is None and not _is_aws(self._client.meta.endpoint_url):
            # AWS_ENDPOINT_URL (or a profile's endpoint_url) names an S3-compatible server:
            # most of them know no virtual-hosted buckets (``bucket.host``).
            self._client.close()
            self._client = self._make_client(path_style=True)
        self.endpoint = self._client.meta.endpoint_url

    def _make_client(self, *, path_style: bool) -> S3Client:
        config = Config(
            region_name=self.region,
            retries={"mode": "standard", "max_attempts": 4},
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=120,
            s3={"addressing_style": "path"} if path_style else None,
        )
        return self._session.client(
            "s3", endpoint_url=self.options.endpoint_url, region_name=self.region, config=config
        )

    # -- keys ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise BlobError(f"invalid storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def _where(self, full_key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{full_key}"

    # -- errors -------------------------------------------------------------------------

    def _access_key_id(self) -> str | None:
        with contextlib.suppress(Exception):
            credentials = self._session.get_credentials()
            if credentials is not None:
                return str(credentials.access_key)
        return None

    def _fail(self, exc: Exception, action: str, full_key: str | None = None, *,
              bucket: str | None = None, what: str | None = None) -> NoReturn:
        """Raise the blob error for a boto3/botocore failure of ``action`` (e.g. "write")
        on ``what`` (by default the object ``full_key``, or the bucket)."""
        bucket = bucket or self.bucket
        if what is None:
            what = self._where(full_key, bucket) if full_key is not None else f"s3://{bucket}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            raise StorageDenied(
                f"no usable S3 credentials to {action} {what}: set {_CREDENTIAL_VARIABLES} "
                f"for the account that may use bucket {bucket!r} ({exc})"
            ) from None
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            raise StorageUnavailable(
                f"cannot reach S3 at {self.endpoint} to {action} {what} ({exc}): check that the "
                "server runs and --s3-endpoint-url / AWS_ENDPOINT_URL point at it"
            ) from None
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = str(error.get("Message", "")) or "no detail"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            bucket = str(error.get("BucketName", "")) or bucket
            if code == "NoSuchBucket":
                raise BucketNotFound(
                    f"bucket {bucket!r} does not exist at {self.endpoint}: create it or fix "
                    "--storage"
                ) from None
            if code in _DENIED_CODES or status == 403:
                raise StorageDenied(self._denied_sentence(code, message, action, what, bucket)
                                    ) from None
            if code in _NOT_FOUND_CODES or status == 404:
                raise BlobNotFound(f"no object {what} at {self.endpoint}") from None
            if code in _UNAVAILABLE_CODES or status >= 500:
                raise StorageUnavailable(
                    f"S3 at {self.endpoint} failed to {action} {what} ({code}: {message}); "
                    "try again later"
                ) from None
            raise BlobError(
                f"S3 at {self.endpoint} refused to {action} {what}: {code}: {message}"
            ) from None
        if isinstance(exc, ParamValidationError):  # a request boto3 refuses to make: no retry
            raise BlobError(f"cannot {action} {what}: {exc}") from None
        if isinstance(exc, BotoCoreError | OSError):
            raise StorageUnavailable(
                f"S3 at {self.endpoint} failed to {action} {what}: {exc}"
            ) from None
        raise exc

    def _denied_sentence(self, code: str, message: str, action: str, what: str,
                         bucket: str) -> str:
        key_id = self._access_key_id()
        who = f"access key ID {key_id!r}" if key_id else "the configured credentials"
        if code == "InvalidAccessKeyId":
            why = f"{who} is unknown there"
        elif code == "SignatureDoesNotMatch":
            why = f"the secret access key does not belong to {who}"
        elif code in {"ExpiredToken", "InvalidToken", "TokenRefreshRequired"}:
            why = "the session token (AWS_SESSION_TOKEN) expired or is invalid"
        elif code == "RequestTimeTooSkewed":
            why = "this machine's clock is too far off the server's"
        elif code in {"403", "Forbidden", ""}:  # an answer without a body (HEAD) says no more
            why = (f"{who} is unknown there, its secret access key does not match, or it may "
                   f"not {action} in bucket {bucket!r}")
        else:
            why = f"{who} may not {action} in bucket {bucket!r}"
        return (
            f"S3 at {self.endpoint} refused to {action} {what}: {why} ({code or 403}: "
            f"{message}). Check {_CREDENTIAL_VARIABLES}, and that this identity's policy "
            f"allows it on bucket {bucket!r}"
        )

    async def _call(self, action: str, full_key: str | None, fn: Callable[..., T],
                    *args: Any, bucket: str | None = None, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            self._fail(exc, action, full_key, bucket=bucket)

    # -- the store ----------------------------------------------------------------------

    def _part_bytes(self, size: int) -> int:
        part = max(self.options.part_bytes, MIN_PART_BYTES)
        # An object so large that 10,000 parts would not hold it gets larger parts.
        return max(part, math.ceil(size / MAX_PARTS))

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, size: int,
                  sha256: str | None = None) -> str:
        full = self._key(key)
        part_bytes = self._part_bytes(size)
        multipart = size > part_bytes
        digest = hashlib.sha256()
        written = sent = 0
        # Bytes are copied once, into the buffer; a full buffer is the part's body itself.
        buffer = bytearray(min(size, part_bytes))
        filled = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []

        # Each part carries a CRC32 the server checks (as boto3's own transfers do), unless
        # AWS_REQUEST_CHECKSUM_CALCULATION=when_required turned that off for a server that
        # does not know it; an upload created with the algorithm is completed with them.
        checksum: dict[str, Any] = {}
        calculation = getattr(self._client.meta.config, "request_checksum_calculation", None)
        if calculation != "when_required":
            checksum = {"ChecksumAlgorithm": "CRC32"}

        async def send_part(body: bytearray) -> None:
            nonlocal upload_id, sent
            if upload_id is None:
                created = await self._call(
                    "write", full, self._client.create_multipart_upload,
                    Bucket=self.bucket, Key=full, **checksum)
                upload_id = created["UploadId"]
            number = len(parts) + 1
            answer = await self._call(
                "write", full, self._client.upload_part, Bucket=self.bucket, Key=full,
                UploadId=upload_id, PartNumber=number, Body=body, ContentLength=len(body),
                **checksum)
            part: CompletedPartTypeDef = {"PartNumber": number, "ETag": answer["ETag"]}
            if checksum and "ChecksumCRC32" in answer:
                part["ChecksumCRC32"] = answer["ChecksumCRC32"]
            parts.append(part)
            sent += len(body)

        try:
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise SizeMismatch(f"more than the {size} bytes announced were sent")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    step = min(len(view), len(buffer) - filled)
                    buffer[filled:filled + step] = view[:step]
                    filled += step
                    view = view[step:]
                    if multipart and filled == len(buffer):
                        await send_part(buffer)
                        buffer = bytearray(min(part_bytes, size - sent))
                        filled = 0
            actual = verified(written, size, digest, sha256)
            if not multipart:
                await self._call("write", full, self._client.put_object, Bucket=self.bucket,
                                 Key=full, Body=buffer, ContentLength=len(buffer))
                return actual
            del buffer
            await self._call(
                "write", full, self._client.complete_multipart_upload, Bucket=self.bucket,
                Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts})
            upload_id = None
            return actual
        finally:
            if upload_id is not None:
                await self._abort(full, upload_id)

    async def _abort(self, full_key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload (its parts were never visible)."""
        try:
            await asyncio.shield(asyncio.to_thread(
                self._client.abort_multipart_upload, Bucket=self.bucket, Key=full_key,
                UploadId=upload_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Its parts stay billed but invisible until a lifecycle rule removes them.
            log.warning("could not abort the multipart upload %s of %s: %s", upload_id,
                        self._where(full_key), exc)

    async def size_of(self, key: str) -> int | None:
        full = self._key(key)
        try:
            head = await self._call("read", full, self._client.head_object,
                                    Bucket=self.bucket, Key=full)
        except BlobNotFound:
            return None
        return head["ContentLength"]

    async def read(self, key: str, *, chunk_size: int = CHUNK_BYTES
                   ) -> tuple[int, AsyncIterator[bytes]]:
        full = self._key(key)
        answer = await self._call("read", full, self._client.get_object,
                                  Bucket=self.bucket, Key=full)
        body = answer["Body"]
        size = answer["ContentLength"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        chunk = await asyncio.to_thread(body.read, chunk_size)
                    except (BotoCoreError, OSError) as exc:
                        self._fail(exc, "read", full)
                    if not chunk:
                        return
                    yield chunk
            finally:
                body.close()

        return size, chunks()

    async def delete(self, key: str) -> None:
        full = self._key(key)
        with contextlib.suppress(BlobNotFound):
            await self._call("delete", full, self._client.delete_object,
                             Bucket=self.bucket, Key=full)

    async def list(self, prefix: str) -> list[ObjectEntry]:
        full_prefix = self._key(prefix)

        def walk() -> list[ObjectEntry]:
            found: list[ObjectEntry] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    full_key = item.get("Key", "")
                    if full_key.startswith(full_prefix):
                        found.append(ObjectEntry(self._relative(full_key), item.get("Size", 0)))
            return sorted(found, key=lambda entry: entry.key)

        return await self._call("list", full_prefix, walk)

    async def copy(self, src_key: str, dst_key: str, *, src_bucket: str | None = None) -> None:
        """Copy an object inside S3, without its bytes passing through this process.

        Without ``src_bucket``, ``src_key`` is a key of this store (relative to its prefix);
        with it, ``src_key`` is the object's full key in that bucket. Large objects are
        copied part by part (multipart copy), so any size works.
        """
        source_bucket = src_bucket or self.bucket
        source_key = src_key if src_bucket is not None else self._key(src_key)
        full = self._key(dst_key)
        part_bytes = self._part_bytes(0)
        transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes)
        try:
            await asyncio.to_thread(
                self._client.copy, {"Bucket": source_bucket, "Key": source_key},
                self.bucket, full, Config=transfer)
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError):
                error = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                # The source is looked at first (HeadObject): a 404 means it is missing,
                # or so is its bucket (a HEAD answer has no body to tell which).
                if error.get("Code") in _NOT_FOUND_CODES or (
                        status == 404 and error.get("Code") != "NoSuchBucket"):
                    raise BlobNotFound(
                        f"no object {self._where(source_key, source_bucket)} to copy at "
                        f"{self.endpoint} (or no bucket {source_bucket!r})"
                    ) from None
            self._fail(exc, "copy", full, what=f"{self._where(source_key, source_bucket)} to "
                       f"{self._where(full)}")

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)
