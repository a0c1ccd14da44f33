"""The identical loop every tracker runs, in a process of its own.

Started by ``compare.py``, never by hand. Two modes:

    loop.py hot  TRACKER WORKDIR OUT --calls N --warmup W [--pluto-url URL]
    loop.py rank TRACKER WORKDIR OUT --steps N --rank R --run-name NAME

``hot``: ``W`` warm-up calls, then ``N`` timed calls of ``log()`` with 10 float scalars and
an explicit increasing step, each timed alone with ``perf_counter_ns``; then ``finish()``
timed on its own. ``rank``: one of the writers of the end-to-end figure: start a run,
create ``WORKDIR/ready-R``, wait for a line on stdin, log ``N`` steps as fast as it can,
finish, and record when each phase ended on ``CLOCK_MONOTONIC`` (shared by all processes
of the machine, so ranks can be compared). Results go to the JSON file ``OUT``, not to
stdout: the trackers print banners of their own there.

Standard library only at module level: this file also runs in ``.venv-anchors``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trackers

KEYS = [f"train/metric_{i}" for i in range(10)]


def payload(step: int) -> dict[str, float]:
    """A fresh dict per call: a tracker that keeps a reference to the dict it was given
    (a queue of pending rows) must not see the next call's values."""
    return {key: step * 0.001 + j for j, key in enumerate(KEYS)}


def hot(session: trackers.Session, calls: int, warmup: int) -> dict[str, float]:
    log = session.log
    clock = time.perf_counter_ns
    for step in range(warmup):
        log(payload(step), step)
    samples = [0] * calls
    for i in range(calls):
        values = payload(warmup + i)  # built outside the timed region
        start = clock()
        log(values, warmup + i)
        samples[i] = clock() - start
    start = clock()
    session.finish()
    finish_ns = clock() - start
    samples.sort()
    return {
        "p50_us": samples[calls // 2] / 1000,
        "p99_us": samples[int(calls * 0.99)] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "max_us": samples[-1] / 1000,
        "finish_s": finish_ns / 1e9,
    }


def rank(session: trackers.Session, steps: int, workdir: Path, index: int) -> dict[str, float]:
    # Pre-built payloads (cycled) so that the writers spend their time in the tracker.
    payloads = [payload(step) for step in range(1000)]
    log = session.log
    (workdir / f"ready-{index}").touch()
    sys.stdin.readline()
    start = time.monotonic()
    for step in range(steps):
        log(payloads[step % 1000], step)
    logged = time.monotonic()
    session.finish()
    return {"start": start, "logged": logged, "finished": time.monotonic()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("hot", "rank"))
    parser.add_argument("tracker", choices=trackers.NAMES)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--run-name", default="hot")
    parser.add_argument("--pluto-url")
    args = parser.parse_args()
    trackers.configure_env(args.tracker, args.workdir)
    started = time.perf_counter()
    session = trackers.start(args.tracker, args.workdir, args.run_name, args.pluto_url)
    init_s = time.perf_counter() - started
    if args.mode == "hot":
        result = hot(session, args.calls, args.warmup)
    else:
        result = rank(session, args.steps, args.workdir, args.rank)
    result["init_s"] = init_s
    args.out.write_text(json.dumps({"version": trackers.version(args.tracker), **result}))


if __name__ == "__main__":
    main()
