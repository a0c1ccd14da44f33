"""A training process for tests/test_sidecar.py: attach to a run through the sidecar, log.

    sidecar_writer.py OUT_JSON [--project P] [--steps N] [--keys K] [--sleep S]
                      [--settings JSON] [--progress FILE] [--go FILE] [--await-id SECONDS]

The sidecar comes from ``PLUTO_SIDECAR_SOCKET``, the run from ``PLUTO_RUN_ID`` and the
writer from ``RANK``, as in a pod. At step ``s`` the process logs keys ``k0 .. k<K-1>``,
key ``k<j>`` with the value ``writer * 1_000_000 + s * 10 + j`` (exact in a float64), so
the test can check every (key, step, writer) and its value.

- ``--go FILE``: after the first half of the steps, wait for FILE to exist, then go on.
- ``--await-id T``: after the last step, while ``run.id`` is still 0 (the server has
  not answered yet) and for at most T seconds, log ``tick`` at steps N, N+1, ... (value
  = the tick number): the sidecar pushes the numeric id on the connection the SDK
  reads replies from, so something must be sent for it to be seen.
- ``--progress FILE``: the number of ``log()`` calls made so far, rewritten every 50.

OUT_JSON is written after ``init()`` (``"phase": "init"``) and again after ``finish()``
(``"phase": "done"``) with the run's identity, timings and the environment variables
that matter (to prove that no credentials were needed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pluto


def value(writer: int, step: int, j: int) -> float:
    return float(writer * 1_000_000 + step * 10 + j)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def identity(run: pluto.Run) -> dict[str, Any]:
    return {"id": run.id, "run_id": run.run_id, "display_id": run.display_id,
            "resumed": run.resumed, "pending": run.pending, "writer": run.writer,
            "project": run.project}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--project", default="sidecar")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--progress", type=Path, default=None)
    parser.add_argument("--go", type=Path, default=None)
    parser.add_argument("--await-id", type=float, default=0.0)
    args = parser.parse_args()

    settings = {"console": False, "flush_interval": 0.05, **json.loads(args.settings)}
    started = time.monotonic()
    run = pluto.init(project=args.project, settings=settings)
    init_seconds = time.monotonic() - started
    report: dict[str, Any] = {
        "phase": "init", "pid": os.getpid(), "init_seconds": init_seconds,
        "env": sorted(name for name in os.environ if name.startswith(("PLUTO_", "MLOP_"))),
        "at_init": identity(run),
    }
    write_json(args.out, report)

    writer = run.writer
    max_log_seconds = 0.0
    calls = 0
    for step in range(args.steps):
        if args.go is not None and step == args.steps // 2:
            deadline = time.monotonic() + 120
            while not args.go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        before = time.monotonic()
        run.log({f"k{j}": value(writer, step, j) for j in range(args.keys)}, step=step)
        max_log_seconds = max(max_log_seconds, time.monotonic() - before)
        calls += 1
        if args.progress is not None and calls % 50 == 0:
            write_json(args.progress, {"calls": calls})
        if args.sleep:
            time.sleep(args.sleep)

    ticks = 0
    deadline = time.monotonic() + args.await_id
    while run.id == 0 and time.monotonic() < deadline:
        run.log({"tick": float(ticks)}, step=args.steps + ticks)
        ticks += 1
        time.sleep(0.1)
    report["before_finish"] = identity(run)

    finish_started = time.monotonic()
    run.finish()
    report.update(
        phase="done", ticks=ticks, calls=calls, max_log_seconds=max_log_seconds,
        finish_seconds=time.monotonic() - finish_started, undelivered=run.undelivered_bytes,
        after_finish=identity(run),
    )
    if args.progress is not None:
        write_json(args.progress, {"calls": calls})
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
