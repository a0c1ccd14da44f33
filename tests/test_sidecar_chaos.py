"""Fault injection through the per-pod sidecar (issue 3): real processes, real sockets,
a real server, and the promises of ARCHITECTURE.md "Data path and its promises".

Training processes (``scripts/chaos_writer.py``, ``scripts/chaos_ddp.py``) log
deterministic values through a sidecar into one run (shared ``PLUTO_RUN_ID``,
``RANK`` = writer) while the sidecar or the server is killed, stopped and
restarted. Afterwards the server must hold every expected (key, step, writer,
value) exactly once: nothing lost, nothing duplicated, compared point by point
and by checksum.

The short versions run in the normal suite; the long ones (50 kill rounds, the
spec's 30 s outage) carry the ``chaos`` marker and run only with
``PLUTO_CHAOS=1`` (``make chaos``). ``PLUTO_CHAOS_SEED`` replays the random
kill schedule of a failed run (every failure message prints its seed).
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
from support.postgres import free_port
from support.server_process import ServerProcess
from support.sidecar_process import SidecarProcess

from pluto import query
from pluto.query import MetricBucket, MetricRow

SCRIPTS = Path(__file__).resolve().parent / "scripts"
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


@pytest.fixture(autouse=True)
def _run_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes (``python -m pluto sidecar`` among them) start in the test's own
    directory: a folder of the repository root (``operator/``) must not shadow a stdlib
    module for ``python -m`` run from there."""
    monkeypatch.chdir(tmp_path)


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
                  ranks: Iterable[int] | None = None) -> Writers:
    """``count`` chaos_writer processes (RANK 0..count-1) logging through ``sidecar``."""
    directory.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in (range(count) if ranks is None else ranks):
        env = sidecar.client_env(PLUTO_RUN_ID=run_ref, PLUTO_PROJECT=PROJECT, RANK=str(rank))
        with open(directory / f"writer-{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WRITER), str(steps), "--keys", str(keys),
                 "--every", str(every), "--pause", str(pause),
                 "--ready", str(directory / f"ready-{rank}"),
                 "--report", str(directory / f"report-{rank}.json")],
                cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT))
    return Writers(procs, directory)


def chaos_seed() -> int:
    configured = os.environ.get("PLUTO_CHAOS_SEED")
    return int(configured) if configured else random.SystemRandom().randrange(1 << 31)


# -- kill -9 of the sidecar under load --------------------------------------------------


def kill_sidecar_rounds(server: ServerProcess, sidecar: SidecarProcess, tmp_path: Path, *,
                        rounds: int, steps: int, every: int, pause: float) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"sidecar-kill-{seed}"
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=every,
                            pause=pause)
    kills: list[tuple[float, float]] = []
    try:
        writers.wait_ready()
        start = time.monotonic()
        for _ in range(rounds):
            up = rng.uniform(0.3, 2.5)
            time.sleep(up)
            under_load = writers.alive
            sidecar.kill()
            down = rng.uniform(0.0, 1.0)
            time.sleep(down)
            sidecar.start()
            kills.append((round(up, 2), round(down, 2)))
            assert under_load or len(kills) > rounds // 2, "the writers finished too early"
        chaos_seconds = time.monotonic() - start
        reports = writers.wait(timeout=180)
    finally:
        writers.kill()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it), {len(kills)} kills in "
               f"{chaos_seconds:.1f}s (up, down seconds): {kills}")
    assert all(r["undelivered_bytes"] == 0 for r in reports), f"{context}\n{reports}"
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s for delivery")
    assert run_status(server, run_ref) == "COMPLETED"
    opened = [e for e in sidecar.events() if e.get("event") == "spool opened"]
    assert len(opened) == len(kills) + 1, context  # the spool was recovered at each restart


def test_sidecar_kill9_under_load(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """4 writers; the sidecar is SIGKILLed 4 times at random moments and restarted on
    the same socket and spool: every point arrives exactly once."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    # ~12 s of logging per writer: 4,000 calls of 10 scalars, a pause every 50 calls.
    kill_sidecar_rounds(server, sidecar, tmp_path, rounds=4, steps=4000, every=50, pause=0.15)


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(900)
def test_sidecar_kill9_many_rounds(server_factory: ServerFactory,
                                   sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    kill_sidecar_rounds(server, sidecar, tmp_path, rounds=50, steps=50_000, every=50,
                        pause=0.15)


def test_sidecar_kill9_with_backlog(server_factory: ServerFactory,
                                   sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The server is away from the start, so the run stays pending and 1,000,000 points
    (more than one 16 MB spool segment) pile up in the sidecar's spool; the sidecar is
    SIGKILLed while the writers log into it and again while the backlog is forwarded
    after the server came up: every point arrives exactly once, in order."""
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"backlog-kill-{seed}"
    server = server_factory(start=False)
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--open-wait", "1"])
    steps = 25_000
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=500,
                            pause=0.1)
    kills: list[str] = []
    try:
        writers.wait_ready()
        for _ in range(2):
            time.sleep(rng.uniform(0.2, 1.5))
            kills.append(f"logging, {'writers alive' if writers.alive else 'writers done'}, "
                         f"{sidecar_metric(sidecar, 'spool_bytes')} bytes spooled")
            sidecar.kill()
            time.sleep(rng.uniform(0.0, 0.5))
            sidecar.start()
        reports = writers.wait(timeout=180)
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    backlog = sidecar_metric(sidecar, "spool_bytes") or 0
    expected = expected_points(range(4), steps, 10)
    total = sum(expected.values())
    server.start()
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 2.0))
        stored = stored_count(server, run_ref)
        if stored >= total:
            break
        kills.append(f"forwarding, {stored} points stored")
        sidecar.kill()
        time.sleep(rng.uniform(0.0, 0.5))
        sidecar.start()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); backlog {backlog:.0f} "
               f"bytes; sidecar SIGKILLed: {kills}")
    assert backlog > 16 * 1024 * 1024, context  # the backlog spans spool segments
    waited = wait_delivered(server, [sidecar], run_ref, total, timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context


# -- the server away under load -----------------------------------------------------------


def server_outage(server: ServerProcess, sidecar: SidecarProcess, tmp_path: Path, *,
                  outage: float, steps: int, every: int, pause: float,
                  spool_cap: int | None = None) -> None:
    run_ref = f"outage-{int(outage)}s"
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=every,
                            pause=pause)
    try:
        writers.wait_ready()
        time.sleep(1.5)
        before = stored_count(server, run_ref)
        server.stop()
        peak = 0.0
        until = time.monotonic() + outage
        while time.monotonic() < until:
            peak = max(peak, sidecar_metric(sidecar, "spool_bytes") or 0)
            time.sleep(0.1)
        assert writers.alive, "the writers finished before the server came back: no load"
        spooled = sidecar_metric(sidecar, "spool_bytes") or 0
        server.start()
        back = time.monotonic()
        reports = writers.wait(timeout=120 + outage)
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()),
                            timeout=90 + outage)
    context = (f"{outage:.0f}s outage; {before} points stored before it, {spooled:.0f} bytes "
               f"spooled at its end; delivered {time.monotonic() - back:.1f}s after the "
               f"server was back (waited {waited:.1f}s after the writers finished)")
    assert before > 0, context
    assert spooled > 0, context
    if spool_cap is not None:  # back-pressure held the spool near its cap
        assert spooled >= spool_cap * 0.5, context
        assert peak <= spool_cap + 2 * 1024 * 1024, f"spool peaked at {peak:.0f}: {context}"
    assert_exactly_once(stored_points(server, run_ref), expected, context)
    assert_times_follow_steps(server, run_ref)
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert (sidecar_metric(sidecar, "retries_total") or 0) > 0, context


def test_server_outage_under_load(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The server is stopped for 5 s while 4 writers log, with a 1 MB spool cap so that
    back-pressure holds the writers back: everything arrives, once, and each writer's
    points are applied and stored in order."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--spool-max-mb", "1"])
    # ~10 s of logging, 400 calls of 10 scalars a second per writer: small chunks, so the
    # spool can overshoot its cap by little (one frame per connection at most).
    server_outage(server, sidecar, tmp_path, outage=5, steps=4000, every=20, pause=0.05,
                  spool_cap=1024 * 1024)


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(600)
def test_server_outage_30s_under_load(server_factory: ServerFactory,
                                      sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """The spec's case: the server is away for 30 s under load."""
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    server_outage(server, sidecar, tmp_path, outage=30, steps=8000, every=40, pause=0.2)


# -- kill -9 of the server while a backlog is forwarded ----------------------------------


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres",
                                                             marks=pytest.mark.postgres)])
def test_server_kill9_mid_batch(database: str, server_factory: ServerFactory,
                                sidecar_factory: SidecarFactory, tmp_path: Path,
                                request: pytest.FixtureRequest) -> None:
    """A backlog of 600,000 points waits in the sidecar's spool (the server was never up);
    while it is forwarded the server is SIGKILLed three times, mid-batch, and restarted:
    every batch is applied exactly once."""
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"server-kill-{seed}"
    database_url = (request.getfixturevalue("fresh_pg_url") if database == "postgres"
                    else None)
    server = server_factory(database_url, start=False)
    # 256 KB batches: about 50 of them, so the backlog takes many round trips and there is a
    # batch on the wire for each kill (with 1 MB batches a fast server sometimes took the
    # whole backlog before the first kill).
    sidecar = sidecar_factory(server.url, extra_args=[*SIDECAR_ARGS, "--open-wait", "1",
                                                      "--batch-max-kb", "256"])
    steps = 15_000
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps)
    try:
        reports = writers.wait(timeout=120)  # everything is in the sidecar's spool now
    finally:
        writers.kill()
    assert all(r["undelivered_bytes"] == 0 and r["id"] == 0 for r in reports), reports
    expected = expected_points(range(4), steps, 10)
    total = sum(expected.values())
    backlog = sidecar_metric(sidecar, "spool_bytes") or 0
    assert backlog > 10_000_000, f"only {backlog} bytes spooled"

    kills: list[tuple[int, float]] = []
    server.start()
    for _ in range(3):
        # Kill while the forwarder has a batch on the wire: once something of this round
        # was sent, after a random delay, and only while the backlog is not all through.
        sent_before = sidecar_metric(sidecar, "batches_sent_total") or 0
        deadline = time.monotonic() + 60
        next_count = time.monotonic() + 1
        while (sidecar_metric(sidecar, "batches_sent_total") or 0) <= sent_before:
            # The rest of the backlog may have gone through while the server restarted
            # (counted once a second: a count reads every block).
            if time.monotonic() > next_count:
                if stored_count(server, run_ref) >= total:
                    break
                next_count = time.monotonic() + 1
            assert time.monotonic() < deadline, "the forwarder sent nothing for 60 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))
        stored = stored_count(server, run_ref)
        if stored >= total:
            break
        server.kill()
        kills.append((stored, sidecar_metric(sidecar, "spool_bytes") or 0))
        time.sleep(rng.uniform(0.0, 1.0))
        server.start()
    context = (f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); {backlog:.0f} bytes of "
               f"backlog; server SIGKILLed at (points stored, bytes still spooled): {kills}")
    assert kills, f"the backlog went through before any kill: {context}"
    waited = wait_delivered(server, [sidecar], run_ref, total, timeout=120)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s for the rest")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    # The server's answers count freshly applied points only: a batch committed just before
    # a kill and sent again is answered as a duplicate, so the sum can fall short, never over.
    sent = sidecar_metric(sidecar, "points_sent_total") or 0
    assert sent <= total, context
    assert (sidecar_metric(sidecar, "retries_total") or 0) > 0, context
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context


# -- everything at once ------------------------------------------------------------------


@pytest.mark.chaos
@long_chaos
@pytest.mark.timeout(900)
def test_mixed_faults_many_rounds(server_factory: ServerFactory,
                                  sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    """40 rounds of a random fault while 4 writers log: SIGKILL the sidecar, SIGKILL or
    SIGTERM the server, or SIGKILL both; then restart what was taken down."""
    seed = chaos_seed()
    rng = random.Random(seed)
    run_ref = f"mixed-{seed}"
    server = server_factory()
    sidecar = sidecar_factory(server.url, extra_args=SIDECAR_ARGS)
    steps = 30_000
    writers = start_writers(sidecar, tmp_path / "writers", run_ref, 4, steps, every=50,
                            pause=0.15)
    faults: list[str] = []
    try:
        writers.wait_ready()
        for _ in range(40):
            time.sleep(rng.uniform(0.2, 2.0))
            fault = rng.choice(["kill sidecar", "kill server", "stop server", "kill both"])
            faults.append(fault if writers.alive else f"{fault} (writers done)")
            if fault in ("kill sidecar", "kill both"):
                sidecar.kill()
            if fault in ("kill server", "kill both"):
                server.kill()
            if fault == "stop server":
                server.stop()
            time.sleep(rng.uniform(0.0, 1.5))
            if not server.running:
                server.start()
            if sidecar.proc is not None and sidecar.proc.poll() is not None:
                sidecar.start()
        reports = writers.wait(timeout=300)
    finally:
        writers.kill()
    context = f"seed {seed} (PLUTO_CHAOS_SEED={seed} replays it); faults: {faults}"
    assert all(r["undelivered_bytes"] == 0 for r in reports), f"{context}\n{reports}"
    expected = expected_points(range(4), steps, 10)
    waited = wait_delivered(server, [sidecar], run_ref, sum(expected.values()), timeout=180)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"{context}\nwaited {waited:.1f}s")
    assert_stored_in_order(server, run_ref)
    assert run_status(server, run_ref) == "COMPLETED"
    assert sidecar_metric(sidecar, "dead_letters_total") == 0, context


# -- two nodes, one run -----------------------------------------------------------------


def test_two_torchrun_nodes_each_with_its_sidecar(server_factory: ServerFactory,
                                                  sidecar_factory: SidecarFactory,
                                                  tmp_path: Path) -> None:
    """Two torchrun groups (--nnodes=2, static rendezvous on loopback, gloo), each with
    its own sidecar, all ranks sharing PLUTO_RUN_ID: one run holds all four ranks'
    points exactly once, and each node's sidecar forwarded its own two ranks."""
    server = server_factory()
    sidecars = [sidecar_factory(server.url, extra_args=SIDECAR_ARGS, node_rank=node)
                for node in range(2)]
    steps, keys, run_ref = 8, 4, "two-nodes"
    out = tmp_path / "ranks"
    out.mkdir()
    port = free_port()
    launcher = Path(sys.executable).with_name("torchrun")
    prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m",
                                                        "torch.distributed.run"]
    nodes = []
    for node, sidecar in enumerate(sidecars):
        env = sidecar.client_env(PLUTO_RUN_ID=run_ref, PLUTO_PROJECT=PROJECT,
                                 GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        log = open(tmp_path / f"node-{node}.log", "wb")  # noqa: SIM115
        nodes.append((log, subprocess.Popen(
            [*prefix, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(DDP), str(out),
             str(steps)],
            cwd=tmp_path, env=env, stdout=log,
            stderr=subprocess.STDOUT)))
    try:
        for node, (log, proc) in enumerate(nodes):
            try:
                code = proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            output = (tmp_path / f"node-{node}.log").read_text(errors="replace")[-5000:]
            assert code == 0, f"torchrun node {node} exited {code}:\n{output}"
    finally:
        for _, proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    reports = sorted((json.loads(p.read_text()) for p in out.glob("rank-*.json")),
                     key=lambda r: r["rank"])
    assert [(r["rank"], r["node"], r["writer"]) for r in reports] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 1, 3)]
    assert {r["run_id"] for r in reports} == {run_ref}
    assert len({r["id"] for r in reports}) == 1 and reports[0]["id"] > 0  # one run
    assert all(r["undelivered_bytes"] == 0 for r in reports), reports
    assert [r["socket"] for r in reports] == [str(sidecars[r["node"]].socket)
                                              for r in reports]

    expected = expected_points(range(4), steps, keys)
    waited = wait_delivered(server, sidecars, run_ref, sum(expected.values()), timeout=60)
    assert_exactly_once(stored_points(server, run_ref), expected,
                        f"two nodes (waited {waited:.1f}s)")
    rows = stored_rows(server, run_ref)
    world = sorted((row.step, row.writer, row.value) for row in rows["ddp/world"])
    assert world == [(s, w, 6.0 + 4 * s) for s in range(steps) for w in range(4)]
    assert sorted((row.writer, row.step) for row in rows["ddp/loss"]) == [
        (w, s) for w in range(4) for s in range(steps)]
    assert len(query.list_runs(PROJECT, url=server.url)) == 1
    # Each node's sidecar carried its own two ranks' points, and only those.
    per_rank = steps * (keys + 2)
    for node, sidecar in enumerate(sidecars):
        assert sidecar_metric(sidecar, "points_in_total") == 2 * per_rank, f"node {node}"
        assert sidecar_metric(sidecar, "points_sent_total") == 2 * per_rank, f"node {node}"
    assert run_status(server, run_ref) == "COMPLETED"
