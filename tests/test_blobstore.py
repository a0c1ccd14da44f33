"""The blob store contract, on a directory and on a real S3 server (SeaweedFS).

Every contract test runs against both stores: the local one in ``tmp_path`` and the S3 one
under a fresh prefix of a bucket on the session's S3 server, with 5 MiB parts so that a
12 MiB object is a three-part multipart upload. The S3-only tests cover what only S3 has:
no multipart upload left open after a failure, server-side copies across buckets,
credentials refused, missing buckets, unreachable endpoints, the AWS variables, and bounded
memory on a 200 MiB stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from support.s3_server import S3Server

from pluto_server.blobs import (
    BlobNotFound,
    BlobStore,
    BucketNotFound,
    ChecksumMismatch,
    LocalBlobStore,
    ObjectEntry,
    S3Options,
    SizeMismatch,
    StorageDenied,
    StorageUnavailable,
    blob_key,
    open_store,
)
from pluto_server.blobs_s3 import S3BlobStore

MiB = 1024 * 1024
PART = 5 * MiB
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stream(data: bytes, piece: int = 777_777) -> AsyncIterator[bytes]:
    """``data`` in odd-sized pieces, so that parts never line up with chunks."""
    for start in range(0, len(data), piece):
        yield data[start:start + piece]


async def collect(store: BlobStore, key: str, chunk_size: int = MiB) -> tuple[int, bytes]:
    size, chunks = await store.read(key, chunk_size=chunk_size)
    return size, b"".join([chunk async for chunk in chunks])


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_server: S3Server
            ) -> dict[str, str]:
    """Only the test server's AWS variables: no profile, no ~/.aws, no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return {"AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}


@pytest.fixture(scope="module")
def s3_buckets(s3_server: S3Server) -> tuple[str, str]:
    """Two buckets for this module's tests, each test under prefixes of its own: SeaweedFS
    grows storage volumes for a bucket on its first write (up to a second), once."""
    buckets = (s3_server.create_bucket(), s3_server.create_bucket())
    for bucket in buckets:
        s3_server.client().put_object(Bucket=bucket, Key="warm-up", Body=b"")
        s3_server.client().delete_object(Bucket=bucket, Key="warm-up")
    return buckets


@pytest.fixture
def make_s3(s3_server: S3Server, s3_buckets: tuple[str, str], aws_env: dict[str, str]
            ) -> Iterator[Callable[..., S3BlobStore]]:
    """``make_s3(bucket=None, prefix=None, **S3Options)``: a store on the test server, by
    default in this module's first bucket under a prefix no other store has; closed after
    the test."""
    made: list[S3BlobStore] = []

    def make(bucket: str | None = None, prefix: str | None = None,
             **options: Any) -> S3BlobStore:
        options.setdefault("endpoint_url", s3_server.endpoint_url)
        options.setdefault("part_bytes", PART)
        if prefix is None:
            prefix = f"t{secrets.token_hex(5)}/runs"
        store = S3BlobStore(bucket or s3_buckets[0], prefix, S3Options(**options))
        made.append(store)
        return store

    yield make
    for store in made:
        run(store.close())


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    make: Callable[..., S3BlobStore] = request.getfixturevalue("make_s3")
    return make()


def open_uploads(store: BlobStore, s3_server: S3Server | None) -> list[Any]:
    """The multipart uploads left open in an S3 store's bucket (none for a local store)."""
    if not isinstance(store, S3BlobStore):
        return []
    assert s3_server is not None
    answer = s3_server.client().list_multipart_uploads(Bucket=store.bucket,
                                                       Prefix=f"{store.prefix}/")
    return list(answer.get("Uploads", []))


def assert_nothing_left(store: BlobStore, key: str, request: pytest.FixtureRequest) -> None:
    assert run(store.size_of(key)) is None
    assert run(store.list("")) == []
    if isinstance(store, LocalBlobStore):
        assert list((store.root / ".tmp").iterdir()) == []
    else:
        assert open_uploads(store, request.getfixturevalue("s3_server")) == []
        with pytest.raises(BlobNotFound):
            run(collect(store, key))


# -- the contract, on both stores ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 12 * MiB], ids=["empty", "small", "multipart"])
def test_round_trip(store: BlobStore, size: int, s3_server: S3Server) -> None:
    data = os.urandom(size)
    key = blob_key(sha(data))
    assert run(store.put(key, stream(data), size=size, sha256=sha(data))) == sha(data)
    assert run(store.size_of(key)) == size
    got_size, got = run(collect(store, key, chunk_size=300_000))
    assert got_size == size
    assert sha(got) == sha(data)
    assert run(store.list("blobs/")) == [ObjectEntry(key, size)]
    if isinstance(store, S3BlobStore):
        head = s3_server.client().head_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")
        assert head["ContentLength"] == size
        # A multipart object's ETag ends in "-PARTS": 12 MiB went up as 5 + 5 + 2 MiB.
        assert head["ETag"].strip('"').endswith("-3") == (size > PART)
        assert open_uploads(store, s3_server) == []


def test_put_without_a_digest_returns_it(store: BlobStore) -> None:
    data = os.urandom(6 * MiB)
    assert run(store.put("files/a.bin", stream(data), size=len(data))) == sha(data)
    assert sha(run(collect(store, "files/a.bin"))[1]) == sha(data)


def test_put_replaces_an_existing_object(store: BlobStore) -> None:
    run(store.put("k", stream(b"first version"), size=13))
    run(store.put("k", stream(b"second"), size=6))
    assert run(collect(store, "k")) == (6, b"second")


@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["small", "multipart"])
def test_checksum_mismatch_leaves_nothing(store: BlobStore, size: int,
                                          request: pytest.FixtureRequest) -> None:
    data = os.urandom(size)
    wrong = sha(data + b"x")
    with pytest.raises(ChecksumMismatch, match=f"hash to sha256 {sha(data)}, not the {wrong}"):
        run(store.put("blobs/k", stream(data), size=size, sha256=wrong))
    assert_nothing_left(store, "blobs/k", request)


@pytest.mark.parametrize("sent,announced", [
    (1000, 1001), (1001, 1000), (12 * MiB, 12 * MiB + 1), (12 * MiB, 11 * MiB), (0, 5),
], ids=["small-short", "small-long", "multipart-short", "multipart-long", "nothing-sent"])
def test_size_mismatch_leaves_nothing(store: BlobStore, sent: int, announced: int,
                                      request: pytest.FixtureRequest) -> None:
    data = os.urandom(sent)
    with pytest.raises(SizeMismatch, match=r"bytes (arrived|announced)"):
        run(store.put("blobs/k", stream(data), size=announced, sha256=sha(data)))
    assert_nothing_left(store, "blobs/k", request)


@pytest.mark.parametrize("fail_after", [3 * 777_777, 10 * 777_777], ids=["first-part",
                                                                           "third-part"])
def test_stream_that_fails_midway_leaves_nothing(store: BlobStore, fail_after: int,
                                                  request: pytest.FixtureRequest) -> None:
    data = os.urandom(12 * MiB)

    async def broken() -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in stream(data):
            if sent >= fail_after:
                raise ConnectionResetError("the client went away")
            sent += len(chunk)
            yield chunk

    with pytest.raises(ConnectionResetError, match="went away"):
        run(store.put("blobs/k", broken(), size=len(data), sha256=sha(data)))
    assert_nothing_left(store, "blobs/k", request)


def test_cancelled_put_leaves_nothing(store: BlobStore, request: pytest.FixtureRequest) -> None:
    data = os.urandom(12 * MiB)
    reached = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        async for chunk in stream(data[:11 * MiB]):
            yield chunk
        reached.set()
        await asyncio.sleep(3600)

    async def scenario() -> None:
        task = asyncio.create_task(store.put("blobs/k", stalls(), size=len(data)))
        await asyncio.wait_for(reached.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert_nothing_left(store, "blobs/k", request)


def test_missing_object(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound, match="no object"):
        run(store.read("blobs/none"))
    assert run(store.size_of("blobs/none")) is None
    run(store.delete("blobs/none"))  # no error


def test_list_by_prefix(store: BlobStore) -> None:
    contents = {"runs/a/x": b"1", "runs/a/y/z": b"22", "runs/ab": b"333", "runs/b/w": b"4444",
                "other": b""}
    for key, data in contents.items():
        run(store.put(key, stream(data), size=len(data)))
    assert run(store.list("runs/a/")) == [ObjectEntry("runs/a/x", 1),
                                          ObjectEntry("runs/a/y/z", 2)]
    assert [e.key for e in run(store.list("runs/a"))] == ["runs/a/x", "runs/a/y/z", "runs/ab"]
    assert run(store.list("")) == sorted(
        (ObjectEntry(k, len(v)) for k, v in contents.items()), key=lambda e: e.key)
    assert run(store.list("nothing/")) == []


def test_delete(store: BlobStore) -> None:
    run(store.put("runs/a/x", stream(b"abc"), size=3))
    run(store.put("runs/a/y", stream(b"de"), size=2))
    run(store.delete("runs/a/x"))
    assert run(store.size_of("runs/a/x")) is None
    with pytest.raises(BlobNotFound):
        run(store.read("runs/a/x"))
    assert run(store.list("runs/")) == [ObjectEntry("runs/a/y", 2)]


# -- S3 only ---------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(make_s3: Callable[..., S3BlobStore],
                                       s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    nested = make_s3(bucket, prefix="/team/project/")
    bare = make_s3(bucket, prefix="")
    assert nested.url == f"s3://{bucket}/team/project"
    run(nested.put("blobs/x", stream(b"nested"), size=6))
    run(bare.put("top", stream(b"bare"), size=4))
    raw = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(item["Key"] for item in raw) == ["team/project/blobs/x", "top"]
    assert run(nested.list("")) == [ObjectEntry("blobs/x", 6)]
    assert run(bare.list("")) == [ObjectEntry("team/project/blobs/x", 6), ObjectEntry("top", 4)]
    assert run(collect(bare, "team/project/blobs/x")) == (6, b"nested")


def test_open_store_s3_url(s3_server: S3Server, s3_buckets: tuple[str, str],
                           aws_env: dict[str, str]) -> None:
    bucket, prefix = s3_buckets[0], f"{secrets.token_hex(4)}/some/prefix"
    store = open_store(f"s3://{bucket}/{prefix}/",
                       S3Options(endpoint_url=s3_server.endpoint_url))
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.url) == (bucket, prefix, f"s3://{bucket}/{prefix}")
    run(store.put("k", stream(b"x"), size=1))
    assert run(store.size_of("k")) == 1
    run(store.close())


def test_endpoint_and_region_from_aws_variables(
        s3_server: S3Server, s3_buckets: tuple[str, str], aws_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL alone reaches the server (path-style addressing follows from it);
    the region defaults to us-east-1, AWS_REGION sets it, S3Options.region wins."""
    bucket = s3_buckets[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = S3BlobStore(bucket, secrets.token_hex(4), S3Options())
    assert store.endpoint == s3_server.endpoint_url
    assert store.region == "us-east-1"
    run(store.put("k", stream(b"via env"), size=7))
    assert run(collect(store, "k")) == (7, b"via env")
    run(store.close())
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert S3BlobStore(bucket, "p", S3Options()).region == "eu-central-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert S3BlobStore(bucket, "p", S3Options()).region == "eu-central-1"
    monkeypatch.delenv("AWS_REGION")
    assert S3BlobStore(bucket, "p", S3Options()).region == "us-west-2"
    assert S3BlobStore(bucket, "p", S3Options(region="ap-south-1")).region == "ap-south-1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    aws = S3BlobStore(bucket, "p", S3Options(region="eu-west-1"))
    assert aws.endpoint == "https://s3.eu-west-1.amazonaws.com"


def test_s3_multipart_without_part_checksums(make_s3: Callable[..., S3BlobStore],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """For servers that know no x-amz-checksum-*: the AWS variable that turns them off."""
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    store = make_s3()
    data = os.urandom(11 * MiB)
    assert run(store.put("k", stream(data), size=len(data), sha256=sha(data))) == sha(data)
    assert sha(run(collect(store, "k"))[1]) == sha(data)


@pytest.mark.parametrize("size", [1000, 12 * MiB], ids=["small", "multipart"])
def test_s3_copy_across_buckets(make_s3: Callable[..., S3BlobStore], s3_server: S3Server,
                                s3_buckets: tuple[str, str], size: int) -> None:
    data = os.urandom(size)
    source = make_s3(s3_buckets[1])
    target = make_s3(s3_buckets[0])
    run(source.put("ckpt/model.pt", stream(data), size=size))
    # From another bucket: the source key is the object's full key there.
    run(target.copy(f"{source.prefix}/ckpt/model.pt", blob_key(sha(data)),
                    src_bucket=source.bucket))
    assert run(target.size_of(blob_key(sha(data)))) == size
    assert sha(run(collect(target, blob_key(sha(data))))[1]) == sha(data)
    head = s3_server.client().head_object(Bucket=target.bucket,
                                          Key=f"{target.prefix}/{blob_key(sha(data))}")
    assert head["ETag"].strip('"').endswith("-3") == (size > PART)  # a multipart copy
    # Within the store: both keys are relative to its prefix.
    run(target.copy(blob_key(sha(data)), "runs/r2/model.pt"))
    assert sha(run(collect(target, "runs/r2/model.pt"))[1]) == sha(data)
    assert run(source.list("")) == [ObjectEntry("ckpt/model.pt", size)]
    assert run(target.list("")) == [ObjectEntry(blob_key(sha(data)), size),
                                    ObjectEntry("runs/r2/model.pt", size)]
    assert open_uploads(target, s3_server) == []


def test_s3_copy_of_a_missing_object(make_s3: Callable[..., S3BlobStore]) -> None:
    store = make_s3()
    with pytest.raises(BlobNotFound, match="no-such-key"):
        run(store.copy("no-such-key", "dst"))
    with pytest.raises(BlobNotFound, match="nobody-has-this-bucket"):
        run(store.copy("k", "dst", src_bucket="nobody-has-this-bucket"))
    assert run(store.list("")) == []


def _operations(store: S3BlobStore, size: int = 100
                ) -> dict[str, Callable[[], Coroutine[Any, Any, Any]]]:
    """Each operation of the store, by name, as a function that makes its coroutine."""
    return {
        "put": lambda: store.put("k", stream(os.urandom(size)), size=size),
        "put-multipart": lambda: store.put("k", stream(os.urandom(12 * MiB)), size=12 * MiB),
        "read": lambda: store.read("k"),
        "size_of": lambda: store.size_of("k"),
        "list": lambda: store.list(""),
        "delete": lambda: store.delete("k"),
        "copy": lambda: store.copy("k", "k2"),
    }


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret"])
def test_s3_wrong_credentials(make_s3: Callable[..., S3BlobStore], s3_server: S3Server,
                              monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    secret = "ThisIsNotTheRightSecret" + os.urandom(8).hex()
    if which == "unknown-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOBODYHASTHIS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = make_s3()
    s3_server.client().put_object(Bucket=store.bucket, Key=f"{store.prefix}/k", Body=b"there")
    for name, operation in _operations(store).items():
        with pytest.raises(StorageDenied) as caught:
            run(operation())
        message = str(caught.value)
        assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message, name
        assert secret not in message and s3_server.secret_key not in message, name
        assert store.endpoint in message, name
        if name in {"size_of", "copy"}:  # a HEAD answer has no body: no error code says why
            assert "is unknown there, its secret access key does not match, or it may not " \
                f"{'read' if name == 'size_of' else 'copy'} in bucket" in message, message
        else:
            assert ("'AKIANOBODYHASTHIS' is unknown" if which == "unknown-key"
                    else "secret access key does not belong") in message, (name, message)
    objects = s3_server.client().list_objects_v2(Bucket=store.bucket,
                                                 Prefix=f"{store.prefix}/")["Contents"]
    assert [(item["Key"], item["Size"]) for item in objects] == [(f"{store.prefix}/k", 5)]
    assert open_uploads(store, s3_server) == []


def test_s3_identity_without_write_permission(
        make_s3: Callable[..., S3BlobStore], s3_server: S3Server,
        monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make_s3()
    bucket = writer.bucket
    run(writer.put("k", stream(b"readable"), size=8))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.reader_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.reader_secret_key)
    reader = make_s3(bucket, prefix=writer.prefix)
    assert run(collect(reader, "k")) == (8, b"readable")
    for size in (10, 12 * MiB):
        with pytest.raises(StorageDenied, match=f"may not write in bucket '{bucket}'") as caught:
            run(reader.put("new", stream(os.urandom(size)), size=size))
        assert s3_server.reader_secret_key not in str(caught.value)
    assert [entry.key for entry in run(reader.list(""))] == ["k"]
    assert open_uploads(reader, s3_server) == []


def test_s3_no_credentials(make_s3: Callable[..., S3BlobStore],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = make_s3("any-bucket")
    for name, operation in _operations(store).items():
        with pytest.raises(StorageDenied, match=r"no usable S3 credentials .* set "
                           r"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            run(operation())
        assert name


def test_s3_missing_bucket(make_s3: Callable[..., S3BlobStore], s3_server: S3Server) -> None:
    store = make_s3("no-bucket-by-this-name")
    for name, operation in _operations(store).items():
        if name == "size_of":
            # A HEAD answer has no body to say which is missing: no bucket reads as no object.
            assert run(operation()) is None
            continue
        if name == "copy":  # the source is looked at first, with a HEAD: see above
            with pytest.raises(BlobNotFound, match="no-bucket-by-this-name"):
                run(operation())
            continue
        with pytest.raises(BucketNotFound) as caught:
            run(operation())
        assert str(caught.value) == (
            f"bucket 'no-bucket-by-this-name' does not exist at {s3_server.endpoint_url}: "
            "create it or fix --storage"), name


def test_s3_unreachable(make_s3: Callable[..., S3BlobStore]) -> None:
    with socket.socket() as sock:  # a port nothing listens on: bind one, then let it go
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = make_s3("some-bucket", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    for name, operation in _operations(store).items():
        with pytest.raises(StorageUnavailable, match=f"cannot reach S3 at http://127.0.0.1:"
                           f"{port}.*AWS_ENDPOINT_URL"):
            run(operation())
        assert name
    assert time.monotonic() - started < 60


# -- bounded memory --------------------------------------------------------------------


class PeakRss:
    """The highest RSS of this process while in the ``with`` block (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@pytest.mark.slow
def test_s3_put_and_read_200_mib_in_bounded_memory(
        make_s3: Callable[..., S3BlobStore], s3_server: S3Server) -> None:
    total, piece = 200 * MiB, 256 * 1024
    store = make_s3(part_bytes=8 * MiB)
    block = os.urandom(piece)

    async def generated() -> AsyncIterator[bytes]:
        for index in range(total // piece):
            yield index.to_bytes(8, "big") + block[8:]  # every piece distinct

    expected = hashlib.sha256()
    for index in range(total // piece):
        expected.update(index.to_bytes(8, "big") + block[8:])

    async def read_back() -> tuple[int, str]:
        size, chunks = await store.read("big", chunk_size=MiB)
        digest = hashlib.sha256()
        async for chunk in chunks:
            digest.update(chunk)
        return size, digest.hexdigest()

    run(store.put("warm-up", stream(os.urandom(9 * MiB)), size=9 * MiB))  # pools, threads
    baseline = psutil.Process().memory_info().rss
    with PeakRss() as during_put:
        digest = run(store.put("big", generated(), size=total, sha256=expected.hexdigest()))
    assert digest == expected.hexdigest()
    with PeakRss() as during_read:
        assert run(read_back()) == (total, expected.hexdigest())
    grown_put = (during_put.peak - baseline) / MiB
    grown_read = (during_read.peak - baseline) / MiB
    assert grown_put < 64, f"RSS grew {grown_put:.0f} MiB while putting 200 MiB"
    assert grown_read < 64, f"RSS grew {grown_read:.0f} MiB while reading 200 MiB"
    head = s3_server.client().head_object(Bucket=store.bucket, Key=f"{store.prefix}/big")
    assert head["ETag"].strip('"').endswith("-25")  # 200 MiB in 8 MiB parts
