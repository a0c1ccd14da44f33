"""Our SDK's ``log()`` against other trackers doing the same work (issue 7).

    .venv/bin/python benchmarks/anchors/compare.py [--calls 3000] [--warmup 300] [--repeat 3]
        [--sustained-calls 200000] [--points 1000000] [--writers 8] [--only hot|e2e]
        [--quick] [--markdown]

``make bench-anchors`` runs it. The other trackers (wandb, trackio, neptune-scale, mlflow at
the versions pinned in ``requirements.txt``) live in a venv of their own, ``.venv-anchors``,
made here with this interpreter's base Python when it is missing or its pins changed, so they
never touch the project's dependencies.

Hot path: every tracker runs ``loop.py hot`` in a fresh process of its own: the same 10
float scalars, the same explicit steps, ``--warmup`` untimed calls and then ``--calls`` calls
each timed alone with ``perf_counter_ns``; then ``finish()`` timed on its own. The others
run fully offline/local (wandb ``mode="offline"``, trackio local SQLite, neptune-scale
``mode="offline"``, mlflow on a SQLite file with async logging); ours has no offline mode,
so it logs to a real ``pluto server`` on loopback (SQLite) started here, its background
sender running, as ``benchmarks/sdk_log.py`` measures it.
The repeats are interleaved (one round runs every tracker once) so that a noisy spell of a
shared machine spreads over all of them; each figure is the median over the rounds.

Sustained: 3,000 calls take ours about 10 ms, less than its sender's
flush interval (0.2 s) and trackio's (0.5 s), so their background threads barely run during
that loop. The same loop is therefore run again with ``--sustained-calls`` calls for ours and
trackio (the fastest of the others, against which the issue sets its 10x target), long
enough that every flush competes with ``log()`` for the GIL. (The slow trackers are left out
of it: mlflow would need most of an hour to write 2M metrics.)

End to end: ``--writers`` processes each log ``--points / writers / 10`` steps of the same 10
scalars as fast as they can, then finish. Ours: ``benchmarks/sidecar.py``'s measurement, the
writers sharing one run through one ``pluto sidecar`` into the server, timed until the
server holds every point (counted by a query). trackio and neptune-scale cannot write one
run from several processes, so each writer logs a run of its own: trackio's 8 runs in one
project (one SQLite file), timed until every ``finish()`` returned (its sender thread has
written, or given up on, every row; the rows are then counted in the file and a round that
lost some is reported as lost points, not as a rate); neptune-scale's 8 offline runs
(one SQLite file each, written and committed inside ``log_metrics``), timed until every
``close()`` returned (the operations are then counted). wandb and mlflow are left out of it,
as the issue asks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import re
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: _server, sidecar

from _server import running_server, server_process
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
ANCHOR_VENV = ROOT / ".venv-anchors"
LOOP = HERE / "loop.py"
HOT = ("pluto", "wandb", "trackio", "neptune-scale", "mlflow")
SUSTAINED = ("pluto", "trackio")
E2E_ANCHORS = ("trackio", "neptune-scale")
KEYS = 10


# -- the anchors' venv ---------------------------------------------------------------------


def ensure_venv(console: Console) -> Path:
    """``.venv-anchors``'s interpreter, creating or refreshing the venv when it is missing,
    was made by another Python version, or was installed from other pins."""
    python = ANCHOR_VENV / "bin" / "python"
    stamp = ANCHOR_VENV / ".requirements-installed"
    wanted = f"python {platform.python_version()}\n{REQUIREMENTS.read_text()}"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    base = getattr(sys, "_base_executable", sys.executable)  # this venv's own base Python
    same_python = python.exists() and subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True).stdout.strip() == platform.python_version()
    if not same_python:
        console.print(f"==> creating {ANCHOR_VENV.name} with {base}")
        subprocess.run([base, "-m", "venv", "--clear", str(ANCHOR_VENV)], check=True)
    console.print(f"==> installing {REQUIREMENTS.relative_to(ROOT)} into {ANCHOR_VENV.name} "
                  "(about 1 GB, a minute or two the first time)")
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


def _env() -> dict[str, str]:
    """The environment of every measured process: no stray PLUTO_* settings, no tracker
    credentials or modes of the caller's (each adapter sets its own)."""
    drop = ("PLUTO_", "MLOP_", "WANDB_", "TRACKIO_", "NEPTUNE_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _interpreter(name: str, anchors: Path) -> str:
    return sys.executable if name == "pluto" else str(anchors)


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-1500:]
    return ""


# -- hot path ------------------------------------------------------------------------------


@dataclass
class Hot:
    name: str
    version: str = "?"
    rounds: list[dict[str, float]] = field(default_factory=list)
    error: str = ""

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


def hot_once(name: str, anchors: Path, calls: int, warmup: int, url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"anchors-hot-{name}-") as tmp:
        work = Path(tmp)
        out = work / "result.json"
        argv = [_interpreter(name, anchors), str(LOOP), "hot", name, str(work), str(out),
                "--calls", str(calls), "--warmup", str(warmup), "--run-name",
                f"hot-{time.time_ns()}"]
        if name == "pluto":
            argv += ["--pluto-url", url]
        with open(work / "output.log", "wb") as log:
            code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                  timeout=900).returncode
        if code or not out.exists():
            raise RuntimeError(f"{name} exited {code}: {_tail(work / 'output.log')}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def hot_path(anchors: Path, names: tuple[str, ...], calls: int, warmup: int, repeat: int,
             console: Console) -> list[Hot]:
    results = {name: Hot(name) for name in names}
    with running_server() as url:
        for round_ in range(repeat):
            for name in names:
                entry = results[name]
                if entry.error:
                    continue
                try:
                    result = hot_once(name, anchors, calls, warmup, url)
                except Exception as exc:  # one tracker failing must not lose the others
                    entry.error = str(exc)
                    console.print(f"[red]{name} failed:[/red] {exc}")
                    continue
                entry.version = str(result["version"])
                entry.rounds.append(result)
                console.print(f"  round {round_ + 1}/{repeat} {name}: p50 "
                              f"{result['p50_us']:.2f} us, finish {result['finish_s']:.3f} s")
    return list(results.values())


# -- end to end ----------------------------------------------------------------------------


@dataclass
class EndToEnd:
    name: str
    how: str
    version: str = "?"
    rates: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    error: str = ""
    losses: list[str] = field(default_factory=list)  # rounds whose points were not all stored


def ours_e2e(writers: int, points: int) -> tuple[float, float, int]:
    """points/s, seconds and points of one ``benchmarks/sidecar.py`` measurement."""
    # benchmarks/sidecar.py, by path: `import sidecar` could also mean the sidecar/ package.
    spec = importlib.util.spec_from_file_location("bench_sidecar", HERE.parent / "sidecar.py")
    assert spec is not None and spec.loader is not None
    bench_sidecar: Any = sys.modules.get(spec.name)
    if bench_sidecar is None:
        bench_sidecar = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench_sidecar  # its dataclasses look their module up there
        spec.loader.exec_module(bench_sidecar)
    # Newer versions of measure() also take the server's PID (to report its CPU).
    takes_pid = "server_pid" in inspect.signature(bench_sidecar.measure).parameters
    with server_process() as (url, pid):
        extra = {"server_pid": pid} if takes_pid else {}
        m = bench_sidecar.measure(url=url, writers=writers, points=points, **extra)
    return m.e2e_rate, m.e2e_seconds, m.points


def _count_points(name: str, work: Path, writers: int) -> int:
    """What the tracker's files hold once every writer finished, in points."""
    if name == "trackio":
        total = 0
        for db in (work / "trackio").glob("*.db"):
            with contextlib.closing(sqlite3.connect(db)) as conn:
                for (metrics,) in conn.execute("SELECT metrics FROM metrics"):
                    total += sum(1 for key in json.loads(metrics) if key.startswith("train/"))
        return total
    # neptune-scale: one UPDATE_SNAPSHOT operation per log_metrics() call of 10 metrics
    # (operation_type 0 in its repository; 1 is the run's creation).
    calls = 0
    for db in (work / "neptune").rglob("run_operations.sqlite3"):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            calls += conn.execute(
                "SELECT count(*) FROM run_operations WHERE operation_type = 0").fetchone()[0]
    return calls * KEYS


@dataclass
class Round:
    seconds: float  # first log() of any writer -> every finish() returned
    expected: int
    counted: int  # points in the tracker's files afterwards
    version: str
    warnings: list[str]  # what the writers printed about trouble


# What an offline neptune-scale run always says on close(): its files are kept for a later
# `neptune sync`. Not trouble.
_EXPECTED = ("metadata was not deleted", "neptune sync", "warnings.warn(")


def _trouble(path: Path) -> list[str]:
    """The lines of a writer's output that report trouble, run names made alike so that
    eight writers saying the same thing print one line."""
    lines = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            lowered = line.lower()
            if any(text in lowered for text in _EXPECTED):
                continue
            if any(word in lowered for word in ("warn", "error", "lock", "could not")):
                lines.append(re.sub(r"e2e-\d+", "e2e-N", line.strip())[:240])
    return lines


def anchor_e2e_once(name: str, anchors: Path, writers: int, steps: int) -> Round:
    with tempfile.TemporaryDirectory(prefix=f"anchors-e2e-{name}-") as tmp:
        work = Path(tmp)
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        logs = []
        try:
            for rank in range(writers):
                log = open(work / f"output-{rank}.log", "wb")  # noqa: SIM115
                logs.append(log)
                out = work / f"result-{rank}.json"
                procs.append((subprocess.Popen(
                    [str(anchors), str(LOOP), "rank", name, str(work), str(out), "--steps",
                     str(steps), "--rank", str(rank), "--run-name", f"e2e-{rank}"],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=_env()),
                    out))
            deadline = time.monotonic() + 120
            while not all((work / f"ready-{rank}").exists() for rank in range(writers)):
                if any(proc.poll() is not None for proc, _ in procs):
                    raise RuntimeError(f"a {name} writer exited early: "
                                       + _tail(work / "output-0.log"))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} writers did not start in 120 s")
                time.sleep(0.02)
            for proc, _ in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            results = []
            for rank, (proc, out) in enumerate(procs):
                if proc.wait(timeout=900) or not out.exists():
                    raise RuntimeError(f"{name} writer {rank} exited {proc.returncode}: "
                                       + _tail(work / f"output-{rank}.log"))
                results.append(json.loads(out.read_text()))
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
        seconds = max(r["finished"] for r in results) - min(r["start"] for r in results)
        warnings = sorted({line for rank in range(writers)
                           for line in _trouble(work / f"output-{rank}.log")})
        return Round(seconds, writers * steps * KEYS, _count_points(name, work, writers),
                     str(results[0]["version"]), warnings)


def end_to_end(anchors: Path, names: tuple[str, ...], writers: int, points: int, repeat: int,
               console: Console) -> list[EndToEnd]:
    steps = points // KEYS // writers
    rows = [EndToEnd("pluto", f"{writers} writers, 1 run, sidecar -> server")]
    rows += [EndToEnd(name, f"{writers} writers, a run each") for name in names]
    from importlib import metadata
    rows[0].version = metadata.version("pluto-k8s")
    for round_ in range(repeat):
        for row in rows:
            if row.error:
                continue
            try:
                if row.name == "pluto":  # checks that the server holds every point
                    rate, seconds, _ = ours_e2e(writers, points)
                else:
                    result = anchor_e2e_once(row.name, anchors, writers, steps)
                    row.version = result.version
                    for line in result.warnings:
                        console.print(f"  {row.name} said: {line}")
                    if result.counted != result.expected:
                        # Not a figure: a run that loses points is not done sooner.
                        row.losses.append(f"round {round_ + 1}: {result.counted:,} of "
                                          f"{result.expected:,} points stored "
                                          f"({result.seconds:.1f} s)")
                        console.print(f"[red]  {row.name}: {row.losses[-1]}[/red]")
                        continue
                    rate, seconds = result.expected / result.seconds, result.seconds
            except Exception as exc:
                row.error = str(exc)
                console.print(f"[red]{row.name} end to end failed:[/red] {exc}")
                continue
            row.rates.append(rate)
            row.seconds.append(seconds)
            console.print(f"  round {round_ + 1}/{repeat} {row.name}: {rate:,.0f} points/s "
                          f"({seconds:.2f} s)")
    return rows


# -- report --------------------------------------------------------------------------------


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")


@contextlib.contextmanager
def loads(console: Console) -> Iterator[None]:
    before = os.getloadavg()
    yield
    after = os.getloadavg()
    console.print(f"load average (1 min) at start {before[0]:.2f}, at end {after[0]:.2f}")


def hot_table(rows: list[Hot], calls: int, warmup: int, repeat: int) -> tuple[Table, list[str]]:
    table = Table(title=f"log() with 10 scalars: {calls:,} timed calls after {warmup:,} "
                        f"warm-up, median of {repeat} rounds")
    markdown = [f"{calls:,} timed calls after {warmup:,} warm-up, median of {repeat} rounds:",
                ""]
    headers = ["tracker", "version", "mode", "p50", "p99", "mean", "calls/s", "p50 / ours",
               "finish()", "init"]
    for header in headers:
        table.add_column(header, justify="left" if header in ("tracker", "mode") else "right")
    markdown += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    modes = {"pluto": "real server on loopback", "wandb": "offline",
             "trackio": "local SQLite", "neptune-scale": "offline",
             "mlflow": "SQLite, async logging"}
    ours = next((r for r in rows if r.name == "pluto" and r.rounds), None)
    for row in rows:
        if not row.rounds:
            cells = [row.name, row.version, modes[row.name], "failed", row.error[:60],
                     "", "", "", "", ""]
        else:
            p50 = row.median("p50_us")
            ratio = f"{p50 / ours.median('p50_us'):.1f}x" if ours else ""
            cells = [row.name, row.version, modes[row.name], f"{p50:.2f} us",
                     f"{row.median('p99_us'):.2f} us", f"{row.median('mean_us'):.2f} us",
                     f"{1e6 / row.median('mean_us'):,.0f}", ratio,
                     f"{row.median('finish_s'):.3f} s", f"{row.median('init_s'):.2f} s"]
        table.add_row(*cells)
        markdown.append("| " + " | ".join(cells) + " |")
    return table, markdown


def e2e_table(rows: list[EndToEnd], points: int, repeat: int) -> tuple[Table, list[str]]:
    table = Table(title=f"end to end, {points:,} points, median of the complete rounds of "
                        f"{repeat}")
    headers = ["tracker", "version", "how", "points/s", "seconds", "ours / theirs",
               "rounds complete", "lost points"]
    for header in headers:
        table.add_column(header, justify="left" if header in ("tracker", "how") else "right")
    markdown = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    ours = rows[0].rates and statistics.median(rows[0].rates)
    for row in rows:
        done = f"{len(row.rates)} of {len(row.rates) + len(row.losses)}"
        lost = "; ".join(row.losses)
        if not row.rates:
            cells = [row.name, row.version, row.how, "failed", row.error[:80], "", done, lost]
        else:
            rate = statistics.median(row.rates)
            cells = [row.name, row.version, row.how, f"{rate:,.0f}",
                     f"{statistics.median(row.seconds):.2f}",
                     f"{ours / rate:.1f}x" if ours else "", done, lost]
        table.add_row(*cells)
        markdown.append("| " + " | ".join(cells) + " |")
    return table, markdown


def verdict(rows: list[Hot], label: str) -> list[str]:
    ours = next((r for r in rows if r.name == "pluto" and r.rounds), None)
    others = [r for r in rows if r.name != "pluto" and r.rounds]
    if ours is None or not others:
        return [f"{label}: targets not evaluated (a tracker failed)"]
    p50 = ours.median("p50_us")
    fastest = min(others, key=lambda r: r.median("p50_us"))
    ratio = fastest.median("p50_us") / p50
    return [
        f"{label}: target p50 <= 10 us: {'met' if p50 <= 10 else 'NOT met'} ({p50:.2f} us)",
        f"{label}: target >= 10x faster p50 than the fastest other tracker ({fastest.name}, "
        f"{fastest.median('p50_us'):.2f} us): {'met' if ratio >= 10 else 'NOT met'} "
        f"({ratio:.1f}x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3_000, help="timed log() calls per run")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sustained-calls", type=int, default=200_000,
                        help="timed calls of the sustained run (ours and trackio; 0: none)")
    parser.add_argument("--points", type=int, default=1_000_000,
                        help="end to end: points in all, over every writer")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--only", choices=("hot", "e2e"))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1,000 calls, 100,000 points, one round")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.warmup, args.points, args.repeat = 1_000, 100, 100_000, 1
        args.sustained_calls = 20_000
    console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in a log
    anchors = ensure_venv(console)
    command = shlex.join([os.path.relpath(sys.executable, ROOT),
                          os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started = time.monotonic()
    output: list[Table] = []
    markdown: list[str] = []
    verdicts: list[str] = []
    with loads(console):
        if args.only != "e2e":
            console.print("==> hot path")
            hot_rows = hot_path(anchors, HOT, args.calls, args.warmup, args.repeat, console)
            verdicts += verdict(hot_rows, f"{args.calls:,} calls")
            table, lines = hot_table(hot_rows, args.calls, args.warmup, args.repeat)
            output.append(table)
            markdown += [*lines, ""]
            if args.sustained_calls:
                console.print("==> hot path, sustained")
                sustained = hot_path(anchors, SUSTAINED, args.sustained_calls, args.warmup,
                                     args.repeat, console)
                table, lines = hot_table(sustained, args.sustained_calls, args.warmup,
                                         args.repeat)
                output.append(table)
                markdown += [*lines, ""]
                verdicts += verdict(sustained, "sustained")
        if args.only != "hot":
            console.print("==> end to end")
            e2e_rows = end_to_end(anchors, E2E_ANCHORS, args.writers, args.points, args.repeat,
                                  console)
            table, lines = e2e_table(e2e_rows, args.points, args.repeat)
            output.append(table)
            markdown += lines
    for table in output:
        console.print(table)
    for line in verdicts:
        console.print(line)
    console.print(f"machine: {machine()}")
    console.print(f"command: {command}  ({time.monotonic() - started:.0f} s)")
    if args.markdown:
        print("\n".join(markdown))


if __name__ == "__main__":
    main()
