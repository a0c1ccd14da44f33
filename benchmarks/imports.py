"""What a process pays for pluto before it logs anything.

    .venv/bin/python benchmarks/imports.py [--repeat 9]

Every rank of a training job imports pluto, and every pod runs a sidecar: their start-up
time and memory add up across a cluster. For ``--repeat`` fresh interpreters each:

- ``import pluto``: wall time of the import (measured inside the process, so interpreter
  start-up is not counted), RSS once imported, and how many modules it loaded;
- an idle ``pluto sidecar`` (server unreachable, no system metrics): RSS once it is ready.

Medians, with the range.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _server import free_port
from rich.console import Console
from rich.table import Table

from sidecar import start_sidecar, stop

MB = 1024 * 1024

IMPORT = """
import sys, time
start = time.perf_counter()
import pluto
seconds = time.perf_counter() - start
import psutil
print(seconds, psutil.Process().memory_info().rss, len(sys.modules))
"""


def import_pluto() -> tuple[float, int, int]:
    done = subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True,
                          check=True, timeout=60)
    seconds, rss, modules = done.stdout.split()
    return float(seconds), int(rss), int(modules)


def idle_sidecar_rss() -> int:
    with tempfile.TemporaryDirectory(prefix="pluto-bench-imports-") as tmp:
        away = f"http://127.0.0.1:{free_port()}"  # nothing listens: the sidecar just waits
        proc, _, _ = start_sidecar(away, Path(tmp))
        try:
            return int(psutil.Process(proc.pid).memory_info().rss)
        finally:
            stop(proc)


def spread(values: list[float], scale: float, unit: str, digits: int = 1) -> str:
    return (f"{statistics.median(values) / scale:.{digits}f} {unit} "
            f"({min(values) / scale:.{digits}f}-{max(values) / scale:.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    imports = [import_pluto() for _ in range(args.repeat)]
    sidecars = [idle_sidecar_rss() for _ in range(args.repeat)]
    table = Table(title=f"What pluto costs a process, median (range) of {args.repeat}")
    table.add_column("process")
    table.add_column("time", justify="right")
    table.add_column("RSS", justify="right")
    table.add_column("modules", justify="right")
    table.add_row("import pluto", spread([s for s, _, _ in imports], 1e-3, "ms", 0),
                  spread([r for _, r, _ in imports], MB, "MB"),
                  f"{statistics.median(m for _, _, m in imports):.0f}")
    table.add_row("pluto sidecar, idle", "", spread(sidecars, MB, "MB"), "")
    Console().print(table)


if __name__ == "__main__":
    main()
