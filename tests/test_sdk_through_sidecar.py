"""The SDK through a real sidecar, where the sidecar is the thing that misbehaves or the
SDK's data is the thing that does not fit.

- A chunk the SDK packs fits what carries it: a burst of console output (up to 10,000 lines
  of 16 KiB in one chunk, 160 MB) or a high ``max_chunk_points`` is cut into chunks of at
  most ``pipeline.MAX_CHUNK_BYTES``, under the sidecar's 16 MiB frame limit. Before, such a
  chunk made the sidecar close the connection, the SDK resent it for ever and every point
  logged after it was stuck. One ``log()`` call too big for any chunk is set aside, saying so.
- ``finish(timeout=...)`` keeps its bound when the sidecar hangs (accepts, answers nothing):
  the sender's wait is woken instead of running out a whole request timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from support.server_process import ServerProcess
from support.sidecar_process import SidecarProcess

import pluto
from pluto import query
from pluto.gpus import GpuLookup
from pluto.pipeline import MAX_CHUNK_BYTES
from pluto.transport.sidecar import SidecarTransport
from pluto.wire import (
    FEATURE_NODE,
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Chunk,
    FrameKind,
    RunCreate,
    RunOpened,
    RunStatus,
    encode_frame,
    encode_msgpack,
    parse_frame_header,
)

BURST_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import pluto
    run = pluto.init(project="chunks", run_id=sys.argv[1], dir=sys.argv[2],
                     settings={"finish_timeout": 60, "flush_interval": 0.5})
    run.log({"before": 1.0})
    time.sleep(1.0)  # the first chunk is through
    line = b"x" * 16000 + b"\\n"
    os.write(1, line * 1100)  # 17.6 MB of output in one burst: one pass of the sender
    for step in range(100):
        run.log({"after": float(step)})
    run.finish()
    print(json.dumps({"undelivered": run.undelivered_bytes}), file=sys.stderr)
""")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the SDK's doing, not the store's
def test_a_console_burst_bigger_than_a_frame_reaches_the_server_in_chunks_that_fit(
    shared_server: ServerProcess, sidecar_factory: Callable[..., SidecarProcess],
    tmp_path: Path,
) -> None:
    assert MAX_CHUNK_BYTES < MAX_FRAME_BYTES
    sidecar = sidecar_factory(shared_server.url, extra_args=["--sys-interval", "0"])
    run_id = f"burst-{tmp_path.name}"
    done = subprocess.run(
        [sys.executable, "-c", BURST_SCRIPT, run_id, str(tmp_path / "pluto")],
        env=sidecar.client_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["undelivered"] == 0, done.stderr[-3000:]

    url = shared_server.url
    # finish() returned once the sidecar had it all spooled; the sidecar forwards it after.
    # The final status rides in the last chunk, so once it is there everything is.
    deadline = time.monotonic() + 60
    while (query.get_run(run_id, project="chunks", url=url).status is not RunStatus.COMPLETED
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert query.get_run(run_id, project="chunks", url=url).status is RunStatus.COMPLETED
    metrics = query.get_metrics(run_id, project="chunks", url=url)
    assert [row.step for row in metrics["after"]] == list(range(1, 101))  # type: ignore[union-attr]
    burst = [line for line in query.get_logs(run_id, project="chunks", url=url)
             if set(line.line) == {"x"}]
    assert len(burst) == 1100 and {len(line.line) for line in burst} == {16000}
    assert "client error" not in sidecar.logs()


@pytest.mark.usefixtures("sdk_env")
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_one_log_call_too_big_for_any_chunk_is_set_aside_saying_so(
    shared_server: ServerProcess, tmp_path: Path,
) -> None:
    run = pluto.init(project="chunks", dir=tmp_path / "pluto",
                     settings={"url": shared_server.url, "console": False,
                               "flush_interval": 0.05})
    run.log({"small": 1.0})
    huge = {f"layer{i:06d}/weights/grad_norm_x": float(i) for i in range(300_000)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.log(huge)
        run.log({"small": 2.0})
        run.finish()
    said = [str(w.message) for w in caught if "refused a chunk" in str(w.message)]
    assert len(said) == 1 and "log fewer keys per call" in said[0], [
        str(w.message) for w in caught]
    # Refused before it was sent: not the server's 413 (as the warning used to say).
    assert "pluto (before sending it) refused" in said[0] and "HTTP 413" not in said[0]
    assert (tmp_path / "pluto" / "dead-letter.msgpack").stat().st_size > MAX_CHUNK_BYTES
    small = query.get_metrics(run.id, url=shared_server.url)["small"]
    assert [row.value for row in small] == [1.0, 2.0]  # type: ignore[union-attr]
    assert run.undelivered_bytes == 0


@pytest.mark.usefixtures("sdk_env")
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_finish_keeps_its_timeout_when_the_sidecar_hangs(
    shared_server: ServerProcess, sidecar_factory: Callable[..., SidecarProcess],
    tmp_path: Path,
) -> None:
    sidecar = sidecar_factory(shared_server.url, extra_args=["--sys-interval", "0"])
    run = pluto.init(project="chunks", run_id=f"hung-{tmp_path.name}", dir=tmp_path / "pluto",
                     settings={"console": False, "sidecar_socket": str(sidecar.socket),
                               "http_timeout": 60, "flush_interval": 0.05})
    assert sidecar.proc is not None
    os.kill(sidecar.proc.pid, signal.SIGSTOP)  # hung: connections open, nothing answered
    try:
        for step in range(10):
            run.log({"loss": float(step)})
        time.sleep(0.5)  # the sender is waiting for the sidecar's ACK
        started = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.finish(timeout=1.0)
        took = time.monotonic() - started
    finally:
        os.kill(sidecar.proc.pid, signal.SIGCONT)
    # The drain's second, then the sender thread's join (at most 5 s); not http_timeout.
    assert took < 1.0 + 5.0, f"finish(timeout=1) took {took:.1f} s with a hung sidecar"
    assert any("could not deliver" in str(w.message) for w in caught)
    assert run.undelivered_bytes > 0  # kept in the local spool for the next init()


@pytest.mark.usefixtures("sdk_env")
def test_a_resume_pending_on_the_server_warns_that_steps_start_again(
    server_factory: Callable[..., ServerProcess],
    sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path,
) -> None:
    server = server_factory(start=False)  # away: the open is pending
    sidecar = sidecar_factory(server.url, extra_args=["--sys-interval", "0", "--open-wait", "1",
                                                       "--drain-seconds", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = pluto.init(project="chunks", run_id="resumed-later", resume=True,
                         dir=tmp_path / "pluto",
                         settings={"console": False, "sidecar_socket": str(sidecar.socket),
                                   "finish_timeout": 0.5})
    said = [str(w.message) for w in caught if "last step" in str(w.message)]
    assert run.pending and len(said) == 1 and "start again from 0" in said[0], [
        str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.finish()


# -- a sidecar older than the SDK -------------------------------------------------------------


def _read_frame(conn: socket.socket) -> tuple[FrameKind, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            piece = conn.recv(n - len(data))
            if not piece:
                raise ConnectionError("closed")
            data += piece
        return data

    kind, request_id, length = parse_frame_header(exactly(FRAME_HEADER.size))
    return kind, request_id, exactly(length)


class OlderSidecar:
    """Stands in for a sidecar of an earlier release (which cannot run here): its Welcome has
    no ``features``, and it would refuse a frame kind it does not know. It records the frames
    a client sends after HELLO, answers OPEN_RUN with a pending run and CHUNK with an ACK,
    and nothing else. Given ``features``, it says it takes those (a recorder of what a
    current client sends)."""

    def __init__(self, path: Path, features: list[str] | None = None) -> None:
        self.features = features
        self.frames: list[FrameKind] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            kind, request_id, _ = _read_frame(conn)
            assert kind is FrameKind.HELLO
            # What protocol-1 sidecars sent: no "features" key at all.
            said: dict[str, object] = {"protocol": PROTOCOL_VERSION,
                                       "max_frame_bytes": MAX_FRAME_BYTES, "sidecar": "0.0.9"}
            if self.features is not None:
                said["features"] = self.features
            welcome = msgspec.msgpack.encode(said)
            conn.sendall(encode_frame(FrameKind.WELCOME, request_id, welcome))
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    kind, request_id, payload = _read_frame(conn)
                    self.frames.append(kind)
                    if kind is FrameKind.OPEN_RUN:
                        request = msgspec.msgpack.decode(payload, type=RunCreate)
                        opened = RunOpened(project=request.project,
                                           run_ref=request.run_id or "", pending="older")
                        conn.sendall(encode_frame(FrameKind.RUN, request_id,
                                                  encode_msgpack(opened)))
                    elif kind is FrameKind.CHUNK:
                        conn.sendall(encode_frame(FrameKind.ACK, request_id,
                                                  encode_msgpack(Ack(seq=0))))

    def close(self) -> None:
        self.listener.close()


def test_the_node_rank_is_told_only_to_a_sidecar_that_takes_it(tmp_path: Path) -> None:
    """An SDK newer than its pod's sidecar (the training image and the sidecar image are
    upgraded apart) must not send a frame the sidecar would refuse."""
    path = tmp_path / "old.sock"
    older = OlderSidecar(path)
    gpus = GpuLookup(lambda: ["GPU-0"])
    gpus.wait(10)
    transport = SidecarTransport(str(path), session="s", writer=3, node_rank=2, timeout=5,
                                 gpus=gpus)
    try:
        with pytest.warns(RuntimeWarning, match="run 'r' is pending"):
            opened = transport.open_run(RunCreate(project="compat", run_id="r"), 5)
        assert opened.id == 0  # pending: the older sidecar's answer came back
    finally:
        transport.close()
        older.thread.join(5)
        older.close()
    assert older.frames[:1] == [FrameKind.OPEN_RUN], older.frames
    assert FrameKind.NODE not in older.frames


@pytest.mark.parametrize(("node_rank", "gpus"), [(2, None), (None, [])],
                         ids=["node-rank", "no-gpus"])
def test_what_the_sidecar_is_told_of_the_node_is_told_once_per_connection(
    tmp_path: Path, node_rank: int | None, gpus: list[str] | None,
) -> None:
    """Also when the container has no GPUs: the empty list is told, or the sidecar would
    report the node's GPUs (other pods') for this run once its wait for news is over."""
    path = tmp_path / "recorder.sock"
    recorder = OlderSidecar(path, features=[FEATURE_NODE])
    lookup = None if gpus is None else GpuLookup(lambda: gpus)
    if lookup is not None:
        lookup.wait(10)
    transport = SidecarTransport(str(path), session="s", writer=3, node_rank=node_rank,
                                 timeout=5, gpus=lookup)
    try:
        with pytest.warns(RuntimeWarning, match="run 'r' is pending"):
            transport.open_run(RunCreate(project="compat", run_id="r"), 5)
        for seq in range(3):
            transport.deliver([encode_msgpack(Chunk(
                run=0, project="compat", run_ref="r", session="s", seq=seq, writer=3,
                keys=["k"], key_index=[0], steps=[seq], values=[1.0], times=[0.0]))])
    finally:
        transport.close()
        recorder.thread.join(5)
        recorder.close()
    assert recorder.frames == [FrameKind.NODE, FrameKind.OPEN_RUN] + [FrameKind.CHUNK] * 3


# -- the container's GPUs ---------------------------------------------------------------------


def test_the_container_gpus_are_told_to_the_sidecar_once_the_lookup_has_them(
    shared_server: ServerProcess, sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    """NVML can take a while to start (pluto.init does not wait for it), so the GPUs may be
    known only after the run is open: they go with the next chunks. The lookup's answer is
    played by a function (NVML needs a GPU; ``pluto.gpus`` is tested with a stand-in)."""
    sidecar = sidecar_factory(shared_server.url, extra_args=["--sys-interval", "0"])
    release = threading.Event()

    def nvml_answers_late() -> list[str]:
        release.wait(10)
        return ["GPU-9", "GPU-4"]

    gpus = GpuLookup(nvml_answers_late)
    transport = SidecarTransport(str(sidecar.socket), session="gpus", writer=0, timeout=10,
                                 gpus=gpus)
    try:
        run = transport.open_run(RunCreate(project="gpus", run_id="told-later"), 10)
        assert run.id > 0

        def chunk(seq: int) -> bytes:
            return encode_msgpack(Chunk(run=run.id, session="gpus", seq=seq, writer=0,
                                        keys=["loss"], key_index=[0], steps=[seq],
                                        values=[1.0], times=[time.time()]))

        transport.deliver([chunk(0)])
        time.sleep(0.2)
        assert not [e for e in sidecar.events() if e.get("event") == "GPUs told by a rank"]
        release.set()
        assert gpus.wait(10) == ["GPU-9", "GPU-4"]
        transport.deliver([chunk(1)])
        transport.deliver([chunk(2)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            told = [e for e in sidecar.events() if e.get("event") == "GPUs told by a rank"]
            if told:
                break
            time.sleep(0.05)
        assert [e["gpus"] for e in told] == [["GPU-9", "GPU-4"]]
    finally:
        transport.close()
    assert "client error" not in sidecar.logs()
