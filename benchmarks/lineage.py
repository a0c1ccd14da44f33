"""Stitched lineage queries through a real server: latency by chain depth and points.

    .venv/bin/python benchmarks/lineage.py [--depths 1,10,100,1000] [--points 1e5,1e6,1e7]
        [--repeat 20] [--rounds 1] [--database-url URL] [--profile DEPTH:POINTS]

For every (depth, points) a chain of ``depth`` runs is built through the HTTP API:
run 0 logs steps ``[0, n)``, run ``i`` forks run ``i-1`` at step ``i*n - 1`` and logs
``[i*n, (i+1)*n)``, so the leaf's stitched series of ``loss`` spans the whole chain,
``points`` points in all, each owned by a different run every ``n`` steps. Points go in
through ``POST /api/v1/ingest`` as MessagePack chunks of at most 100k points (what the
SDK sends). Then ``GET /api/v1/runs/{leaf}/metrics?keys=loss&lineage=true`` is timed,
downsampled (``buckets=1000``) and raw (up to ``--raw-max`` points): ``--warmup``
requests, then ``--repeat`` timed ones on one keep-alive connection, p50 and p95, and
the points read per second at the p50 (the server reads every point of the chain for
either query), and the server process's user/system CPU per request (from ``/proc``).
``--rounds`` repeats the timed requests and reports the median.

SQLite by default (a database file this script owns, so ``--profile`` can open it);
``--database-url postgresql://...`` measures PostgreSQL (an empty database: every
project here is new). ``--profile DEPTH:POINTS`` then runs the server's query function
(``pluto_server.queries.run_metrics``) in-process against the same database under
cProfile and prints where its time goes.

Target (issue): p50 <= 50 ms at depth 100 and 1e6 points, bucketed to 1000; cost no
worse than linear in points read. The default grid takes about 3 minutes on a 2-core
machine (setting up the 1e7-point chains takes 5-15 s each; their queries most of the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import math
import os
import platform
import pstats
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import msgspec
import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from _server import server_process
from rich.console import Console
from rich.table import Table

import pluto
from pluto.wire import (
    API_PREFIX,
    MSGPACK,
    Chunk,
    IngestBatch,
    MetricQueryResult,
    encode_msgpack,
)
from pluto_server.database import normalize_url

KEY = "loss"
BUCKETS = 1000
TARGET_MS = 50.0


@dataclass
class Chain:
    depth: int
    points: int
    project: str
    leaf: int
    ingest_s: float
    requests: int


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)
    answer_bytes: int = 0
    #: The server process's CPU per timed request (user, system), ms; NaN off Linux.
    server_cpu_ms: tuple[float, float] = (math.nan, math.nan)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Row:
    chain: Chain
    bucketed: list[Timing]  # one per round
    raw: list[Timing] | None

    @staticmethod
    def median(timings: list[Timing], q: float) -> float:
        return statistics.median(t.quantile(q) for t in timings)


def count(text: str) -> int:
    """``1e6``, ``1000000`` or ``1_000_000``."""
    value = float(text.replace("_", ""))
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of points: {text!r}")
    return int(value)


def counts(text: str) -> list[int]:
    return [count(part) for part in text.split(",") if part.strip()]


def human(points: int) -> str:
    exponent = int(math.log10(points))
    return f"1e{exponent}" if 10**exponent == points else f"{points:,}"


def build_chain(client: httpx.Client, depth: int, points: int, chunk_points: int) -> Chain:
    """``depth`` runs, each forking the previous one at its last step, ``points`` in all."""
    if points < depth:
        raise SystemExit(f"{points} points cannot span {depth} runs (one point each at least)")
    project = f"bench-lineage-d{depth}-p{points}-{uuid.uuid4().hex[:6]}"
    bounds = [points * i // depth for i in range(depth + 1)]  # run i owns [bounds[i], bounds[i+1])
    rng = np.random.default_rng(depth * 7919 + points)
    session = uuid.uuid4().hex
    start = time.perf_counter()
    requests = 0
    run_id = 0
    for i in range(depth):
        body: dict[str, Any] = {"project": project, "name": f"chain-{i}"}
        if i:
            body.update(fork_run_id=str(run_id), fork_step=bounds[i] - 1)
        resp = client.post("/runs", json=body)
        if resp.status_code != 201:
            raise SystemExit(f"creating run {i} of the chain: {resp.status_code} {resp.text}")
        run_id = int(resp.json()["id"])
        requests += 1
        for seq, first in enumerate(range(bounds[i], bounds[i + 1], chunk_points)):
            last = min(first + chunk_points, bounds[i + 1])
            steps: npt.NDArray[np.int64] = np.arange(first, last, dtype=np.int64)
            values = 2.0 / (1.0 + steps * 1e-5) + rng.normal(0.0, 0.01, len(steps))
            chunk = Chunk(run=run_id, session=session, seq=seq, writer=0, keys=[KEY],
                          key_index=[0] * len(steps), steps=steps.tolist(),
                          values=values.tolist(), times=(1.7e9 + steps * 0.01).tolist())
            resp = client.post("/ingest", content=encode_msgpack(IngestBatch(chunks=[chunk])),
                               headers={"content-type": MSGPACK})
            if resp.status_code != 200:
                raise SystemExit(f"ingest into run {i}: {resp.status_code} {resp.text}")
            requests += 1
    return Chain(depth, points, project, run_id, time.perf_counter() - start, requests)


def check(client: httpx.Client, chain: Chain) -> None:
    """The leaf's stitched series holds every point of the chain, owned by every run."""
    result = query(client, chain.leaf, buckets=BUCKETS)
    (series,) = result.series
    held = sum(series.counts or [])
    owners = len(set(series.owners))
    if held != chain.points or owners != chain.depth:
        raise SystemExit(f"depth {chain.depth}: the stitched series has {held} points from "
                         f"{owners} runs, expected {chain.points} from {chain.depth}")


def params(buckets: int | None) -> dict[str, str | int]:
    found: dict[str, str | int] = {"keys": KEY, "lineage": "true"}
    if buckets is not None:
        found["buckets"] = buckets
    return found


def query(client: httpx.Client, leaf: int, buckets: int | None) -> MetricQueryResult:
    resp = client.get(f"/runs/{leaf}/metrics", params=params(buckets),
                      headers={"accept": MSGPACK})
    resp.raise_for_status()
    return msgspec.msgpack.decode(resp.content, type=MetricQueryResult)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def timed(client: httpx.Client, server_pid: int, leaf: int, buckets: int | None, warmup: int,
          repeat: int, accept: str) -> Timing:
    """Wall time of whole requests: sent, answered, body read (not decoded)."""
    path = f"/runs/{leaf}/metrics"
    args = params(buckets)
    headers = {"accept": accept}
    timing = Timing()
    for _ in range(warmup):
        client.get(path, params=args, headers=headers).raise_for_status()
    user, system = cpu_seconds(server_pid)
    for _ in range(repeat):
        start = time.perf_counter()
        resp = client.get(path, params=args, headers=headers)
        elapsed = time.perf_counter() - start
        resp.raise_for_status()
        timing.samples_ms.append(elapsed * 1000)
        timing.answer_bytes = len(resp.content)
    user_after, system_after = cpu_seconds(server_pid)
    timing.server_cpu_ms = ((user_after - user) * 1000 / repeat,
                            (system_after - system) * 1000 / repeat)
    return timing


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """The database URL the server and ``--profile`` share: ours, unless one is given."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="pluto-bench-lineage-") as directory:
        yield f"sqlite:///{Path(directory) / 'pluto.db'}"


def profile(url: str, chain: Chain, top: int) -> None:
    """Where one bucketed query's time goes inside the server's query function."""
    from pluto_server.database import Database
    from pluto_server.lineage import chain_cte
    from pluto_server.queries import MetricQuery, fetch_blocks, run_metrics, stitched_blocks

    console = Console(width=max(150, Console().width))
    db = Database(url)
    request = MetricQuery(run_id=chain.leaf, keys=[KEY], lineage=True, buckets=BUCKETS)
    with db.read() as conn:
        key_id = conn.execute(sa.text(
            "SELECT k.id FROM metric_keys k JOIN projects p ON p.id = k.project_id "
            "WHERE p.name = :project AND k.key = :key"),
            {"project": chain.project, "key": KEY}).scalar_one()
        blocks_sql = stitched_blocks(conn)
        chain_sql = chain_cte(conn) + "SELECT count(*) FROM chain"
    # As the server runs it: no ORDER BY, the rows put in arrival order (id) in Python.
    statement = sa.text(blocks_sql).bindparams(sa.bindparam("key_ids", expanding=True))
    ordered = sa.text(blocks_sql + " ORDER BY b.id").bindparams(  # as it was before
        sa.bindparam("key_ids", expanding=True))
    bind: dict[str, int | list[int]] = {"run_id": chain.leaf, "key_ids": [key_id],
                                        "step_min": -(2**63), "step_max": 2**63 - 1}

    def best(action: Any, times: int = 7) -> float:
        samples = []
        for _ in range(times):
            with db.read() as conn:
                start = time.perf_counter()
                action(conn)
                samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)

    blocks: list[Any] = []

    def fetch(conn: Any) -> None:
        blocks[:] = sorted(fetch_blocks(conn, statement, bind), key=lambda row: row[0])

    def numpy_steps(what: str) -> float:
        """Concatenating the stitched series (as the server), checking its order, or sorting
        it (the server sorts only when the check fails)."""
        columns: list[list[npt.NDArray[Any]]] = [[], [], []]
        for row in blocks:  # id, run_id, key_id, writer, step_min, step_max, steps, vals, times
            columns[0].append(np.frombuffer(row[6], dtype="<i8"))
            columns[1].append(np.frombuffer(row[7], dtype="<f8"))
            columns[2].append(np.frombuffer(row[8], dtype="<f8"))
        start = time.perf_counter()
        steps, values, times = (np.concatenate(column) for column in columns)
        owners: npt.NDArray[np.int64] = np.repeat(
            np.array([row[1] for row in blocks], dtype=np.int64),
            [len(row[6]) // 8 for row in blocks])
        concatenated = time.perf_counter()
        increasing = bool(np.all(steps[1:] > steps[:-1]))
        checked = time.perf_counter()
        order = np.lexsort((times, steps))
        steps, values, times, owners = steps[order], values[order], times[order], owners[order]
        done = time.perf_counter()
        assert increasing  # the benchmark's chains are logged in order
        return 1000 * {"concat": concatenated - start, "check": checked - concatenated,
                       "sort": done - checked}[what]

    phases = {
        "recursive CTE alone (walk the chain)": best(
            lambda conn: conn.execute(sa.text(chain_sql), {"run_id": chain.leaf}).scalar_one()),
        "SQL: chain + blocks, fetched and put in id order (as the server)": best(fetch),
        "as before: ORDER BY b.id in SQL (PostgreSQL: bytea as text), fetched": best(
            lambda conn: conn.execute(ordered, bind).all()),
    }
    phases["numpy: concatenate 3 columns of every block, np.repeat the owners"] = (
        statistics.median(numpy_steps("concat") for _ in range(7)))
    phases["numpy: check that the steps strictly increase (the server skips the sort)"] = (
        statistics.median(numpy_steps("check") for _ in range(7)))
    phases["numpy: lexsort by (step, time) + gather 4 columns (when unsorted)"] = (
        statistics.median(numpy_steps("sort") for _ in range(7)))
    phases["run_metrics in all (SQL + numpy + lists)"] = best(
        lambda conn: run_metrics(conn, request))
    with db.read() as conn:
        result = run_metrics(conn, request)
    start = time.perf_counter()
    for _ in range(20):
        encode_msgpack(result)
    phases["encode_msgpack of the answer"] = (time.perf_counter() - start) * 1000 / 20
    nbytes = sum(len(row[6]) + len(row[7]) + len(row[8]) for row in blocks)
    table = Table(title=f"in-process, depth {chain.depth}, {human(chain.points)} points, "
                        f"{BUCKETS} buckets (median of 7)")
    table.add_column("phase")
    table.add_column("ms", justify="right")
    for name, ms in phases.items():
        table.add_row(name, f"{ms:.2f}")
    console.print(table)
    console.print(f"blocks read: {len(blocks):,}, {nbytes / 2**20:.1f} MiB of packed columns")
    if db.is_sqlite:
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as raw:
            plan = raw.execute(
                "EXPLAIN QUERY PLAN " + blocks_sql.replace(":key_ids", f"({key_id})")
                .replace(":run_id", str(chain.leaf)).replace(":step_min", str(-(2**63)))
                .replace(":step_max", str(2**63 - 1))).fetchall()
        console.print("SQLite plan: " + "; ".join(str(row[-1]) for row in plan))
    profiler = cProfile.Profile()
    with db.read() as conn:
        profiler.enable()
        for _ in range(5):
            run_metrics(conn, request)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    console.print(f"cProfile of 5 run_metrics calls, by own time:\n{out.getvalue()}",
                  markup=False, highlight=False)
    db.dispose()


def versions(url: str) -> str:
    parts = [f"Python {platform.python_version()}", f"pluto {pluto.__version__}"]
    if url.startswith("sqlite"):
        parts.append(f"SQLite {sqlite3.sqlite_version}")
    else:
        engine = sa.create_engine(normalize_url(url))
        with engine.connect() as conn:
            parts.append(f"PostgreSQL {conn.exec_driver_sql('SHOW server_version').scalar_one()}")
        engine.dispose()
    parts.append(f"httpx {httpx.__version__}")
    return ", ".join(parts)


def slope(rows: list[Row], depth: int) -> str:
    """The exponent of p50 against points at one depth: 1.0 is linear."""
    mine = sorted((r for r in rows if r.chain.depth == depth), key=lambda r: r.chain.points)
    if len(mine) < 2:
        return ""
    first, last = mine[0], mine[-1]
    grown = Row.median(last.bucketed, 0.5) / Row.median(first.bucketed, 0.5)
    return f"{math.log(grown) / math.log(last.chain.points / first.chain.points):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=counts, default=[1, 10, 100, 1000],
                        help="chain depths, comma-separated (default 1,10,100,1000)")
    parser.add_argument("--points", type=counts, default=[100_000, 1_000_000, 10_000_000],
                        help="total points of each chain, comma-separated (default 1e5,1e6,1e7)")
    parser.add_argument("--repeat", type=int, default=20, help="timed requests per query")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the timed requests; the table has the median")
    parser.add_argument("--raw-max", type=count, default=1_000_000,
                        help="also time the raw (not downsampled) query up to this many points")
    parser.add_argument("--chunk-points", type=count, default=100_000)
    parser.add_argument("--json", action="store_true",
                        help="ask for JSON answers (what the dashboard reads), not MessagePack")
    parser.add_argument("--database-url", help="postgresql://... (default: a fresh SQLite file)")
    parser.add_argument("--profile", metavar="DEPTH:POINTS",
                        help="profile the query function in-process on this chain afterwards")
    parser.add_argument("--profile-top", type=int, default=15)
    args = parser.parse_args()
    if args.repeat < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--repeat and --rounds must be at least 1, --warmup at least 0")
    profiled: tuple[int, int] | None = None
    if args.profile:
        depth_text, _, points_text = args.profile.partition(":")
        try:
            profiled = (count(depth_text), count(points_text))
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"--profile {args.profile!r}: give DEPTH:POINTS, e.g. 100:1e6")
        if profiled[0] not in args.depths or profiled[1] not in args.points:
            parser.error(f"--profile {args.profile}: that chain is not in --depths/--points")
    console = Console(width=max(150, Console().width))
    accept = "application/json" if args.json else MSGPACK
    command = shlex.join([".venv/bin/python", "benchmarks/lineage.py", *sys.argv[1:]])
    if args.database_url:
        command = command.replace(args.database_url, "postgresql://...")
    rows: list[Row] = []
    with database(args.database_url) as url:
        with server_process(url) as (base, pid), httpx.Client(
                base_url=base + API_PREFIX, timeout=600) as client:
            for depth in args.depths:
                for points in args.points:
                    chain = build_chain(client, depth, points, args.chunk_points)
                    check(client, chain)
                    bucketed, raw = [], []
                    for _ in range(args.rounds):
                        bucketed.append(timed(client, pid, chain.leaf, BUCKETS, args.warmup,
                                              args.repeat, accept))
                        if points <= args.raw_max:
                            raw.append(timed(client, pid, chain.leaf, None, args.warmup,
                                             args.repeat, accept))
                    row = Row(chain, bucketed, raw or None)
                    rows.append(row)
                    console.print(
                        f"depth {depth:>5}, {human(points):>5} points: ingest "
                        f"{chain.ingest_s:6.1f} s ({chain.requests} requests), bucketed p50 "
                        f"{Row.median(bucketed, 0.5):8.1f} ms", highlight=False)
        db_kind = "SQLite" if url.startswith("sqlite") else "PostgreSQL"
        title = (f"Stitched lineage query of '{KEY}' (GET /runs/{{leaf}}/metrics?lineage=true), "
                 f"{db_kind}, {'JSON' if args.json else 'MessagePack'} answers, "
                 f"p50/p95 of {args.repeat} after {args.warmup} warm-ups"
                 + (f", median of {args.rounds} rounds" if args.rounds > 1 else ""))
        table = Table(title=title)
        for name in ("depth", "points", "buckets=1000 p50", "p95", "points read/s",
                     "server CPU user/sys", "raw p50", "raw p95", "raw points/s", "raw answer"):
            table.add_column(name, justify="right")
        for row in rows:
            p50 = Row.median(row.bucketed, 0.5)
            user = statistics.median(t.server_cpu_ms[0] for t in row.bucketed)
            system = statistics.median(t.server_cpu_ms[1] for t in row.bucketed)
            cells = [str(row.chain.depth), human(row.chain.points), f"{p50:.1f} ms",
                     f"{Row.median(row.bucketed, 0.95):.1f} ms",
                     f"{row.chain.points / p50 * 1000:,.0f}", f"{user:.0f}/{system:.0f} ms"]
            if row.raw:
                raw_p50 = Row.median(row.raw, 0.5)
                cells += [f"{raw_p50:.1f} ms", f"{Row.median(row.raw, 0.95):.1f} ms",
                          f"{row.chain.points / raw_p50 * 1000:,.0f}",
                          f"{row.raw[0].answer_bytes / 2**20:.1f} MiB"]
            else:
                cells += ["", "", "", ""]
            table.add_row(*cells)
        console.print(table)
        for depth in args.depths:
            exponent = slope(rows, depth)
            if exponent:
                console.print(f"depth {depth}: bucketed p50 grows as points^{exponent} "
                              "(1.00 = linear)", highlight=False)
        for row in rows:
            if row.chain.depth == 100 and row.chain.points == 1_000_000:
                p50 = Row.median(row.bucketed, 0.5)
                verdict = "met" if p50 <= TARGET_MS else "NOT met"
                console.print(f"target p50 <= {TARGET_MS:.0f} ms at depth 100, 1e6 points: "
                              f"{p50:.1f} ms, {verdict}", highlight=False)
        console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {versions(url)}",
                      highlight=False)
        console.print(f"command: {command}", highlight=False)
        if profiled is not None:
            wanted = [r.chain for r in rows if (r.chain.depth, r.chain.points) == profiled]
            profile(url, wanted[0], args.profile_top)


if __name__ == "__main__":
    main()
