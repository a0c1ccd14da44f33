"""SDK hot path and end-to-end ingest into a real server (SQLite).

    .venv/bin/python benchmarks/sdk_log.py [--calls 200000] [--repeat 3]

Prints a table: per-call cost of ``run.log()`` with 10 scalars (p50, p99,
mean) and end-to-end points/s, from the first ``log()`` until ``finish()``
returns, i.e. until the server has committed every point. Targets (issue 2):
p50 <= 10 us, p99 <= 100 us, >= 200k points/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import running_server
from rich.console import Console
from rich.table import Table

import pluto
from pluto import query

KEYS = [f"train/metric_{i}" for i in range(10)]


def latency(url: str, calls: int, spool: Path) -> tuple[float, float, float]:
    run = pluto.init(project="bench", run_id=uuid.uuid4().hex, dir=spool,
                     settings={"url": url, "console": False})
    log = run.log
    clock = time.perf_counter_ns
    samples = [0] * calls
    payload = dict.fromkeys(KEYS, 0.5)
    for _ in range(2000):  # warm up
        log(payload)
    for i in range(calls):
        payload = {key: i * 0.001 for key in KEYS}
        start = clock()
        log(payload)
        samples[i] = clock() - start
    run.finish()
    samples.sort()
    return (samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000,
            statistics.fmean(samples) / 1000)


def throughput(url: str, calls: int, spool: Path) -> tuple[float, int, float]:
    run = pluto.init(project="bench", run_id=uuid.uuid4().hex, dir=spool,
                     settings={"url": url, "console": False})
    payloads = [{key: step * 0.001 + j for j, key in enumerate(KEYS)} for step in range(1000)]
    start = time.perf_counter()
    for step in range(calls):
        run.log(payloads[step % 1000], step=step)
    logged = time.perf_counter()
    run.finish()
    end = time.perf_counter()
    points = calls * len(KEYS)
    counted = sum(b.points for series in query.get_metrics(run.id, buckets=1, url=url).values()
                  for b in series)
    if counted != points:
        raise SystemExit(f"the server holds {counted} points, expected {points}")
    return points / (end - start), points, logged - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    with running_server() as url, tempfile.TemporaryDirectory() as spool:
        lat = [latency(url, args.calls, Path(spool)) for _ in range(args.repeat)]
        thr = [throughput(url, args.calls, Path(spool)) for _ in range(args.repeat)]
    p50 = statistics.median(x[0] for x in lat)
    p99 = statistics.median(x[1] for x in lat)
    mean = statistics.median(x[2] for x in lat)
    pps = statistics.median(x[0] for x in thr)
    table = Table(title=f"pluto SDK, {args.calls} log() calls of 10 scalars, "
                        f"median of {args.repeat} runs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("log() p50", f"{p50:.2f} us", "<= 10 us")
    table.add_row("log() p99", f"{p99:.2f} us", "<= 100 us")
    table.add_row("log() mean", f"{mean:.2f} us", "")
    table.add_row("end to end (SQLite)", f"{pps:,.0f} points/s", ">= 200,000")
    console.print(table)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                  f"Python {platform.python_version()}, pluto {pluto.__version__}")
    for rate, points, log_seconds in thr:
        console.print(f"  run: {points:,} points, log loop {log_seconds:.2f}s, "
                      f"{rate:,.0f} points/s end to end")


if __name__ == "__main__":
    main()
