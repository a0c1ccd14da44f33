"""Checkpoint transfer speed and memory through a real server (local storage).

    .venv/bin/python benchmarks/checkpoints.py [--mib 1024] [--repeat 3]

Uploads a checkpoint of ``--mib`` MiB with ``run.log_checkpoint`` (hash, upload,
server-side hash and fsync, commit), downloads it with ``run.download_checkpoint``
(stream, hash, fsync), and forks it to another run; each in a fresh SDK process so
its peak RSS is its own. Beside them, the floors on this machine: SHA-256 of the
file, and ``cp`` of it plus fsync. Prints medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import server_process
from rich.console import Console
from rich.table import Table

from pluto.transfer import sha256_of

MiB = 1024 * 1024

SDK_ROUND = """
import json, time
import pluto

def hwm():  # VmHWM: ru_maxrss would count the parent this process was forked from
    line = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    return int(line.split()[1]) / 1024

run = pluto.init(project="bench-ckpt", name="src", settings={"console": False})
run.log({"loss": 1.0}, step=1)
start = time.perf_counter()
info = run.log_checkpoint(SOURCE, step=1)
upload = time.perf_counter() - start
assert info is not None
start = time.perf_counter()
run.download_checkpoint(1, DEST)
download = time.perf_counter() - start
target = pluto.init(project="bench-ckpt", name="dst", settings={"console": False})
start = time.perf_counter()
pluto.fork_checkpoint(target, run)
fork = time.perf_counter() - start
print(json.dumps({"upload": upload, "download": download, "fork": fork,
                  "rss": hwm()}))
run.finish(); target.finish()
"""


def make_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as handle:
        for _ in range(size // MiB):
            handle.write(block)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(func: object) -> float:
    start = time.perf_counter()
    func()  # type: ignore[operator]
    return time.perf_counter() - start


def copy_and_sync(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with target.open("rb+") as handle:
        os.fsync(handle.fileno())
    target.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.mib * MiB
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="pluto-bench-ckpt-") as scratch:
        work = Path(scratch)
        source = work / "checkpoint.bin"
        make_file(source, size)
        floors = {"sha256": statistics.median(timed(lambda: sha256_of(source))
                                               for _ in range(args.repeat)),
                  "cp+fsync": statistics.median(
                      timed(lambda: copy_and_sync(source, work / "copy.bin"))
                      for _ in range(args.repeat))}
        for index in range(args.repeat):
            with server_process() as (url, pid):
                code = SDK_ROUND.replace("SOURCE", repr(str(source))).replace(
                    "DEST", repr(str(work / f"back-{index}")))
                done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                                      capture_output=True, text=True, cwd=work, check=True,
                                      env={**os.environ, "PLUTO_URL": url,
                                           "PLUTO_DIR": str(work / ".pluto")})
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["server_rss"] = peak_rss_mib(pid)
                rounds.append(result)
            shutil.rmtree(work / f"back-{index}", ignore_errors=True)

    def median(name: str) -> float:
        return statistics.median(r[name] for r in rounds)

    table = Table(title=f"{args.mib} MiB checkpoint, median of {args.repeat} "
                        f"({platform.node()}, {os.cpu_count()} CPUs, Python "
                        f"{platform.python_version()})")
    for column in ("what", "seconds", "MiB/s", "peak RSS MiB"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for name, seconds in floors.items():
        table.add_row(f"floor: {name}", f"{seconds:.2f}", f"{args.mib / seconds:.0f}", "")
    table.add_row("log_checkpoint (upload)", f"{median('upload'):.2f}",
                  f"{args.mib / median('upload'):.0f}", f"SDK {median('rss'):.0f}")
    table.add_row("download_checkpoint", f"{median('download'):.2f}",
                  f"{args.mib / median('download'):.0f}", f"server {median('server_rss'):.0f}")
    table.add_row("fork_checkpoint", f"{median('fork') * 1000:.1f} ms", "no bytes move", "")
    Console().print(table)


if __name__ == "__main__":
    main()
