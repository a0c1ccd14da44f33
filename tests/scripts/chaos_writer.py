"""A training-like writer for tests/chaos/: logs deterministic values.

    chaos_writer.py STEPS [--keys K] [--every N --pause S] [--ready FILE] [--report FILE]

Attaches to the run named by ``PLUTO_RUN_ID`` (through the sidecar at
``PLUTO_SIDECAR_SOCKET``), then logs ``STEPS`` calls of ``K`` scalars with
explicit steps 0..STEPS-1. The value of key ``chaos/k<j>`` at step ``s`` for
writer ``w`` (the ``RANK``) is :func:`value` ``(w, j, s)``, so the test can
compute every expected point. Sleeps ``S`` seconds after every ``N`` calls, to
spread the load over time. ``--ready`` is written once ``init()`` returned,
``--report`` (JSON) after ``finish()``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pluto

PREFIX = "chaos/k"


def value(writer: int, key: int, step: int) -> float:
    """Exact in binary floating point, distinct for every (writer, key, step)."""
    return writer * 1_000_000.0 + step + key / 16


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--every", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--finish-timeout", type=float, default=120.0)
    parser.add_argument("--http-timeout", type=float, default=None,
                        help="the SDK's socket timeout (default: the SDK's, 30 s)")
    args = parser.parse_args()

    settings: dict[str, object] = {"console": False, "finish_timeout": args.finish_timeout}
    if args.http_timeout is not None:
        settings["http_timeout"] = args.http_timeout
    run = pluto.init(project=os.environ.get("PLUTO_PROJECT", "chaos"), settings=settings)
    writer = run.writer
    if args.ready is not None:
        args.ready.write_text(str(os.getpid()))
    started = time.time()
    names = [f"{PREFIX}{j}" for j in range(args.keys)]
    for step in range(args.steps):
        run.log({name: value(writer, j, step) for j, name in enumerate(names)}, step=step)
        if args.every and (step + 1) % args.every == 0:
            time.sleep(args.pause)
    logged = time.time()
    run.finish()
    if args.report is not None:
        args.report.write_text(json.dumps({
            "writer": writer, "run_id": run.run_id, "id": run.id,
            "undelivered_bytes": run.undelivered_bytes,
            "log_seconds": logged - started, "finish_seconds": time.time() - logged,
        }))
    return 0 if run.undelivered_bytes == 0 else 3


if __name__ == "__main__":
    raise SystemExit(main())
