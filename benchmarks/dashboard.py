"""Dashboard chart speed: first paint and zoom round trip of a 1M-point run.

    .venv/bin/python benchmarks/dashboard.py [--points 1000000] [--repeat 5]

Starts a real server (SQLite), ingests ``--points`` points of one metric through the
HTTP ingest API (MessagePack chunks of 100k, what the SDK sends), then opens the run's
page in headless Chromium (the system one, driven by Playwright) and measures:

- first paint: from navigation start to the chart's first drawn figure (the page,
  Plotly, the keys, lineage and downsampled metric queries, the Plotly draw);
- zoom round trip: from a zoom (Plotly relayout of the x range, what a drag does) to the
  figure redrawn with the server's answer for that range;
- the server's downsampled query alone (httpx), for scale.

Prints medians of ``--repeat`` rounds. Targets: first paint < 1 s, zoom < 300 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
from _server import server_process
from playwright.sync_api import sync_playwright
from rich.console import Console
from rich.table import Table

from pluto.wire import MSGPACK, Chunk, IngestBatch, encode_msgpack

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
FIRST_PAINT = """document.addEventListener("pluto-chart-drawn",
  () => { if (window.__firstPaint === undefined) window.__firstPaint = performance.now(); });"""
ZOOM = """async ([lo, hi]) => {
  const gd = document.querySelector(".pluto-chart[data-key='loss']");
  const drawn = new Promise((resolve) =>
    gd.addEventListener("pluto-chart-drawn", resolve, { once: true }));
  const t0 = performance.now();
  await Plotly.relayout(gd, { "xaxis.range": [lo, hi] });
  await drawn;
  return performance.now() - t0;
}"""
RESET = """async () => {
  const gd = document.querySelector(".pluto-chart[data-key='loss']");
  const drawn = new Promise((resolve) =>
    gd.addEventListener("pluto-chart-drawn", resolve, { once: true }));
  await Plotly.relayout(gd, { "xaxis.autorange": true });
  await drawn;
}"""


def chromium() -> str:
    pinned = os.environ.get("PLUTO_TEST_CHROMIUM")
    for path in ([pinned] if pinned else []) + list(CHROMIUM):
        if os.access(path, os.X_OK):
            return path
    raise SystemExit("no Chromium: run `make chromium` (apt-get install chromium)")


def ingest(url: str, points: int) -> dict[str, object]:
    with httpx.Client(base_url=url + "/api/v1", timeout=120) as client:
        run: dict[str, object] = client.post(
            "/runs", json={"project": "bench-dashboard", "name": "big"}).json()
        steps: np.ndarray[Any, Any] = np.arange(points, dtype=np.int64)
        values = np.sin(steps / 20_000.0) + np.random.default_rng(0).normal(0, 0.05, points)
        per = 100_000
        for seq, start in enumerate(range(0, points, per)):
            part = slice(start, start + per)
            n = len(steps[part])
            body = IngestBatch(chunks=[Chunk(
                run=int(str(run["id"])), session="bench", seq=seq, writer=0, keys=["loss"],
                key_index=[0] * n, steps=steps[part].tolist(), values=values[part].tolist(),
                times=(1.7e9 + steps[part] * 0.01).tolist())])
            resp = client.post("/ingest", content=encode_msgpack(body),
                               headers={"content-type": MSGPACK})
            resp.raise_for_status()
        client.post(f"/runs/{run['id']}/finish", json={}).raise_for_status()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with server_process() as (url, _pid):
        t0 = time.perf_counter()
        run = ingest(url, opts.points)
        ingest_s = time.perf_counter() - t0
        query_ms, paint_ms, zoom_ms = [], [], []
        for _ in range(opts.repeat):
            t0 = time.perf_counter()
            httpx.get(f"{url}/api/v1/runs/{run['id']}/metrics",
                      params={"keys": "loss", "lineage": "true", "buckets": 1300}
                      ).raise_for_status()
            query_ms.append((time.perf_counter() - t0) * 1000)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=ARGS,
                                         chromium_sandbox=False)
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.add_init_script(FIRST_PAINT)
            page = context.new_page()
            page_url = f"{url}/projects/bench-dashboard/runs/{run['display_id']}"
            for _ in range(opts.repeat):
                page.goto(page_url)
                page.wait_for_function("window.__firstPaint !== undefined", timeout=30_000)
                paint_ms.append(float(page.evaluate("window.__firstPaint")))
            width = opts.points // 100
            for i in range(opts.repeat):
                lo = (i + 1) * opts.points // (opts.repeat + 2)
                zoom_ms.append(float(page.evaluate(ZOOM, [lo, lo + width])))
                page.evaluate(RESET)
            browser.close()
    table = Table(title=f"Dashboard charts, {opts.points:,} points, medians of {opts.repeat}")
    table.add_column("what")
    table.add_column("median", justify="right")
    table.add_column("target", justify="right")
    table.add_row("ingest (HTTP, msgpack chunks of 100k)", f"{ingest_s:.2f} s", "")
    table.add_row("server query, 1300 buckets", f"{statistics.median(query_ms):.0f} ms", "")
    table.add_row("first chart paint (navigation to drawn)",
                  f"{statistics.median(paint_ms):.0f} ms", "< 1000 ms")
    table.add_row("zoom round trip (1% of the range)",
                  f"{statistics.median(zoom_ms):.0f} ms", "< 300 ms")
    Console().print(table)


if __name__ == "__main__":
    main()
