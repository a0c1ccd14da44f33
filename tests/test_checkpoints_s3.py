"""Checkpoints on S3: a real ``pluto server --storage s3://...`` against a real
S3-compatible server (SeaweedFS on loopback), and forks from ART-style buckets."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.processes import die_with_parent, peak_rss_mib, terminate
from support.s3_server import S3Server
from support.server_process import ServerProcess

import pluto
from pluto.transfer import sha256_of

MiB = 1024 * 1024
FAST: dict[str, Any] = {"console": False, "flush_interval": 0.05, "init_timeout": 10,
                        "finish_timeout": 10}


@pytest.fixture(autouse=True)
def _isolated(sdk_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sdk_env``, and no developer AWS credentials: each test passes its own."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def s3_pluto(s3_server: S3Server, bucket: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A pluto server storing files and checkpoints in ``bucket`` under ``pluto/``."""
    data_dir = tmp_path_factory.mktemp("s3-pluto") / "data"
    with ServerProcess(data_dir, extra_args=["--storage", f"s3://{bucket}/pluto"],
                       env=s3_server.env) as server:
        yield server


@pytest.fixture
def start(s3_pluto: ServerProcess, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., pluto.Run]]:
    monkeypatch.setenv("PLUTO_URL", s3_pluto.url)
    project = f"s3-{uuid.uuid4().hex[:8]}"
    runs: list[pluto.Run] = []

    def _start(**kwargs: Any) -> pluto.Run:
        kwargs.setdefault("project", project)
        run = pluto.init(dir=tmp_path / "pluto", settings={**FAST, "url": s3_pluto.url},
                         **kwargs)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.finish()


def keys_under(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for page in s3_server.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def test_checkpoints_live_in_the_bucket_and_forks_copy_no_bytes(
    start: Callable[..., pluto.Run], s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    (root / "shards").mkdir(parents=True)
    big = os.urandom(MiB) * 40  # 40 MiB: a multipart upload (16 MiB parts)
    (root / "shards" / "model-00001.bin").write_bytes(big)
    (root / "config.json").write_bytes(b'{"layers": 2}')
    a = start(name="a")
    a.log({"loss": 1.0}, step=0)
    a.log({"loss": 0.5}, step=10)
    info = a.log_checkpoint(root, step=10)
    assert info is not None and info.size == len(big) + 13
    before = keys_under(s3_server, bucket, "pluto/blobs/")
    digest = hashlib.sha256(big).hexdigest()
    assert before[f"pluto/blobs/sha256/{digest[:2]}/{digest}"] == len(big)
    assert len(before) == 2

    a.finish()
    b = start(name="b", fork_run_id=a.id, fork_step=10, fork_checkpoint=True)
    assert keys_under(s3_server, bucket, "pluto/blobs/") == before  # nothing was copied
    assert b.checkpoint_path is not None
    assert (b.checkpoint_path / "shards" / "model-00001.bin").read_bytes() == big
    assert (b.checkpoint_path / "config.json").read_bytes() == b'{"layers": 2}'
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # every multipart upload was completed or aborted


def test_torch_state_round_trips_through_s3_bit_for_bit(
    start: Callable[..., pluto.Run]
) -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(64, 64)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 64)).sum().backward()
    optim.step()
    run = start(name="torch")
    assert run.save_checkpoint({"model": model, "optim": optim}, step=0) is not None
    state = pluto.load_checkpoint(run, step=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    buffers = [s["momentum_buffer"] for s in optim.state_dict()["state"].values()]
    loaded = [s["momentum_buffer"] for s in state["optim"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(buffers, loaded, strict=True))


# -- ART -----------------------------------------------------------------------------------


def art_bucket(s3_server: S3Server) -> tuple[str, dict[int, dict[str, bytes]]]:
    """An ART-style bucket: email-agent/models/agent-007/checkpoints/{0010,0020,0030}/."""
    name = s3_server.create_bucket()
    client = s3_server.client()
    steps: dict[int, dict[str, bytes]] = {}
    for step in (10, 20, 30):
        files = {"adapter_model.safetensors": os.urandom(3 * MiB),
                 "adapter_config.json": f'{{"step": {step}}}'.encode()}
        for name_, content in files.items():
            client.put_object(
                Bucket=name, Body=content,
                Key=f"email-agent/models/agent-007/checkpoints/{step:04d}/{name_}")
        steps[step] = files
    client.put_object(Bucket=name, Key="email-agent/models/agent-007/history.jsonl", Body=b"{}")
    return name, steps


def test_an_art_checkpoint_is_forked_from_its_bucket(
    start: Callable[..., pluto.Run], s3_server: S3Server, tmp_path: Path
) -> None:
    source, steps = art_bucket(s3_server)
    run = start(name="from-art")
    info = pluto.fork_checkpoint(run, "agent-007", from_project="email-agent",
                                 from_s3_bucket=source, not_after_step=25)
    assert info.step == 20
    assert info.source_uri == f"s3://{source}/email-agent/models/agent-007/checkpoints/0020/"
    assert sorted(f.path for f in info.files) == ["adapter_config.json",
                                                  "adapter_model.safetensors"]
    fetched = run.download_checkpoint(20, tmp_path / "art")
    for name, content in steps[20].items():
        assert (fetched / name).read_bytes() == content
    [listed] = run.checkpoints
    assert listed.source_uri == info.source_uri

    newest = pluto.fork_checkpoint(start(name="newest"), "agent-007", from_project="email-agent",
                                   from_s3_bucket=f"s3://{source}")
    assert newest.step == 30

    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(start(name="early"), "agent-007", from_project="email-agent",
                              from_s3_bucket=source, not_after_step=5)
    assert refused.value.status_code == 404
    assert "steps with one: 10, 20, 30" in str(refused.value)

    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(run, "agent-008", from_project="email-agent",
                              from_s3_bucket=source)
    assert "no ART checkpoint" in str(refused.value) and "agent-008" in str(refused.value)

    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(run, "agent-007", from_project="email-agent",
                              from_s3_bucket="no-such-bucket-here")
    assert refused.value.status_code == 404 and "no-such-bucket-here" in str(refused.value)


def test_art_folder_markers_and_ambiguous_step_folders_never_make_a_broken_checkpoint(
    start: Callable[..., pluto.Run], s3_server: S3Server, tmp_path: Path
) -> None:
    """Some tools write a zero-byte "folder/" object per folder: it is no file. Two folders
    that are one step ("7" and "0007") are refused, not merged under one prefix (which gave
    the other folder's files garbage names); so are paths no download could write."""
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    base = "proj/models/m/checkpoints"
    for key, body in [(f"{base}/0040/adapter/", b""), (f"{base}/0040/adapter/w.bin", b"w"),
                      (f"{base}/0040/config.json", b"{}"),
                      (f"{base}/7/a.bin", b"a"), (f"{base}/0007/b.bin", b"b"),
                      (f"{base}/0050/x", b"file"), (f"{base}/0050/x/y", b"nested")]:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    run = start(name="art-edges")
    info = pluto.fork_checkpoint(run, "m", from_project="proj", from_s3_bucket=bucket,
                                 not_after_step=40)
    assert sorted(f.path for f in info.files) == ["adapter/w.bin", "config.json"]
    fetched = run.download_checkpoint(40, tmp_path / "art")
    assert (fetched / "adapter" / "w.bin").read_bytes() == b"w"

    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(start(name="seven"), "m", from_project="proj",
                              from_s3_bucket=bucket, not_after_step=7)
    assert refused.value.status_code == 409
    assert "the folders 0007/ and 7/ under" in str(refused.value)
    assert "are both ART step 7" in str(refused.value)
    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(start(name="fifty"), "m", from_project="proj",
                              from_s3_bucket=bucket, not_after_step=50)
    assert refused.value.status_code == 422
    assert "'x' is both a file and the folder of 'x/y'" in str(refused.value)


# -- broken storage ---------------------------------------------------------------------------


def test_refused_credentials_and_a_missing_bucket_are_reported_not_crashed_on(
    s3_server: S3Server, bucket: str, server_factory: Callable[..., ServerProcess],
    tmp_path: Path
) -> None:
    secret = "not-the-secret-" + uuid.uuid4().hex
    wrong = server_factory(extra_args=["--storage", f"s3://{bucket}/pluto"],
                           env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": secret})
    missing = server_factory(extra_args=["--storage", "s3://no-such-bucket/pluto"],
                             env=s3_server.env)
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights")
    for server, expected in ((wrong, "refused the server's credentials"),
                             (missing, "no-such-bucket")):
        assert "not usable" in server.logs()  # said at start
        run = pluto.init(project="broken", dir=tmp_path / "pluto",
                         settings={**FAST, "url": server.url})
        run.log({"loss": 1.0})  # metrics do not need the storage
        with pytest.warns(RuntimeWarning) as caught:
            assert run.log_checkpoint(source, step=0) is None
        message = str(caught[0].message)
        assert expected in message, message
        assert secret not in message and secret not in server.logs()
        run.finish()




def test_a_bucket_the_servers_credentials_may_not_read_is_the_callers_to_change(
    s3_server: S3Server, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """An ART bucket named in a checkpoint fork that refuses the server's credentials is a
    403 naming the bucket (the caller chose it), not a 502 (the server's own storage is
    fine). Found by the API fuzzer with a server that had no S3 credentials at all."""
    source, _ = art_bucket(s3_server)
    secret = "not-the-secret-" + uuid.uuid4().hex
    server = server_factory(env={**s3_server.env, "AWS_SECRET_ACCESS_KEY": secret})
    run = pluto.init(project="refused", dir=tmp_path / "pluto",
                     settings={**FAST, "url": server.url})
    with pytest.raises(pluto.RequestRejected) as refused:
        pluto.fork_checkpoint(run, "agent-007", from_project="email-agent",
                              from_s3_bucket=source, url=server.url)
    assert refused.value.status_code == 403, refused.value
    assert f"bucket {source!r} refused the server's credentials" in str(refused.value)
    assert "name a bucket" in str(refused.value) and secret not in str(refused.value)
    assert run.checkpoints == []
    run.finish()


def test_a_big_checkpoint_streams_through_the_server_to_s3_in_bounded_memory(
    s3_server: S3Server, bucket: str, server_factory: Callable[..., ServerProcess],
    tmp_path: Path
) -> None:
    server = server_factory(extra_args=["--storage", f"s3://{bucket}/big"], env=s3_server.env)
    block = os.urandom(MiB)
    source = tmp_path / "big.bin"
    with source.open("wb") as handle:
        for _ in range(384):
            handle.write(block)
    run = pluto.init(project="big", dir=tmp_path / "pluto", settings={**FAST, "url": server.url})
    info = run.log_checkpoint(source, step=0)
    assert info is not None and info.size == 384 * MiB
    back = run.download_checkpoint(0, tmp_path / "back")
    assert sha256_of(back / "big.bin") == info.files[0].sha256
    run.finish()
    assert server.pid is not None
    peak = peak_rss_mib(server.pid)
    print(f"384 MiB round trip through S3: server peak RSS {peak:.0f} MiB")
    assert peak < 200


def test_a_server_killed_mid_upload_to_s3_leaves_no_object(
    s3_server: S3Server, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    bucket = s3_server.create_bucket()
    server = server_factory(extra_args=["--storage", f"s3://{bucket}/p"], env=s3_server.env)
    block = os.urandom(MiB)
    source = tmp_path / "big.bin"
    with source.open("wb") as handle:
        for _ in range(300):
            handle.write(block)
    run = pluto.init(project="cut", dir=tmp_path / "pluto",
                     settings={**FAST, "url": server.url})
    uploader = subprocess.Popen(
        [sys.executable, "-c", f"import pluto; r = pluto.init(project='cut', "
         f"run_id={run.run_id!r}, resume=True); r.log_checkpoint({str(source)!r}, step=0)"],
        cwd=tmp_path, env={**os.environ, "PLUTO_URL": server.url, "PLUTO_CONSOLE": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    client = s3_server.client()
    deadline = time.monotonic() + 120
    while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline, "no multipart upload started"
        time.sleep(0.02)
    server.kill()
    terminate(uploader, 10)
    server.start()
    assert keys_under(s3_server, bucket, "p/blobs/") == {}  # nothing half-written is visible
    assert run.checkpoints == []
    run.finish()
