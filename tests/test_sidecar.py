"""The per-pod sidecar, end to end: real ``pluto sidecar``, ``pluto server`` and training
processes talking over a real Unix socket and real HTTP.

What a pod relies on, and what these tests pin:

- every rank of a pod logs through one sidecar into one shared run, every point exactly
  once, and exactly one rank is the run's creator;
- ``init()`` never hangs on a missing server or a missing sidecar: it returns within a
  bounded time with the external id known, and the numeric ids fill in later;
- the SDK rides out a sidecar restart (SIGTERM or SIGKILL) without losing or duplicating;
- a misbehaving client gets an ERROR frame that says what is wrong, and nobody else notices;
- the socket is group-writable only, a stale one is replaced, a live one is never stolen;
- the spool survives a torn tail, a SIGTERM drains it within the deadline (or keeps it for
  the next start), a full spool slows producers down instead of dropping, and a chunk the
  server refuses for good is set aside and counted, not retried forever;
- health, readiness and Prometheus metrics say what is going on;
- system metrics arrive under ``sys/`` labelled with the node rank and are not inherited
  by forks, and stop once a run is over; the training process needs no credentials;
- the cache answers only the ranks of one job: a restart's ``resume=True`` gets the run's
  current last step, and a pending one says that it cannot; updates reach the run they
  name even when its external id is all digits;
- a sidecar that cannot start says which flag to fix in one line and leaves no socket.

The kill -9 rounds, the long outages, the two-node torchrun job and the benchmark live in
tests/chaos/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.server_process import ServerProcess, clean_env, create_api_key, revoke_api_key
from support.sidecar_process import SidecarProcess, SidecarStartError

import pluto
from pluto import query
from pluto.errors import RequestRejected
from pluto.query import MetricRow
from pluto.spool import HEADER as SPOOL_RECORD_HEADER
from pluto.wire import (
    FEATURE_NODE,
    FRAME_HEADER,
    FRAME_MAGIC,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Chunk,
    FrameError,
    FrameKind,
    Hello,
    NodeInfo,
    RunCreate,
    RunInfo,
    RunOpened,
    RunStatus,
    RunUpdate,
    RunUpdateRequest,
    Welcome,
    encode_frame,
    encode_msgpack,
    parse_frame_header,
)

SCRIPT = Path(__file__).resolve().parent / "scripts" / "sidecar_writer.py"
PROJECT = "sidecar"
#: System metrics off: tests that count points want only what the ranks logged.
QUIET = ["--sys-interval", "0"]

Point = tuple[str, int, int]  # (key, step, writer)
ServerFactory = Callable[..., ServerProcess]
SidecarFactory = Callable[..., SidecarProcess]


def value(writer: int, step: int, j: int) -> float:
    """What tests/scripts/sidecar_writer.py logs for key ``k<j>`` at ``step``."""
    return float(writer * 1_000_000 + step * 10 + j)


def expected_points(writer: int, steps: int, keys: int, ticks: int = 0) -> dict[Point, float]:
    points = {(f"k{j}", step, writer): value(writer, step, j)
              for step in range(steps) for j in range(keys)}
    points.update({("tick", steps + i, writer): float(i) for i in range(ticks)})
    return points


# -- training processes --------------------------------------------------------------


class Writer:
    """One training process (tests/scripts/sidecar_writer.py) logging through a sidecar."""

    def __init__(self, directory: Path, name: str, env: dict[str, str], *, steps: int = 100,
                 keys: int = 2, sleep: float = 0.0, settings: dict[str, Any] | None = None,
                 go: Path | None = None, await_id: float = 0.0, project: str = PROJECT) -> None:
        self.name = name
        self.steps = steps
        self.keys = keys
        self.out = directory / f"{name}.json"
        self.progress_path = directory / f"{name}.progress"
        self.log_path = directory / f"{name}.log"
        argv = [sys.executable, str(SCRIPT), str(self.out), "--project", project,
                "--steps", str(steps), "--keys", str(keys), "--sleep", str(sleep),
                "--settings", json.dumps(settings or {}), "--progress", str(self.progress_path),
                "--await-id", str(await_id)]
        if go is not None:
            argv += ["--go", str(go)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, cwd=directory, stdout=log,
                                         stderr=subprocess.STDOUT)

    def report(self) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads(self.out.read_text()))
        except FileNotFoundError:
            return None

    def wait_for_init(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.report()
            if report is not None:
                return report
            assert self.proc.poll() is None, f"{self.name} exited early:\n{self.logs()}"
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: init() did not return in {timeout}s:\n{self.logs()}")

    def calls(self) -> int:
        try:
            return int(json.loads(self.progress_path.read_text())["calls"])
        except (FileNotFoundError, ValueError):
            return 0

    def wait_for_calls(self, calls: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.calls() >= calls, timeout,
                   lambda: f"{self.name} made only {self.calls()} log() calls:\n{self.logs()}")

    def wait(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for a clean exit; the final report."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n"
                                 f"{self.logs()}") from None
        assert code == 0, f"{self.name} exited {code}:\n{self.logs()}"
        report = self.report()
        assert report is not None and report["phase"] == "done", self.logs()
        assert "Traceback" not in self.logs(), self.logs()
        return report

    def expected(self, ticks: int = 0) -> dict[Point, float]:
        report = self.report()
        assert report is not None
        return expected_points(report["at_init"]["writer"], self.steps, self.keys, ticks)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Writer]]:
    """``spawn(name, env, **Writer kwargs)`` starts a training process; killed after the test."""
    started: list[Writer] = []

    def make(name: str, env: dict[str, str], **kwargs: Any) -> Writer:
        writer = Writer(tmp_path, name, env, **kwargs)
        started.append(writer)
        return writer

    yield make
    for writer in started:
        writer.kill()


# -- what the server has -------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float,
               message: Callable[[], str] | str = "condition not met") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    if predicate():
        return
    raise AssertionError(message() if callable(message) else message)


def find_run(url: str, run_ref: str, project: str = PROJECT,
             api_key: str | None = None) -> RunInfo | None:
    try:
        return query.get_run(run_ref, project=project, url=url, api_key=api_key)
    except RequestRejected as exc:
        if exc.status_code == 404:
            return None
        raise


def stored(url: str, run: int, api_key: str | None = None, *, lineage: bool = False,
           keys: list[str] | None = None) -> dict[str, list[MetricRow]]:
    return query.get_metrics(run, keys=keys, lineage=lineage, url=url, api_key=api_key)


def stored_points(url: str, run: int, api_key: str | None = None
                  ) -> tuple[Counter[Point], dict[Point, float]]:
    """How often each (key, step, writer) is stored, and its value; ``sys/`` keys left out."""
    counts: Counter[Point] = Counter()
    values: dict[Point, float] = {}
    for key, rows in stored(url, run, api_key).items():
        if key.startswith("sys/"):
            continue
        for row in rows:
            assert row.writer is not None
            counts[(key, row.step, row.writer)] += 1
            values[(key, row.step, row.writer)] = row.value
    return counts, values


def assert_exactly_once(counts: Counter[Point], values: dict[Point, float],
                        expected: dict[Point, float]) -> None:
    duplicated = sorted(p for p, n in counts.items() if n > 1)
    missing = sorted(expected.keys() - counts.keys())
    unexpected = sorted(counts.keys() - expected.keys())
    assert not duplicated, f"{len(duplicated)} points stored more than once: {duplicated[:10]}"
    assert not missing, f"{len(missing)} of {len(expected)} points missing: {missing[:10]}"
    assert not unexpected, f"{len(unexpected)} points nobody logged: {unexpected[:10]}"
    wrong = sorted(p for p in expected if values[p] != expected[p])
    assert not wrong, f"wrong values at {wrong[:10]}"
    # Per (key, writer): count and checksum, as a summary that reads at a glance.
    def summary(points: dict[Point, float]) -> dict[tuple[str, int], tuple[int, float]]:
        out: dict[tuple[str, int], tuple[int, float]] = {}
        for (key, _, writer), v in points.items():
            n, total = out.get((key, writer), (0, 0.0))
            out[(key, writer)] = (n + 1, total + v)
        return out
    assert summary(values) == summary(expected)


def wait_delivered(url: str, run_ref: str, expected: dict[Point, float], *,
                   project: str = PROJECT, timeout: float = 60.0,
                   api_key: str | None = None) -> RunInfo:
    """Poll until the run holds as many points as expected, then check them exactly."""
    state: dict[str, Any] = {"run": None, "count": 0}

    def enough() -> bool:
        info = find_run(url, run_ref, project, api_key)
        if info is None:
            return False
        state["run"] = info
        counts, _ = stored_points(url, info.id, api_key)
        count = state["count"] = sum(counts.values())
        return count >= len(expected)

    wait_until(enough, timeout, lambda: f"run {run_ref!r}: {state['count']} of "
               f"{len(expected)} points after {timeout}s")
    info = cast(RunInfo, state["run"])
    time.sleep(0.3)  # a straggling duplicate would show up now
    counts, values = stored_points(url, info.id, api_key)
    assert_exactly_once(counts, values, expected)
    return info


def wait_status(url: str, run_ref: str, status: RunStatus, *, project: str = PROJECT,
                timeout: float = 30.0, api_key: str | None = None) -> RunInfo:
    state: dict[str, Any] = {"info": None}

    def reached() -> bool:
        state["info"] = find_run(url, run_ref, project, api_key)
        info: RunInfo | None = state["info"]
        return info is not None and info.status is status

    wait_until(reached, timeout, lambda: f"run {run_ref!r} is not {status}: {state['info']}")
    return cast(RunInfo, state["info"])


# -- the sidecar's own view ----------------------------------------------------------


def scrape(sidecar: SidecarProcess) -> dict[str, float]:
    """``/metrics`` as ``{'name{label="v"}': value}`` (no braces without labels)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(sidecar.metrics()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def events_named(sidecar: SidecarProcess, prefix: str) -> list[dict[str, object]]:
    return [e for e in sidecar.events() if str(e.get("event", "")).startswith(prefix)]


# -- a raw protocol client -----------------------------------------------------------


class RawClient:
    """Speaks the frame protocol of ``pluto.wire`` byte by byte, well or badly."""

    def __init__(self, path: Path, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.session = uuid.uuid4().hex
        self.seq = 0
        self._next_id = 1

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, kind: FrameKind, payload: bytes) -> int:
        request_id = self._next_id
        self._next_id += 1
        self.send_raw(encode_frame(kind, request_id, payload))
        return request_id

    def receive(self) -> tuple[FrameKind, int, bytes]:
        header = self._exactly(FRAME_HEADER.size)
        kind, request_id, length = parse_frame_header(header)
        return kind, request_id, self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            piece = self.sock.recv(size - len(data))
            if not piece:
                raise ConnectionResetError(f"closed by the sidecar after {len(data)} bytes")
            data += piece
        return data

    def error(self, request_id: int | None = None) -> FrameError:
        kind, got_id, payload = self.receive()
        assert kind is FrameKind.ERROR, (kind, payload)
        if request_id is not None:
            assert got_id == request_id
        return msgspec.msgpack.decode(payload, type=FrameError)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def hello(self, writer: int = 0, protocol: int = PROTOCOL_VERSION) -> int:
        return self.send(FrameKind.HELLO, encode_msgpack(
            Hello(protocol=protocol, session=self.session, writer=writer, pid=os.getpid())))

    def handshake(self, writer: int = 0) -> Welcome:
        request_id = self.hello(writer)
        kind, got_id, payload = self.receive()
        assert (kind, got_id) == (FrameKind.WELCOME, request_id), payload
        return msgspec.msgpack.decode(payload, type=Welcome)

    def open_run(self, project: str, run_ref: str, **fields: Any) -> RunOpened:
        """``fields``: more of the ``RunCreate`` (``resume=True``, ``fork_run_id=...``)."""
        request_id = self.send(FrameKind.OPEN_RUN, encode_msgpack(
            RunCreate(project=project, run_id=run_ref, **fields)))
        kind, got_id, payload = self.receive()
        assert (kind, got_id) == (FrameKind.RUN, request_id), payload
        return msgspec.msgpack.decode(payload, type=RunOpened)

    def chunk_frame(self, *, writer: int, steps: list[int], key: str = "good", run: int = 0,
                    project: str | None = None, run_ref: str | None = None,
                    finish: RunStatus | None = None) -> bytes:
        chunk = Chunk(run=run, project=project, run_ref=run_ref, session=self.session,
                      seq=self.seq, writer=writer, keys=[key], key_index=[0] * len(steps),
                      steps=steps, values=[value(writer, s, 0) for s in steps],
                      times=[time.time()] * len(steps), finish=finish)
        self.seq += 1
        return encode_msgpack(chunk)

    def close(self) -> None:
        self.sock.close()


class GoodClient:
    """A well-behaved client, connected before a bad one shows up and used after it."""

    WRITER = 5

    def __init__(self, sidecar: SidecarProcess, run_ref: str) -> None:
        self.run_ref = run_ref
        self.client = RawClient(sidecar.socket)
        self.client.handshake(self.WRITER)
        opened = self.client.open_run(PROJECT, run_ref)
        assert opened.run is not None and opened.run.id > 0, opened
        self.run = opened.run.id
        self.steps: list[int] = []
        #: Points other clients sent to this run on purpose.
        self.extra: dict[Point, float] = {}

    def log(self, step: int) -> None:
        request_id = self.client.send(FrameKind.CHUNK, self.client.chunk_frame(
            writer=self.WRITER, steps=[step], run=self.run))
        kind, got_id, payload = self.client.receive()
        assert (kind, got_id) == (FrameKind.ACK, request_id), (kind, payload)
        self.steps.append(step)

    def logged_through(self, other: RawClient, *, writer: int, step: int) -> None:
        """``other`` (a bad client's connection, after its bad frame) still logs to this
        run: its chunk is acknowledged, and its point is expected at the server."""
        request_id = other.send(FrameKind.CHUNK, other.chunk_frame(writer=writer, steps=[step],
                                                                   run=self.run))
        kind, got_id, _ = other.receive()
        assert (kind, got_id) == (FrameKind.ACK, request_id)
        self.extra[("good", step, writer)] = value(writer, step, 0)

    def expected(self) -> dict[Point, float]:
        points = {("good", s, self.WRITER): value(self.WRITER, s, 0) for s in self.steps}
        return {**points, **self.extra}


# -- shared processes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                     SidecarProcess]]:
    """One server and one sidecar that the bad-client tests all abuse in turn."""
    base = tmp_path_factory.mktemp("pod")
    with ServerProcess(base / "data") as server, \
            SidecarProcess(base / "sidecar", server.url, extra_args=QUIET) as sidecar:
        yield server, sidecar


@pytest.fixture
def good(pod: tuple[ServerProcess, SidecarProcess]) -> Iterator[GoodClient]:
    server, sidecar = pod
    client = GoodClient(sidecar, f"good-{uuid.uuid4().hex[:12]}")
    client.log(0)
    yield client
    # After the bad client: the good one still gets its chunks acknowledged and delivered,
    # and a fresh connection is served.
    client.log(1)
    fresh = RawClient(sidecar.socket)
    fresh.handshake()
    fresh.close()
    wait_delivered(server.url, client.run_ref, client.expected(), timeout=30)
    client.client.close()
    assert sidecar.proc is not None and sidecar.proc.poll() is None


# -- one run, many ranks -------------------------------------------------------------


def test_eight_ranks_through_one_sidecar_into_one_run(
    server: ServerProcess, sidecar_factory: SidecarFactory, spawn: Callable[..., Writer],
    tmp_path: Path,
) -> None:
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    steps, keys = 300, 3
    writers = [spawn(f"rank{rank}", sidecar.client_env(PLUTO_RUN_ID="job-8", RANK=str(rank)),
                     steps=steps, keys=keys) for rank in range(8)]
    reports = [w.wait(90) for w in writers]

    ids = {r["after_finish"]["id"] for r in reports}
    assert len(ids) == 1 and 0 not in ids, ids
    assert {r["at_init"]["display_id"] for r in reports} != {""}
    assert len({r["at_init"]["display_id"] for r in reports}) == 1
    assert {r["at_init"]["run_id"] for r in reports} == {"job-8"}
    assert sorted(r["at_init"]["writer"] for r in reports) == list(range(8))
    # One creator; every other rank attached.
    assert sorted(r["at_init"]["resumed"] for r in reports) == [False] + [True] * 7
    assert all(r["undelivered"] == 0 for r in reports)

    expected: dict[Point, float] = {}
    for rank in range(8):
        expected.update(expected_points(rank, steps, keys))
    info = wait_delivered(server.url, "job-8", expected)
    assert info.id in ids
    wait_status(server.url, "job-8", RunStatus.COMPLETED)
    runs = query.list_runs(PROJECT, url=server.url)
    assert [r.run_id for r in runs] == ["job-8"]  # one run, not eight

    # Another node's sidecar attaching to the same run later: an attach, never a creation.
    other = sidecar_factory(server.url, extra_args=QUIET, node_rank=1)
    late = spawn("late", other.client_env(PLUTO_RUN_ID="job-8", RANK="8"), steps=1, keys=1)
    report = late.wait(30)
    assert report["at_init"]["resumed"] is True
    assert report["at_init"]["id"] == info.id


# -- init when the server or the sidecar is not there ------------------------------


def test_init_with_the_server_down_returns_pending_and_delivers_later(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    """Two ranks init while nobody listens at the server's address: both return at once,
    pending, and keep logging; once the server is there, the ids fill in on both, exactly
    one of them is the creator, and everything arrives."""
    server = server_factory(start=False)  # nobody listens on its port yet
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--open-wait", "2"])
    go = tmp_path / "go"
    writers = [spawn(f"rank{rank}", sidecar.client_env(PLUTO_RUN_ID="offline", RANK=str(rank)),
                     steps=100, keys=2, sleep=0.005, go=go, await_id=30,
                     settings={"init_timeout": 5})
               for rank in range(2)]
    for writer in writers:
        report = writer.wait_for_init()
        assert report["init_seconds"] < 5 + 1, report  # bounded: it did not wait for a server
        at_init = report["at_init"]
        assert at_init["run_id"] == "offline"
        assert at_init["pending"] is True and at_init["id"] == 0, at_init
    for writer in writers:
        writer.wait_for_calls(50)  # logging meanwhile: the first half is spooled
        assert "run 'offline' is pending" in writer.logs()  # the training log says so
    assert events_named(sidecar, "run pending")

    server.start()
    go.touch()
    reports = [w.wait(60) for w in writers]
    for report in reports:
        filled = report["after_finish"]
        assert filled["pending"] is False and filled["id"] > 0, report
        assert filled["display_id"], report
    assert len({r["after_finish"]["id"] for r in reports}) == 1
    # As when the server was up: one creator, the other rank attached.
    assert sorted(r["after_finish"]["resumed"] for r in reports) == [False, True]
    expected: dict[Point, float] = {}
    for writer, report in zip(writers, reports, strict=True):
        expected.update(writer.expected(report["ticks"]))
    info = wait_delivered(server.url, "offline", expected)
    assert info.id == reports[0]["after_finish"]["id"]
    wait_status(server.url, "offline", RunStatus.COMPLETED)


def test_init_with_a_hung_server_returns_after_open_wait(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    """A server that accepts connections but does not answer (stopped with SIGSTOP): the
    sidecar gives up waiting after ``--open-wait`` and ``init()`` returns pending."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--open-wait", "1.5"])
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        go = tmp_path / "go"
        writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="hung"), steps=60, keys=2,
                       go=go, await_id=30, settings={"init_timeout": 20})
        report = writer.wait_for_init(15)
        assert 1.0 <= report["init_seconds"] < 1.5 + 2.5, report
        assert report["at_init"]["pending"] is True and report["at_init"]["run_id"] == "hung"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    go.touch()
    final = writer.wait(60)
    assert final["after_finish"]["id"] > 0 and final["after_finish"]["display_id"]
    wait_delivered(server.url, "hung", writer.expected(final["ticks"]))
    wait_status(server.url, "hung", RunStatus.COMPLETED)


@pytest.mark.parametrize("sidecar_appears", ["during init", "after init"])
def test_the_sdk_connects_when_the_sidecar_appears(
    sidecar_appears: str, server_factory: ServerFactory, spawn: Callable[..., Writer],
    tmp_path: Path,
) -> None:
    server = server_factory()
    sidecar = SidecarProcess(tmp_path / "late-sidecar", server.url, extra_args=QUIET)
    assert not sidecar.socket.exists()
    init_timeout = 15 if sidecar_appears == "during init" else 1
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="late"), steps=100, keys=2,
                   sleep=0.01, await_id=30, settings={"init_timeout": init_timeout})
    try:
        if sidecar_appears == "after init":
            report = writer.wait_for_init(10)
            assert report["init_seconds"] < init_timeout + 2
            assert report["at_init"]["pending"] is True and report["at_init"]["id"] == 0
            assert report["at_init"]["run_id"] == "late"
            writer.wait_for_calls(50)  # logging into memory while there is no sidecar
        else:
            time.sleep(2)
            assert writer.report() is None  # init() is still waiting for the socket
        sidecar.start()
        final = writer.wait(60)
    finally:
        sidecar.stop()
    if sidecar_appears == "during init":
        assert final["init_seconds"] >= 0.5  # it waited for the socket to appear
        assert final["at_init"]["id"] > 0 and final["at_init"]["resumed"] is False
    assert final["after_finish"]["id"] > 0 and final["after_finish"]["display_id"]
    wait_delivered(server.url, "late", writer.expected(final["ticks"]))
    wait_status(server.url, "late", RunStatus.COMPLETED)


# -- sidecar restarts --------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_sdk_reconnects_when_the_sidecar_restarts(
    how: str, server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "2"])
    steps = 1000
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID=f"restart-{how}"), steps=steps,
                   keys=2, sleep=0.005)
    writer.wait_for_init()
    writer.wait_for_calls(150)
    if how == "SIGTERM":
        assert sidecar.stop() == 0
    else:
        sidecar.kill()
    assert writer.calls() < steps, "the restart must happen mid-run"
    time.sleep(0.5)  # the rank keeps logging with no sidecar at all
    sidecar.start()
    assert writer.proc.poll() is None, "the rank must still be logging when it is back"
    if how == "SIGKILL":
        assert events_named(sidecar, "replaced a stale socket file")
    report = writer.wait(60)
    assert report["undelivered"] == 0
    wait_delivered(server.url, f"restart-{how}", writer.expected())
    wait_status(server.url, f"restart-{how}", RunStatus.COMPLETED)


# -- bad clients -------------------------------------------------------------------


def test_malformed_payload_is_rejected_and_the_connection_lives_on(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    bad.handshake(writer=9)
    request_id = bad.send(FrameKind.CHUNK, b"\xc1\xc1 this is not msgpack")
    error = bad.error(request_id)
    assert error.fatal is False
    assert error.detail.startswith("invalid Chunk frame"), error.detail
    good.logged_through(bad, writer=9, step=0)  # the same connection still works
    bad.close()


def test_a_malformed_hello_can_be_retried(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    request_id = bad.send(FrameKind.HELLO, encode_msgpack({"protocol": PROTOCOL_VERSION}))
    error = bad.error(request_id)
    assert not error.fatal and error.detail.startswith("invalid Hello frame"), error
    bad.handshake()
    bad.close()


@pytest.mark.parametrize(("header", "says"), [
    pytest.param(FRAME_HEADER.pack(b"XX", PROTOCOL_VERSION, FrameKind.HELLO, 1, 10),
                 "bad magic", id="wrong magic"),
    pytest.param(FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION + 1, FrameKind.HELLO, 1, 10),
                 f"protocol version {PROTOCOL_VERSION + 1} is not supported (this side speaks "
                 f"{PROTOCOL_VERSION})", id="wrong protocol version"),
    pytest.param(FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, FrameKind.HELLO, 1,
                                   100 * 1024 * 1024),
                 f"larger than the limit of {MAX_FRAME_BYTES}", id="oversized frame"),
    pytest.param(FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, 99, 1, 10),
                 "unknown frame kind 99", id="unknown frame kind"),
])
def test_a_bad_header_is_fatal_for_that_client_only(
    header: bytes, says: str, pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    before = scrape(sidecar).get('pluto_sidecar_client_errors_total{reason="bad_header"}', 0)
    bad = RawClient(sidecar.socket)
    bad.send_raw(header)
    error = bad.error()
    assert error.fatal is True
    assert says in error.detail, error.detail
    assert bad.closed_by_peer()
    bad.close()
    after = scrape(sidecar)['pluto_sidecar_client_errors_total{reason="bad_header"}']
    assert after == before + 1


def test_an_oversized_frame_after_hello_is_fatal(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    bad.handshake()
    bad.send_raw(FRAME_HEADER.pack(FRAME_MAGIC, PROTOCOL_VERSION, FrameKind.CHUNK, 7,
                                   MAX_FRAME_BYTES + 1))
    error = bad.error()
    assert error.fatal and f"larger than the limit of {MAX_FRAME_BYTES}" in error.detail
    assert bad.closed_by_peer()
    bad.close()


def test_a_hello_with_another_protocol_is_fatal(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    request_id = bad.hello(protocol=PROTOCOL_VERSION + 1)
    error = bad.error(request_id)
    assert error.fatal is True
    assert f"protocol {PROTOCOL_VERSION + 1} is not supported" in error.detail
    assert f"speaks {PROTOCOL_VERSION}" in error.detail
    assert bad.closed_by_peer()
    bad.close()


def test_the_first_frame_must_be_hello(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    request_id = bad.send(FrameKind.CHUNK, bad.chunk_frame(writer=9, steps=[0], run=good.run))
    error = bad.error(request_id)
    assert error.fatal is True and "first frame must be HELLO" in error.detail
    assert bad.closed_by_peer()
    bad.close()


def test_a_node_rank_that_is_not_one_is_refused_and_the_connection_goes_on(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    client = RawClient(sidecar.socket)
    assert FEATURE_NODE in client.handshake().features
    for rank in (-1, 2**31):  # the writer label of system metrics: a 32-bit column
        request_id = client.send(FrameKind.NODE, encode_msgpack({"node_rank": rank}))
        error = client.error(request_id)
        assert not error.fatal and "GROUP_RANK" in error.detail and str(rank) in error.detail
    request_id = client.send(FrameKind.NODE, encode_msgpack({"node_rank": "one"}))
    assert not client.error(request_id).fatal
    client.send(FrameKind.NODE, encode_msgpack(NodeInfo(node_rank=0)))  # not answered
    good.logged_through(client, writer=8, step=1)
    client.close()


def test_gpus_that_are_not_uuids_are_refused_and_the_connection_goes_on(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    client = RawClient(sidecar.socket)
    client.handshake()
    for gpus, said in ((["GPU-a", ""], "is not a GPU UUID"),
                       (["GPU-" + "f" * 200], "is not a GPU UUID"),
                       ([f"GPU-{i}" for i in range(65)], "more than 64 GPUs")):
        error = client.error(client.send(FrameKind.NODE, encode_msgpack({"gpus": gpus})))
        assert not error.fatal and said in error.detail, error.detail
    assert not events_named(sidecar, "GPUs told by a rank")  # nothing of a refused frame kept
    good.logged_through(client, writer=7, step=1)
    client.close()


def test_the_gpus_the_ranks_name_are_the_pods_and_one_it_cannot_see_is_said_once(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """Two containers of a pod name their GPUs (the second repeats one): the sidecar keeps
    their union in the order told. It sees no GPU here (nor those UUIDs on any machine), so
    it warns, once per GPU, that it cannot report them; what it samples is tested with an
    NVML stand-in in test_sidecar_sysmetrics.py."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=["--sys-interval", "0.2"])
    first, second = RawClient(sidecar.socket), RawClient(sidecar.socket)
    first.handshake()
    second.handshake()
    first.send(FrameKind.NODE, encode_msgpack(NodeInfo(gpus=["GPU-b1", "GPU-a0", "GPU-b1"])))
    wait_until(lambda: events_named(sidecar, "GPUs told by a rank"), 10, "first NODE not seen")
    second.send(FrameKind.NODE, encode_msgpack(NodeInfo(node_rank=2, gpus=["GPU-a0", "GPU-c2"])))

    def warned() -> list[str]:
        return sorted(g for e in events_named(sidecar, "the ranks use GPUs")
                      for g in e["gpus"])  # type: ignore[attr-defined]

    wait_until(lambda: len(warned()) >= 3, 20, lambda: f"warned about {warned()}")
    told = events_named(sidecar, "GPUs told by a rank")
    assert [(e["gpus"], e["pod_gpus"]) for e in told] == [(["GPU-b1", "GPU-a0"], 2),
                                                         (["GPU-c2"], 3)]
    time.sleep(0.6)  # a few more samples: no more warnings about the same GPUs
    assert warned() == ["GPU-a0", "GPU-b1", "GPU-c2"]
    assert {e["level"] for e in events_named(sidecar, "the ranks use GPUs")} == {"warning"}
    assert [e["node_rank"] for e in events_named(sidecar, "node rank told by a rank")] == [2]
    first.close()
    second.close()


def test_a_frame_only_the_sidecar_sends_is_refused(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
) -> None:
    _, sidecar = pod
    bad = RawClient(sidecar.socket)
    bad.handshake()
    request_id = bad.send(FrameKind.ACK, encode_msgpack(Ack(seq=1)))
    error = bad.error(request_id)
    assert not error.fatal and "does not send ACK frames" in error.detail
    good.logged_through(bad, writer=9, step=1)  # ... and the connection goes on
    bad.close()


def test_a_silent_client_is_dropped_after_the_hello_timeout(
    pod: tuple[ServerProcess, SidecarProcess], good: GoodClient,
    spawn: Callable[..., Writer],
) -> None:
    """Waits out SidecarSettings.hello_timeout (10 s; no CLI flag sets it) while a real
    training process logs through the same sidecar."""
    server, sidecar = pod
    writer = spawn("busy", sidecar.client_env(PLUTO_RUN_ID="busy-while-silent"), steps=500,
                   keys=2, sleep=0.02)
    writer.wait_for_init()
    silent = RawClient(sidecar.socket, timeout=20)
    started = time.monotonic()
    error = silent.error()
    waited = time.monotonic() - started
    assert error.fatal is True and "no HELLO within 10s" in error.detail, error
    assert 9.0 <= waited <= 13.0, waited
    assert silent.closed_by_peer()
    silent.close()
    writer.wait(60)
    wait_delivered(server.url, "busy-while-silent", writer.expected())


# -- the socket file ---------------------------------------------------------------


def test_the_socket_is_group_writable_only(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    sidecar = sidecar_factory(server_factory().url, extra_args=QUIET)
    mode = os.stat(sidecar.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_a_stale_socket_file_is_replaced(
    server_factory: ServerFactory, tmp_path: Path,
) -> None:
    sidecar = SidecarProcess(tmp_path / "stale", server_factory().url, extra_args=QUIET)
    # What a killed sidecar leaves: a socket file that nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sidecar.socket))
    stale.close()
    assert stat.S_ISSOCK(os.stat(sidecar.socket).st_mode)
    with sidecar:
        assert events_named(sidecar, "replaced a stale socket file")
        assert stat.S_IMODE(os.stat(sidecar.socket).st_mode) == 0o660
        client = RawClient(sidecar.socket)
        client.handshake()
        client.close()


def test_a_live_socket_is_not_stolen(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory, tmp_path: Path,
) -> None:
    server = server_factory()
    first = sidecar_factory(server.url, extra_args=QUIET)
    inode = os.stat(first.socket).st_ino
    second = SidecarProcess(tmp_path / "second", server.url, extra_args=QUIET)
    second.socket = first.socket
    with pytest.raises(SidecarStartError):
        second.start(timeout=15)
    assert second.proc is not None and second.proc.returncode not in (0, None)
    assert "another sidecar is listening" in second.logs()
    # The first one still owns the very same socket file and serves on it.
    assert os.stat(first.socket).st_ino == inode
    assert httpx.get(first.health_url + "/readyz", timeout=5).status_code == 200
    client = RawClient(first.socket)
    client.handshake()
    client.close()


# -- the spool -----------------------------------------------------------------------


def spool_records(segment: Path) -> list[tuple[int, bytes]]:
    """(offset, payload) of each intact record of a sidecar spool segment."""
    data = segment.read_bytes()
    records: list[tuple[int, bytes]] = []
    offset = 0
    while offset + SPOOL_RECORD_HEADER.size <= len(data):
        length, _ = SPOOL_RECORD_HEADER.unpack_from(data, offset)
        payload = data[offset + SPOOL_RECORD_HEADER.size:offset + SPOOL_RECORD_HEADER.size
                       + length]
        if len(payload) < length:
            break
        records.append((offset, payload))
        offset += SPOOL_RECORD_HEADER.size + length
    return records


def points_in(records: list[tuple[int, bytes]]) -> dict[Point, float]:
    points: dict[Point, float] = {}
    for _, payload in records:
        if payload[:1] != b"C":
            continue
        chunk = msgspec.msgpack.decode(payload[1:], type=Chunk)
        for i, step in enumerate(chunk.steps):
            points[(chunk.keys[chunk.key_index[i]], step, chunk.writer)] = chunk.values[i]
    return points


def test_big_frames_from_two_clients_are_spooled_byte_for_byte(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """Frames of MBs are read into buffers the sidecar uses again (``FramePool``), by two
    clients at once, growing and shrinking: each spool record is exactly the frame sent."""
    server = server_factory(start=False)  # down: everything stays in the spool
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "0"])
    sent: dict[int, list[bytes]] = {}

    def client(writer: int) -> None:
        raw = RawClient(sidecar.socket)
        raw.handshake(writer)
        frames = sent.setdefault(writer, [])
        for points in (60_000, 15_000, 90_000, 30_000, 90_001, 12_000, 70_000):
            steps = list(range(writer * 10**6, writer * 10**6 + points))
            frames.append(raw.chunk_frame(writer=writer, steps=steps, project=PROJECT,
                                          run_ref="big-frames"))
            request_id = raw.send(FrameKind.CHUNK, frames[-1])
            kind, got_id, payload = raw.receive()
            assert (kind, got_id) == (FrameKind.ACK, request_id), payload
        raw.close()

    threads = [threading.Thread(target=client, args=(writer,)) for writer in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sidecar.stop() == 0
    assert all(len(frames) == 7 for frames in sent.values()), sent.keys()
    assert min(len(frame) for frames in sent.values() for frame in frames) > 256 * 1024

    spooled: dict[int, list[bytes]] = {1: [], 2: []}
    for segment in sorted((sidecar.spool_dir / "queue").glob("*.seg")):
        for _, payload in spool_records(segment):
            if payload[:1] == b"C":
                writer = msgspec.msgpack.decode(payload[1:], type=Chunk).writer
                spooled[writer].append(payload[1:])
    assert spooled == sent


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_torn_spool_tail_is_cut_and_the_rest_delivered(
    damage: str, server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "1"])
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID=f"torn-{damage}"), steps=200,
                   keys=2, sleep=0.002)
    writer.wait(60)
    assert sidecar.stop() == 0  # the server is down: everything stays in the spool

    segments = sorted((sidecar.spool_dir / "queue").glob("*.seg"))
    assert segments, list(sidecar.spool_dir.rglob("*"))
    last = segments[-1]
    records = spool_records(last)
    # Damage the last record that carries points (everything after it goes with it).
    victim = max(i for i, (_, payload) in enumerate(records)
                 if payload[:1] == b"C" and points_in([records[i]]))
    offset, payload = records[victim]
    if damage == "truncated":
        with open(last, "r+b") as handle:
            handle.truncate(offset + SPOOL_RECORD_HEADER.size + len(payload) // 2)
    else:
        with open(last, "r+b") as handle:
            handle.seek(offset + SPOOL_RECORD_HEADER.size + len(payload) // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0xFF]))
    intact = [r for seg in segments[:-1] for r in spool_records(seg)] + records[:victim]
    expected = points_in(intact)
    lost = points_in([records[victim]])
    assert expected and lost

    server.start()
    sidecar.start()
    torn = events_named(sidecar, "spool had a torn tail")
    assert torn, sidecar.logs()
    assert cast(int, torn[-1]["torn_bytes_cut"]) > 0
    opened = events_named(sidecar, "spool opened")[-1]
    assert opened["unsent_records"] == len(intact)
    wait_delivered(server.url, f"torn-{damage}", expected)


def test_sigterm_drains_a_backlog_within_the_deadline(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    """A pod: one sidecar, two ranks. The server is slow (stopped) while the ranks log and
    finish, so a backlog waits in the spool when the kubelet sends SIGTERM."""
    server = server_factory()
    drain = 10.0
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", str(drain)])
    go = tmp_path / "go"
    ranks = [spawn(f"rank{rank}", sidecar.client_env(PLUTO_RUN_ID="drain", RANK=str(rank)),
                   steps=400, keys=2, go=go) for rank in range(2)]
    for rank in ranks:
        assert rank.wait_for_init()["at_init"]["id"] > 0
    assert server.pid is not None and sidecar.proc is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        go.touch()
        for rank in ranks:
            assert rank.wait(60)["undelivered"] == 0  # acknowledged by the sidecar
        time.sleep(0.5)
        assert scrape(sidecar)["pluto_sidecar_spool_bytes"] > 0
        started = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    finally:
        os.kill(server.pid, signal.SIGCONT)  # the server catches up while the sidecar drains
    code = sidecar.proc.wait(drain + 10)
    took = time.monotonic() - started
    assert code == 0
    assert took <= drain + 1.0, took
    stopped = events_named(sidecar, "sidecar stopped")[-1]
    assert stopped["delivered"] is True and stopped["left_in_spool_bytes"] == 0, stopped
    expected = {**ranks[0].expected(), **ranks[1].expected()}
    wait_delivered(server.url, "drain", expected, timeout=5)
    wait_status(server.url, "drain", RunStatus.COMPLETED, timeout=5)


class Partition:
    """A TCP proxy in front of the server that can swallow requests: a network partition
    (or a server too busy to read them) that the sidecar cannot tell from a slow answer."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.swallowing = threading.Event()
        self.swallowed = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            lost = threading.Event()  # this connection lost bytes: it is half-dead now
            threading.Thread(target=self._pump, args=(client, upstream, lost, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, lost, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, lost: threading.Event,
              outbound: bool) -> None:
        try:
            while data := source.recv(65536):
                if outbound and self.swallowing.is_set():
                    self.swallowed += len(data)
                    lost.set()
                    continue
                sink.sendall(data)
        except OSError:
            pass
        # The server may close its side (keep-alive timeout); a half-dead connection does
        # not tell the client: only heal() ends it.
        if outbound or not lost.is_set():
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def heal(self) -> None:
        """Stop swallowing; connections that lost bytes are reset (as a partition ends)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.swallowing.clear()

    def close(self) -> None:
        self.listener.close()
        self.heal()


def test_sigterm_with_a_batch_stuck_in_flight_keeps_it_for_the_next_start(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """The deadline passes while a batch waits for an answer that never comes: the sidecar
    gives up on it and exits 0 in time, and neither that batch nor the records behind it
    are lost: the next start sends them."""
    server = server_factory()
    partition = Partition(server.port)
    try:
        drain = 2.0
        sidecar = sidecar_factory(partition.url,
                                  extra_args=[*QUIET, "--drain-seconds", str(drain)])
        client = RawClient(sidecar.socket)
        client.handshake(writer=2)
        opened = client.open_run(PROJECT, "in-flight")
        assert opened.run is not None
        partition.swallowing.set()
        expected: dict[Point, float] = {}
        for steps in ([0, 1, 2], [3, 4, 5]):
            request_id = client.send(FrameKind.CHUNK, client.chunk_frame(
                writer=2, steps=steps, run=opened.run.id))
            kind, got_id, _ = client.receive()
            assert (kind, got_id) == (FrameKind.ACK, request_id)
            expected.update({("good", s, 2): value(2, s, 0) for s in steps})
            # The forwarder sends the first chunk into the partition; the second waits.
            wait_until(lambda: partition.swallowed > 0, 10, "nothing was sent")
            time.sleep(0.5)
        client.close()
        # New connections get through again; the swallowed request still waits for an
        # answer on its half-dead connection when the kubelet sends SIGTERM.
        partition.swallowing.clear()
        assert sidecar.proc is not None
        started = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(drain + 10) == 0
        assert time.monotonic() - started <= drain + 1.5
        stopped = events_named(sidecar, "sidecar stopped")[-1]
        assert stopped["delivered"] is False, stopped
        assert find_run(server.url, "in-flight") is not None
        assert sum(stored_points(server.url, opened.run.id)[0].values()) == 0

        partition.heal()
        sidecar.start()
        wait_delivered(server.url, "in-flight", expected)
    finally:
        partition.close()


def test_sigterm_with_the_server_down_keeps_the_spool_for_the_next_start(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    server = server_factory(start=False)
    drain = 3.0
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", str(drain)])
    ranks = [spawn(f"rank{rank}", sidecar.client_env(PLUTO_RUN_ID="kept", RANK=str(rank)),
                   steps=200, keys=2) for rank in range(2)]
    for rank in ranks:
        rank.wait(60)
    started = time.monotonic()
    assert sidecar.stop() == 0
    assert time.monotonic() - started <= drain + 1.5
    stopped = events_named(sidecar, "sidecar stopped")[-1]
    assert stopped["delivered"] is False
    assert cast(int, stopped["left_in_spool_bytes"]) > 0
    assert not sidecar.socket.exists()  # nobody is left waiting on a dead socket

    server.start()
    sidecar.start()
    expected = {**ranks[0].expected(), **ranks[1].expected()}
    wait_delivered(server.url, "kept", expected)
    wait_status(server.url, "kept", RunStatus.COMPLETED)


def test_a_full_spool_slows_the_producer_down_and_drops_nothing(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    server = server_factory(start=False)
    cap = int(0.05 * 1024 * 1024)
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--spool-max-mb", "0.05"])
    steps = 4000
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="pressure"), steps=steps, keys=2,
                   settings={"max_buffered_calls": 50, "http_timeout": 120})
    writer.wait_for_init()
    wait_until(lambda: scrape(sidecar).get("pluto_sidecar_spool_bytes", 0) >= cap, 30,
               "the spool never filled up")
    # The producer is held up: its log() calls stop returning.
    time.sleep(1.0)
    stuck_at = writer.calls()
    time.sleep(2.0)
    assert writer.calls() == stuck_at < steps, (stuck_at, writer.calls())
    assert writer.proc.poll() is None
    spooled = scrape(sidecar)["pluto_sidecar_spool_bytes"]
    assert spooled < cap + 64 * 1024, spooled  # bounded: at most one frame past the cap

    server.start()
    report = writer.wait(90)
    assert report["max_log_seconds"] >= 2.0, report
    wait_delivered(server.url, "pressure", writer.expected())
    wait_status(server.url, "pressure", RunStatus.COMPLETED)


def test_a_chunk_the_server_refuses_goes_to_dead_letters(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    go = tmp_path / "go"
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="alive"), steps=200, keys=2,
                   sleep=0.005, go=go)
    writer.wait_for_calls(50)

    raw = RawClient(sidecar.socket)
    raw.handshake(writer=3)
    request_id = raw.send(FrameKind.CHUNK, raw.chunk_frame(
        writer=3, steps=[1, 2, 3], project="p", run_ref="never-opened"))
    kind, got_id, _ = raw.receive()
    assert (kind, got_id) == (FrameKind.ACK, request_id)  # spooled: the server decides later
    raw.close()

    wait_until(lambda: scrape(sidecar).get("pluto_sidecar_dead_letters_total") == 1, 30,
               lambda: f"no dead letter:\n{sidecar.logs()[-3000:]}")
    dead = msgspec.msgpack.decode((sidecar.spool_dir / "dead-letter.msgpack").read_bytes())
    assert dead["status"] == 404
    assert "never-opened" in dead["detail"] and "does not exist" in dead["detail"]
    assert dead["kind"] == "C"
    refused = msgspec.msgpack.decode(msgspec.msgpack.encode(dead["record"]), type=Chunk)
    assert (refused.run_ref, refused.steps) == ("never-opened", [1, 2, 3])
    assert events_named(sidecar, "record refused by the server")

    go.touch()  # the rest keeps flowing past it
    writer.wait(60)
    wait_delivered(server.url, "alive", writer.expected())
    wait_status(server.url, "alive", RunStatus.COMPLETED)
    assert scrape(sidecar)["pluto_sidecar_dead_letters_total"] == 1  # refused once, not retried


# -- health --------------------------------------------------------------------------


def test_health_readiness_and_metrics_through_an_outage(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "2"])
    assert httpx.get(sidecar.health_url + "/healthz", timeout=5).status_code == 200
    assert httpx.get(sidecar.health_url + "/readyz", timeout=5).status_code == 200
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="observed"), steps=100, keys=2)
    writer.wait(60)

    def retrying() -> bool:
        now = scrape(sidecar)
        return (now.get("pluto_sidecar_retries_total", 0) >= 1
                and now.get("pluto_sidecar_oldest_unsent_age_seconds", 0) > 0)

    wait_until(retrying, 20, "no retry or no unsent age while the server is down")
    during = scrape(sidecar)
    assert during["pluto_sidecar_spool_bytes"] > 0
    assert during["pluto_sidecar_oldest_unsent_age_seconds"] > 0
    assert during['pluto_sidecar_frames_in_total{kind="chunk"}'] >= 1
    assert during['pluto_sidecar_frames_in_total{kind="hello"}'] >= 1
    assert during['pluto_sidecar_frames_in_total{kind="open_run"}'] >= 1
    assert during["pluto_sidecar_points_in_total"] == 200
    assert during["pluto_sidecar_batches_sent_total"] == 0
    # Readiness is about the socket and the spool, not the server: ranks may keep logging.
    assert httpx.get(sidecar.health_url + "/readyz", timeout=5).status_code == 200

    server.start()
    wait_delivered(server.url, "observed", writer.expected())
    wait_until(lambda: scrape(sidecar)["pluto_sidecar_spool_bytes"] == 0, 10)
    after = scrape(sidecar)
    assert after["pluto_sidecar_batches_sent_total"] >= 1
    assert after["pluto_sidecar_points_sent_total"] == 200
    assert after["pluto_sidecar_retries_total"] >= 1
    assert after["pluto_sidecar_oldest_unsent_age_seconds"] == 0
    assert after["pluto_sidecar_dead_letters_total"] == 0
    # The run was opened first, and the server's answer said it takes zstd: every batch of
    # chunks went as zstd.
    assert after['pluto_sidecar_bytes_sent_total{encoding="zstd"}'] > 0
    assert 'pluto_sidecar_bytes_sent_total{encoding="gzip"}' not in after
    assert httpx.get(sidecar.health_url + "/healthz", timeout=5).status_code == 200


def test_the_oldest_unsent_age_keeps_growing_during_an_outage(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """The age is computed when scraped: it keeps growing through the forwarder's backoff
    sleeps (up to 45 s each), so an alert on it fires in time during an outage."""
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "1"])
    client = RawClient(sidecar.socket)
    client.handshake()
    request_id = client.send(FrameKind.CHUNK, client.chunk_frame(
        writer=0, steps=[0], project=PROJECT, run_ref="aging"))
    assert client.receive()[:2] == (FrameKind.ACK, request_id)
    spooled_at = time.monotonic()
    client.close()
    lags = []
    while time.monotonic() - spooled_at < 4:
        time.sleep(0.25)
        age = scrape(sidecar)["pluto_sidecar_oldest_unsent_age_seconds"]
        lags.append(round(time.monotonic() - spooled_at - age, 2))
    assert max(lags) < 0.5, f"the gauge lagged the real age by up to {max(lags)}s: {lags}"

    # A restart of the sidecar (the kubelet's, after a crash) finds the record in its spool:
    # the backlog is as old as before, not new (its age counts from when it was written).
    sidecar.kill()
    sidecar.start()
    age = scrape(sidecar)["pluto_sidecar_oldest_unsent_age_seconds"]
    real = time.monotonic() - spooled_at
    assert real - 0.5 < age <= real + 0.5, (age, real)


def test_the_oldest_unsent_age_stays_small_while_delivery_keeps_up(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """The age is that of the oldest record the server has not acknowledged, not the time
    since the spool was last empty (which, under steady load, it never is)."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    client = RawClient(sidecar.socket)
    client.handshake()
    opened = client.open_run(PROJECT, "steady")
    assert opened.run is not None
    ages: list[float] = []
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < 4:
        request_id = client.send(FrameKind.CHUNK, client.chunk_frame(
            writer=0, steps=[step], run=opened.run.id))
        assert client.receive()[:2] == (FrameKind.ACK, request_id)
        step += 1
        time.sleep(0.005)
        if step % 20 == 0:
            ages.append(round(scrape(sidecar)["pluto_sidecar_oldest_unsent_age_seconds"], 2))
    client.close()
    # Delivery keeps up: everything is on the server within moments of the last frame ...
    wait_delivered(server.url, "steady", {("good", s, 0): value(0, s, 0) for s in range(step)},
                   timeout=10)
    # ... so nothing was ever unsent for long (a batch waits --batch-max-age, 0.2 s).
    assert max(ages) < 1.0, f"oldest unsent age while delivery kept up: {ages}"


# -- system metrics ------------------------------------------------------------------


def test_the_node_rank_torchrun_gives_the_ranks_labels_the_system_metrics(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer],
) -> None:
    """The operator can only derive the node rank from the pod (an Indexed Job's completion
    index: repeated across the Jobs of a JobSet, absent for other pods). torchrun knows it
    (GROUP_RANK): the ranks tell the sidecar, whose system metrics follow."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=["--sys-interval", "0.5"], node_rank=0)
    writer = spawn("rank9", sidecar.client_env(PLUTO_RUN_ID="grouped", RANK="9",
                                               GROUP_RANK="4"), steps=30, keys=1, sleep=0.1)
    report = writer.wait(60)
    run = report["after_finish"]["id"]
    wait_until(lambda: len(stored(server.url, run, keys=["sys/cpu_percent"])
                           .get("sys/cpu_percent", [])) >= 2, 20,
               "fewer than 2 sys/cpu_percent samples")
    system = stored(server.url, run, keys=["sys/cpu_percent"])["sys/cpu_percent"]
    assert {row.writer for row in system} == {4}
    assert {row.writer for row in stored(server.url, run, keys=["k0"])["k0"]} == {9}
    told = events_named(sidecar, "node rank told by a rank")
    assert [(e["node_rank"], e["previous"]) for e in told] == [(4, 0)]


def test_system_metrics_are_labelled_with_the_node_and_not_inherited_by_forks(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=["--sys-interval", "0.5"], node_rank=3)
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="sys"), steps=30, keys=1,
                   sleep=0.1)
    report = writer.wait(60)
    run = report["after_finish"]["id"]
    wait_until(lambda: len(stored(server.url, run, keys=["sys/cpu_percent"])
                           .get("sys/cpu_percent", [])) >= 2, 20,
               "fewer than 2 sys/cpu_percent samples")
    own = stored(server.url, run)
    system = {key: rows for key, rows in own.items() if key.startswith("sys/")}
    assert {"sys/cpu_percent", "sys/mem_used_bytes", "sys/mem_percent"} <= system.keys()
    assert {row.writer for rows in system.values() for row in rows} == {3}
    assert not [key for key in system if key.startswith("sys/gpu")]  # no GPU here, no noise
    assert {row.writer for row in own["k0"]} == {0}
    assert "Traceback" not in sidecar.logs()

    # The sidecar steps system metrics by the clock: log one point past them, so that a
    # fork below it puts every parent sys/ point inside the inherited range.
    newest = max(row.step for rows in system.values() for row in rows)
    settings = {"url": server.url, "sidecar_socket": None, "console": False}
    with pluto.init(project=PROJECT, run_id="sys", dir=tmp_path / "direct",
                    settings=settings) as parent:
        parent.log({"k0": 1.0}, step=newest + 1000)
    with pluto.init(project=PROJECT, run_id="sys-fork", fork_run_id=run,
                    fork_step=newest + 500, dir=tmp_path / "direct",
                    settings=settings) as fork:
        fork.log({"k0": 2.0})
    stitched = stored(server.url, fork.id, lineage=True)
    assert not [key for key in stitched if key.startswith("sys/")], sorted(stitched)
    assert {row.run for row in stitched["k0"]} == {run, fork.id}  # other keys are inherited
    asked = stored(server.url, fork.id, lineage=True, keys=["sys/cpu_percent"])
    assert not asked.get("sys/cpu_percent"), asked
    assert stored(server.url, run, keys=["sys/cpu_percent"])["sys/cpu_percent"]


# -- credentials ---------------------------------------------------------------------


def test_the_training_process_needs_no_credentials(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    server = server_factory(start=False, extra_args=["--auth"])
    key = create_api_key(server.data_dir, "sidecar")
    assert key and "\n" not in key
    server.start()
    key_file = tmp_path / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    # Auth is really on: no key, no data.
    with pytest.raises(RequestRejected) as refused:
        query.list_runs(PROJECT, url=server.url, api_key="")
    assert refused.value.status_code == 401

    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--api-key-file", str(key_file)])
    env = sidecar.client_env(PLUTO_RUN_ID="no-creds")
    assert "PLUTO_API_KEY" not in env and "PLUTO_URL" not in env
    writer = spawn("rank0", env, steps=100, keys=2)
    report = writer.wait(60)
    assert report["env"] == ["PLUTO_RUN_ID", "PLUTO_SIDECAR_SOCKET"], report["env"]
    assert report["after_finish"]["id"] > 0
    wait_delivered(server.url, "no-creds", writer.expected(), api_key=key)
    wait_status(server.url, "no-creds", RunStatus.COMPLETED, api_key=key)

    assert sidecar.pid is not None
    cmdline = Path(f"/proc/{sidecar.pid}/cmdline").read_bytes().decode()
    assert key not in cmdline
    environ = Path(f"/proc/{sidecar.pid}/environ").read_bytes().decode(errors="replace")
    assert key not in environ
    assert key not in sidecar.logs()
    secret = key[-12:]  # the secret part may itself hold "_"
    assert secret not in sidecar.logs()


def test_a_rotated_api_key_keeps_the_data_and_the_new_key_file_is_picked_up(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    """A 401 is about the key, not the data: the sidecar must not bury a single chunk while
    the server refuses its key, and a Secret mounted as a file is read again, so the rotated
    key is used without a restart and everything spooled meanwhile arrives, once."""
    server = server_factory(start=False, extra_args=["--auth"])
    old_key = create_api_key(server.data_dir, "before-rotation")
    server.start()
    key_file = tmp_path / "api-key"
    key_file.write_text(old_key + "\n")
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--api-key-file", str(key_file)])
    go = tmp_path / "go"
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="rotated"), steps=200, keys=2,
                   go=go)
    wait_until(lambda: writer.report() is not None, 30, writer.logs)
    at_init = cast(dict[str, Any], writer.report())["at_init"]
    # The first half of the steps, logged before the writer waits for ``go``.
    wait_delivered(server.url, "rotated", expected_points(at_init["writer"], 100, 2),
                   api_key=old_key)

    # The key is rotated while the run goes on: the old one revoked, a new one made.
    server.stop()
    revoke_api_key(server.data_dir, old_key)
    new_key = create_api_key(server.data_dir, "after-rotation")
    server.start()
    go.touch()
    report = writer.wait(60)  # the sidecar acknowledged every chunk: they are in its spool
    assert report["after_finish"]["id"] > 0
    refused = "the server refuses the sidecar's API key"
    wait_until(lambda: bool(events_named(sidecar, refused)), 30,
               lambda: f"the sidecar never met the refused key: {sidecar.logs()}")
    time.sleep(1.0)  # a few more tries with the old key
    assert scrape(sidecar)["pluto_sidecar_dead_letters_total"] == 0
    assert not (sidecar.spool_dir / "dead-letter.msgpack").exists()
    assert sidecar.proc is not None and sidecar.proc.poll() is None

    # The kubelet rewrites the mounted Secret: the next try reads the new key.
    key_file.write_text(new_key + "\n")
    wait_delivered(server.url, "rotated", writer.expected(), api_key=new_key)
    wait_status(server.url, "rotated", RunStatus.COMPLETED, api_key=new_key)
    assert events_named(sidecar, "API key read again from its file")
    assert scrape(sidecar)["pluto_sidecar_dead_letters_total"] == 0
    assert new_key not in sidecar.logs() and old_key not in sidecar.logs()


def test_an_optional_api_key_file_may_appear_later_and_nothing_waits_in_vain(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
    spawn: Callable[..., Writer], tmp_path: Path,
) -> None:
    """The operator mounts the Secret with ``optional: true`` (a server without auth needs
    none): a sidecar whose key file is not there starts without a key, keeps what the server
    refuses for it, warns once about the unreadable file at most, and uses the key from the
    moment the kubelet writes the file (the Secret was created later)."""
    server = server_factory(start=False, extra_args=["--auth"])
    key = create_api_key(server.data_dir, "created-later")
    server.start()
    key_file = tmp_path / "secret" / "api-key"  # the Secret volume's folder, empty for now
    key_file.parent.mkdir()
    sidecar = sidecar_factory(server.url, extra_args=[
        *QUIET, "--api-key-file", str(key_file), "--api-key-optional"])
    writer = spawn("rank0", sidecar.client_env(PLUTO_RUN_ID="key-later"), steps=50, keys=1)
    report = writer.wait(60)  # the sidecar took every chunk while the server refused it
    assert report["after_finish"]["id"] == 0  # pending: the server refused the open
    refused = "the server refuses the sidecar's API key"
    wait_until(lambda: len(events_named(sidecar, refused)) >= 2, 30, sidecar.logs)
    assert not events_named(sidecar, "cannot read the API key file")

    key_file.write_text(key + "\n")
    wait_delivered(server.url, "key-later", writer.expected(), api_key=key)
    wait_status(server.url, "key-later", RunStatus.COMPLETED, api_key=key)
    assert scrape(sidecar)["pluto_sidecar_dead_letters_total"] == 0

    key_file.unlink()  # the Secret is deleted: the key in use stays, said once
    spawn("rank1", sidecar.client_env(PLUTO_RUN_ID="key-later", RANK="1"), steps=5,
          keys=1).wait(60)
    wait_status(server.url, "key-later", RunStatus.COMPLETED, api_key=key)
    assert len(events_named(sidecar, "cannot read the API key file")) == 1
    assert key not in sidecar.logs()


def test_exit_when_idle_waits_for_a_client_then_exits_after_the_last_leaves(
    shared_server: ServerProcess, sidecar_factory: SidecarFactory,
) -> None:
    """Classic sidecar containers (before Kubernetes 1.29) have nobody to SIGTERM them when
    the training ends: ``--exit-when-idle`` lets the pod complete. It must not exit before any
    client came, nor while one is connected, and it delivers what the client sent."""
    sidecar = sidecar_factory(shared_server.url, extra_args=[*QUIET, "--exit-when-idle", "1"])
    assert sidecar.proc is not None
    time.sleep(2.0)
    assert sidecar.proc.poll() is None, "exited before any client connected"
    client = RawClient(sidecar.socket)
    client.handshake(writer=0)
    opened = client.open_run(PROJECT, "idle-exit")
    assert opened.run is not None
    request_id = client.send(FrameKind.CHUNK, client.chunk_frame(
        writer=0, steps=[0, 1, 2], run=opened.run.id))
    assert client.receive()[:2] == (FrameKind.ACK, request_id)
    time.sleep(2.0)
    assert sidecar.proc.poll() is None, "exited while a client was connected"
    client.close()
    assert sidecar.proc.wait(15) == 0
    counts, _ = stored_points(shared_server.url, opened.run.id)
    assert counts == Counter({("good", step, 0): 1 for step in range(3)})


# -- found by review: opens the cache must not answer, runs that are over ------------


def logged(client: RawClient, run: int, steps: list[int], *, writer: int = 0,
           finish: RunStatus | None = None) -> None:
    """Send one chunk of ``steps`` to ``run`` and wait for its ACK."""
    request_id = client.send(FrameKind.CHUNK, client.chunk_frame(
        writer=writer, steps=steps, run=run, finish=finish))
    kind, got_id, payload = client.receive()
    assert (kind, got_id) == (FrameKind.ACK, request_id), (kind, payload)


def wait_last_step(url: str, run_ref: str, last_step: int) -> None:
    wait_until(lambda: getattr(find_run(url, run_ref), "last_step", None) == last_step, 20,
               lambda: f"{run_ref}: last_step is not {last_step}: {find_run(url, run_ref)}")


def test_a_resume_after_the_ranks_left_is_answered_by_the_server_not_the_cache(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """A process restarted in the same pod with ``resume=True`` goes on after the run's last
    step: the sidecar's cached answer is the one from the run's creation (no last step),
    and used to restart the steps at 0. Ranks of the restarted job that open it while
    another of them is on share one answer, so they agree on where to go on."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    first = RawClient(sidecar.socket)
    first.handshake()
    created = first.open_run(PROJECT, "restarted")
    assert created.run is not None and created.run.last_step is None
    logged(first, created.run.id, [0, 1, 2, 3, 4])
    first.close()  # the process ends (crashed: no final status)
    wait_last_step(server.url, "restarted", 4)

    rank0 = RawClient(sidecar.socket)
    rank0.handshake(writer=0)
    resumed = rank0.open_run(PROJECT, "restarted", resume=True)
    assert resumed.run is not None, resumed
    assert (resumed.run.id, resumed.run.resumed) == (created.run.id, True)
    assert resumed.run.last_step == 4  # was None: the cached answer of the creation
    logged(rank0, created.run.id, [5, 6])
    wait_last_step(server.url, "restarted", 6)
    # Another rank of the restarted job, while rank 0 is on: the same answer as rank 0's.
    rank1 = RawClient(sidecar.socket)
    rank1.handshake(writer=1)
    same = rank1.open_run(PROJECT, "restarted", resume=True)
    assert same.run is not None and same.run.last_step == 4, same
    # A plain attach of a rank of the job is answered from the cache as before.
    plain = RawClient(sidecar.socket)
    plain.handshake(writer=2)
    attached = plain.open_run(PROJECT, "restarted")
    assert attached.run is not None and attached.run.resumed is True
    for client in (rank0, rank1, plain):
        client.close()


def test_a_resume_right_after_the_last_chunk_waits_for_it_to_reach_the_server(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """The run's last step counts what reached the server: a resume that comes while the
    previous attempt's last chunk is still in the sidecar's spool waits for it."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--batch-max-age", "1.5"])
    first = RawClient(sidecar.socket)
    first.handshake()
    created = first.open_run(PROJECT, "quick-restart")
    assert created.run is not None
    logged(first, created.run.id, [0, 1, 2], finish=RunStatus.COMPLETED)
    first.close()
    again = RawClient(sidecar.socket)
    again.handshake()
    resumed = again.open_run(PROJECT, "quick-restart", resume=True)
    assert resumed.run is not None and resumed.run.last_step == 2, resumed
    again.close()


def test_a_fork_open_of_a_run_the_cache_knows_as_another_is_asked_of_the_server(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """An open with fork arguments needs the server's answer: to a run that is not that
    fork the server says no (409), where the cache used to attach it silently."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    parent = RawClient(sidecar.socket)
    parent.handshake()
    opened = parent.open_run(PROJECT, "fork-parent")
    assert opened.run is not None
    logged(parent, opened.run.id, list(range(10)))
    wait_last_step(server.url, "fork-parent", 9)
    plain = RawClient(sidecar.socket)
    plain.handshake()
    assert plain.open_run(PROJECT, "not-a-fork").run is not None  # stays on: cache is warm
    forker = RawClient(sidecar.socket)
    forker.handshake(writer=1)
    request_id = forker.send(FrameKind.OPEN_RUN, encode_msgpack(RunCreate(
        project=PROJECT, run_id="not-a-fork", fork_run_id="fork-parent", fork_step=5)))
    error = forker.error(request_id)
    assert "409" in error.detail, error
    for client in (parent, plain, forker):
        client.close()


def test_a_resume_pending_on_the_server_says_its_steps_start_again(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """With the server away, a ``resume=True`` open is pending and its last step unknown:
    the answer the SDK gets says so (and the sidecar's log), instead of nothing."""
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--open-wait", "1",
                                                          "--drain-seconds", "1"])
    client = RawClient(sidecar.socket)
    client.handshake()
    opened = client.open_run(PROJECT, "resume-pending", resume=True)
    assert opened.run is None and opened.pending is not None
    assert "resume=True" in opened.pending and "last step" in opened.pending, opened.pending
    assert "start again from 0" in opened.pending
    (event,) = events_named(sidecar, "run pending")
    assert event["resume"] is True and "last step" in str(event["reason"])
    plain = RawClient(sidecar.socket)
    plain.handshake()
    other = plain.open_run(PROJECT, "plain-pending")
    assert other.pending is not None and "resume" not in other.pending
    client.close()
    plain.close()


def test_system_metrics_stop_once_the_run_is_finished_and_come_back_when_it_resumes(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """A finished run whose clients are gone gets no more ``sys/`` points (they used to
    arrive for ever, after COMPLETED); a rank that resumes it brings them back."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=["--sys-interval", "0.2"])
    client = RawClient(sidecar.socket)
    client.handshake()
    opened = client.open_run(PROJECT, "sys-over")
    assert opened.run is not None
    run = opened.run.id

    def samples() -> int:
        rows = stored(server.url, run, keys=["sys/cpu_percent"]).get("sys/cpu_percent", [])
        return len(rows)

    logged(client, run, [0])
    wait_until(lambda: samples() >= 2, 20, "no system metrics while the run is on")
    logged(client, run, [1], finish=RunStatus.COMPLETED)
    client.close()
    wait_status(server.url, "sys-over", RunStatus.COMPLETED)
    time.sleep(0.5)  # what was spooled before the final chunk is delivered by now
    settled = samples()
    time.sleep(1.5)  # 7 intervals
    assert samples() == settled, "system metrics kept coming after the run was finished"

    again = RawClient(sidecar.socket)
    again.handshake()
    assert again.open_run(PROJECT, "sys-over", resume=True).run is not None
    wait_until(lambda: samples() > settled, 20, "no system metrics after the resume")
    again.close()


def test_an_update_of_a_run_whose_id_is_all_digits_reaches_that_run(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """``run_id="2"`` (job ids make good run ids): the server reads ``/runs/2`` as the run
    whose numeric id is 2, so an update named by external id landed on another run."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    client = RawClient(sidecar.socket)
    client.handshake()
    ids = {}
    for ref in ("first", "other", "2"):
        opened = client.open_run(PROJECT, ref)
        assert opened.run is not None
        ids[ref] = opened.run.id
    assert ids["other"] == 2 and ids["2"] != 2  # the collision this test is about
    request_id = client.send(FrameKind.UPDATE_RUN, encode_msgpack(RunUpdateRequest(
        project=PROJECT, run_ref="2", update=RunUpdate(config={"lr": 0.1}))))
    assert client.receive()[:2] == (FrameKind.UPDATED, request_id)
    wait_until(lambda: getattr(find_run(server.url, str(ids["2"])), "config", {})
               .get("lr") == 0.1, 20, "the update did not reach run_id '2'")
    other = find_run(server.url, "other")
    assert other is not None and "lr" not in other.config, other.config
    assert not events_named(sidecar, "record refused")
    client.close()


def test_an_update_spooled_while_the_run_is_pending_reaches_it_by_numeric_id(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """While the run is pending its numeric id is not known: the update waits behind its
    OPEN in the spool and is then sent to the run the server created, by numeric id."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--open-wait", "1"])
    client = RawClient(sidecar.socket)  # runs 1 and 2 first: run_id "2" is not numeric 2
    client.handshake()
    for ref in ("first", "other"):
        assert client.open_run(PROJECT, ref).run is not None
    client.close()
    server.stop()
    pending = RawClient(sidecar.socket)
    pending.handshake()
    opened = pending.open_run(PROJECT, "2")
    assert opened.run is None and opened.pending
    request_id = pending.send(FrameKind.UPDATE_RUN, encode_msgpack(RunUpdateRequest(
        project=PROJECT, run_ref="2", update=RunUpdate(config={"lr": 0.2}))))
    assert pending.receive()[:2] == (FrameKind.UPDATED, request_id)
    server.start()
    wait_until(lambda: any(r.run_id == "2" and r.config.get("lr") == 0.2
                           for r in query.list_runs(PROJECT, url=server.url)), 30,
               "the update did not reach run_id '2'")
    other = find_run(server.url, "other")
    assert other is not None and "lr" not in other.config, other.config
    pending.close()


def test_an_update_left_in_the_spool_by_a_previous_sidecar_reaches_the_run_it_names(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    """After a restart of the sidecar its cache is empty: an update it finds in the spool
    looks the run's numeric id up by external id first, and so reaches run_id "2"."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*QUIET, "--drain-seconds", "1"])
    client = RawClient(sidecar.socket)
    client.handshake()
    for ref in ("first", "other", "2"):
        assert client.open_run(PROJECT, ref).run is not None
    server.stop()
    request_id = client.send(FrameKind.UPDATE_RUN, encode_msgpack(RunUpdateRequest(
        project=PROJECT, run_ref="2", update=RunUpdate(config={"lr": 0.3}))))
    assert client.receive()[:2] == (FrameKind.UPDATED, request_id)
    client.close()
    assert sidecar.stop() == 0  # the update stays in the spool
    sidecar.start()
    server.start()
    wait_until(lambda: any(r.run_id == "2" and r.config.get("lr") == 0.3
                           for r in query.list_runs(PROJECT, url=server.url)), 30,
               "the update did not reach run_id '2'")
    other = find_run(server.url, "other")
    assert other is not None and "lr" not in other.config, other.config


# -- found by review: errors at start, readiness -------------------------------------


def run_sidecar_cli(args: list[str], env: dict[str, str] | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pluto", "sidecar", *args],
                          env={**clean_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_an_api_key_file_that_is_not_there_is_a_one_line_error_naming_the_flag(
    tmp_path: Path,
) -> None:
    result = run_sidecar_cli(["--socket", str(tmp_path / "pluto.sock"), "--spool-dir",
                              str(tmp_path / "spool"), "--health-port", "0",
                              "--api-key-file", str(tmp_path / "no-such-key")])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --api-key-file") and "no-such-key" in line, line
    assert not (tmp_path / "pluto.sock").exists()


def test_an_optional_api_key_without_a_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_sidecar_cli(["--socket", str(tmp_path / "pluto.sock"), "--spool-dir",
                              str(tmp_path / "spool"), "--health-port", "0",
                              "--api-key-optional"])
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "--api-key-optional" in line and "give --api-key-file" in line, line
    assert not (tmp_path / "pluto.sock").exists()


@pytest.mark.parametrize(("flags", "env", "named"), [
    ([], {"PLUTO_NODE_RANK": "node1"}, "PLUTO_NODE_RANK='node1'"),
    ([], {"PLUTO_NODE_RANK": "2147483648"}, "PLUTO_NODE_RANK='2147483648'"),
    (["--node-rank", "-1"], {}, "--node-rank -1"),
    (["--node-rank", "2147483648"], {"PLUTO_NODE_RANK": "0"}, "--node-rank 2147483648"),
], ids=["env-not-a-number", "env-past-32-bits", "flag-negative", "flag-past-32-bits"])
def test_a_node_rank_that_is_not_one_is_a_one_line_error_naming_where_it_came_from(
    tmp_path: Path, flags: list[str], env: dict[str, str], named: str,
) -> None:
    """The node rank labels the node's system metrics, which the server refuses unless it
    is 0 to 2**31-1: found at start, not as dead letters every few seconds."""
    result = run_sidecar_cli(["--socket", str(tmp_path / "pluto.sock"), "--spool-dir",
                              str(tmp_path / "spool"), "--health-port", "0", *flags], env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert named in line and "2**31-1" in line, line
    assert not (tmp_path / "pluto.sock").exists()


def test_an_unknown_log_level_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    result = run_sidecar_cli(["--socket", str(tmp_path / "pluto.sock"), "--spool-dir",
                              str(tmp_path / "spool"), "--health-port", "0",
                              "--log-level", "verbose"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--log-level: invalid choice: 'VERBOSE'" in result.stderr
    assert not (tmp_path / "pluto.sock").exists()


def test_a_health_port_in_use_is_one_json_line_naming_the_flag_and_leaves_no_socket(
    tmp_path: Path,
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = run_sidecar_cli(["--socket", str(tmp_path / "pluto.sock"), "--spool-dir",
                                  str(tmp_path / "spool"), "--server", "http://127.0.0.1:9",
                                  "--health-port", str(port)])
    finally:
        busy.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    events = [json.loads(line) for line in lines]  # every line JSON: no traceback
    (refusal,) = [e for e in events if e["event"] == "not starting"]
    assert "--health-port" in str(refusal["error"]) and str(port) in str(refusal["error"])
    assert not (tmp_path / "pluto.sock").exists()
    assert not (tmp_path / "api.sock").exists()


def test_readyz_fails_while_the_socket_file_is_gone(
    server_factory: ServerFactory, sidecar_factory: SidecarFactory,
) -> None:
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=QUIET)
    assert httpx.get(sidecar.health_url + "/readyz", timeout=5).status_code == 200
    sidecar.socket.unlink()  # still listening, but no rank can find it
    ready = httpx.get(sidecar.health_url + "/readyz", timeout=5)
    assert ready.status_code == 503
    assert str(sidecar.socket) in ready.text
