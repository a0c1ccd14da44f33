"""Shared by the fault-injection suite (``tests/chaos/``): writer processes that log known
values through a sidecar, and the checks that the server holds each of them exactly once.

Training-like processes (``scripts/chaos_writer.py``) log deterministic values (:func:`value`)
into one run (shared ``PLUTO_RUN_ID``, ``RANK`` = writer). A test computes every expected
(key, step, writer, value) with :func:`expected_points` and compares it with what the server
holds (:func:`assert_exactly_once`: nothing lost, nothing duplicated, point by point and by
checksum). :func:`chaos_seed` gives the seed of a random fault schedule: ``PLUTO_CHAOS_SEED``
replays one, and every failure message prints it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
import sqlalchemy as sa

from pluto import query
from pluto.query import MetricBucket, MetricRow

from .server_process import ServerProcess
from .sidecar_process import SidecarProcess

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
WRITER = SCRIPTS / "chaos_writer.py"
DDP = SCRIPTS / "chaos_ddp.py"
PROJECT = "chaos"
PREFIX = "chaos/k"
#: No system metrics: every point in the run is one a test process logged.
SIDECAR_ARGS = ["--sys-interval", "0"]

CHAOS = os.environ.get("PLUTO_CHAOS", "").strip().lower() in {"1", "true", "yes"}
long_chaos = pytest.mark.skipif(not CHAOS, reason="long fault injection: set PLUTO_CHAOS=1 "
                                                  "(make chaos)")

SidecarFactory = Callable[..., SidecarProcess]
ServerFactory = Callable[..., ServerProcess]
#: (key, step, writer, value)
Point = tuple[str, int, int, float]


# -- expected and stored points ------------------------------------------------------


def value(writer: int, key: int, step: int) -> float:
    """What ``chaos_writer.value`` logs (exact in binary floating point)."""
    return writer * 1_000_000.0 + step + key / 16


def expected_points(writers: Iterable[int], steps: int, keys: int) -> Counter[Point]:
    return Counter((f"{PREFIX}{j}", step, writer, value(writer, j, step))
                   for writer in writers for step in range(steps) for j in range(keys))


def stored_rows(server: ServerProcess, run_ref: str) -> dict[str, list[MetricRow]]:
    return query.get_metrics(run_ref, project=PROJECT, url=server.url)


def stored_points(server: ServerProcess, run_ref: str) -> Counter[Point]:
    return Counter((key, row.step, cast(int, row.writer), row.value)
                   for key, rows in stored_rows(server, run_ref).items()
                   if key.startswith(PREFIX) for row in rows)


def stored_count(server: ServerProcess, run_ref: str) -> int:
    """How many of the test's points the server holds (one bucket per series: cheap)."""
    try:
        series: dict[str, list[MetricBucket]] = query.get_metrics(
            run_ref, project=PROJECT, url=server.url, buckets=1)
    except Exception:  # the server is down, or the run is not there yet
        return -1
    counts = [bucket.points for key, buckets in series.items() if key.startswith(PREFIX)
              for bucket in buckets]
    return sum(counts)


def checksum(points: Counter[Point]) -> str:
    digest = hashlib.sha256()
    for point, count in sorted(points.items()):
        digest.update(f"{point!r}*{count};".encode())
    return digest.hexdigest()[:16]


def assert_exactly_once(got: Counter[Point], expected: Counter[Point], context: str) -> None:
    """Every expected (key, step, writer, value) once; nothing else."""
    missing = expected - got
    duplicated = {point: count for point, count in got.items()
                  if count > 1 and point in expected}
    unexpected = {point: count for point, count in got.items() if point not in expected}
    if missing or duplicated or unexpected:
        per_writer: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for point, count in missing.items():
            per_writer[point[2]][0] += count
        for point, count in duplicated.items():
            per_writer[point[2]][1] += count - 1
        for point, count in unexpected.items():
            per_writer[point[2]][2] += count
        summary = ", ".join(f"writer {w}: {m} missing, {d} extra copies, {u} unexpected"
                            for w, (m, d, u) in sorted(per_writer.items()))
        pytest.fail(
            f"{context}\nexpected {sum(expected.values())} points (checksum "
            f"{checksum(expected)}), the server holds {sum(got.values())} (checksum "
            f"{checksum(got)}): {len(missing)} missing, {len(duplicated)} duplicated, "
            f"{len(unexpected)} unexpected\n{summary}\n"
            f"first missing: {sorted(missing)[:5]}\nfirst duplicated: "
            f"{sorted(duplicated.items())[:5]}\nfirst unexpected: {sorted(unexpected)[:5]}",
            pytrace=False,
        )
    assert sum(got.values()) == sum(expected.values())
    assert checksum(got) == checksum(expected)


def assert_times_follow_steps(server: ServerProcess, run_ref: str) -> None:
    """Per writer and key, the stored points' ``time`` never goes back as steps go up."""
    for key, rows in stored_rows(server, run_ref).items():
        if not key.startswith(PREFIX):
            continue
        by_writer: dict[int | None, list[MetricRow]] = defaultdict(list)
        for row in rows:
            by_writer[row.writer].append(row)
        for writer, points in by_writer.items():
            points.sort(key=lambda r: r.step)
            backwards = [(a.step, b.step) for a, b in itertools.pairwise(points)
                         if b.time < a.time]
            assert not backwards, f"{key} writer {writer}: time goes back at {backwards[:5]}"


def assert_stored_in_order(server: ServerProcess, run_ref: str) -> None:
    """Per writer, the server applied the chunks in sequence and stored steps in order.

    Reads the server's database: each writer session's ``ingest_log`` rows are
    seq 0..n-1 with no gap and ``applied_at`` never going back as seq goes up, and
    per (key, writer) the metric blocks in insertion (id) order cover strictly
    increasing step ranges.
    """
    url = server.database_url or f"sqlite:///{server.data_dir / 'pluto.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            run_id = con.execute(sa.text(
                "SELECT runs.id FROM runs JOIN projects ON projects.id = runs.project_id "
                "WHERE projects.name = :project AND runs.external_id = :ref"),
                {"project": PROJECT, "ref": run_ref}).scalar_one()
            applied_rows = con.execute(sa.text(
                "SELECT session, seq, applied_at FROM ingest_log WHERE run_id = :run "
                "ORDER BY session, seq"), {"run": run_id}).all()
            block_rows = con.execute(sa.text(
                "SELECT key_id, writer, id, step_min, step_max FROM metric_blocks "
                "WHERE run_id = :run ORDER BY key_id, writer, id"), {"run": run_id}).all()
    finally:
        engine.dispose()
    sessions: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for session, seq, applied_at in applied_rows:
        sessions[str(session)].append((int(seq), float(applied_at)))
    blocks: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for key_id, writer, block_id, low, high in block_rows:
        blocks[(int(key_id), int(writer))].append((int(block_id), int(low), int(high)))
    assert sessions, "no chunk was applied"
    for session, applied in sessions.items():
        seqs = [seq for seq, _ in applied]
        assert seqs == list(range(len(seqs))), f"session {session}: seqs {seqs[:20]}..."
        late = [(a, b) for a, b in itertools.pairwise(applied) if b[1] < a[1]]
        assert not late, f"session {session}: chunks applied out of order: {late[:5]}"
    for (key_id, writer), ranges in blocks.items():
        back = [(a, b) for a, b in itertools.pairwise(ranges) if b[1] <= a[2]]
        assert not back, f"key {key_id} writer {writer}: blocks stored out of step order " \
                         f"{back[:5]}"


def run_status(server: ServerProcess, run_ref: str) -> str:
    return str(query.get_run(run_ref, project=PROJECT, url=server.url).status)


# -- sidecar metrics ------------------------------------------------------------------


def sidecar_metric(sidecar: SidecarProcess, name: str) -> float | None:
    """A sample of ``pluto_sidecar_<name>`` (None if the sidecar does not answer)."""
    try:
        text = sidecar.metrics()
    except httpx.HTTPError:
        return None
    wanted = f"pluto_sidecar_{name} "
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[1])
    return None


def wait_delivered(server: ServerProcess, sidecars: list[SidecarProcess], run_ref: str,
                   total: int, timeout: float) -> float:
    """Wait until the server holds ``total`` points and every sidecar's spool is empty;
    returns the seconds waited (the caller checks exactness)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if stored_count(server, run_ref) >= total and all(
                sidecar_metric(s, "spool_bytes") == 0 for s in sidecars):
            return time.monotonic() - start
        time.sleep(0.25)
    return time.monotonic() - start


# -- writer processes -----------------------------------------------------------------


@dataclass
class Writers:
    procs: list[subprocess.Popen[bytes]]
    directory: Path

    def log(self, rank: int) -> str:
        path = self.directory / f"writer-{rank}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    @property
    def alive(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for rank, proc in enumerate(self.procs):
            while not (self.directory / f"ready-{rank}").exists():
                assert proc.poll() is None or proc.returncode == 0, (
                    f"writer {rank} exited {proc.returncode} before init() returned:\n"
                    + self.log(rank))
                assert time.monotonic() < deadline, f"writer {rank} not ready:\n{self.log(rank)}"
                time.sleep(0.05)

    def wait(self, timeout: float) -> list[dict[str, object]]:
        """Wait for every writer; each must exit 0 with everything handed to the sidecar."""
        deadline = time.monotonic() + timeout
        for rank, proc in enumerate(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for other in self.procs:
                    other.kill()
                pytest.fail(f"writer {rank} did not finish within {timeout:.0f}s:\n"
                            + self.log(rank), pytrace=False)
            assert proc.returncode == 0, f"writer {rank} exited {proc.returncode}:\n" \
                                         + self.log(rank)
        return [json.loads((self.directory / f"report-{rank}.json").read_text())
                for rank in range(len(self.procs))]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_writers(sidecar: SidecarProcess, directory: Path, run_ref: str, count: int,
                  steps: int, *, every: int = 0, pause: float = 0.0, keys: int = 10,
                  ranks: Iterable[int] | None = None,
                  http_timeout: float | None = None) -> Writers:
    """``count`` chaos_writer processes (RANK 0..count-1) logging through ``sidecar``;
    ``http_timeout`` overrides the SDK's socket timeout (30 s)."""
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in (range(count) if ranks is None else ranks):
        env = sidecar.client_env(PLUTO_RUN_ID=run_ref, PLUTO_PROJECT=PROJECT, RANK=str(rank))
        with open(directory / f"writer-{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WRITER), str(steps), "--keys", str(keys),
                 "--every", str(every), "--pause", str(pause),
                 "--ready", str(directory / f"ready-{rank}"),
                 "--report", str(directory / f"report-{rank}.json"),
                 *([] if http_timeout is None else ["--http-timeout", str(http_timeout)])],
                cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT))
    return Writers(procs, directory)


def chaos_seed() -> int:
    configured = os.environ.get("PLUTO_CHAOS_SEED")
    return int(configured) if configured else random.SystemRandom().randrange(1 << 31)
