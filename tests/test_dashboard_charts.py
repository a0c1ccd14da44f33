"""The dashboard's charts in a real headless Chromium, against a real server fed by the SDK.

The seed is the forking docs' scenario: A logs ``loss`` at steps 0-100, B forks A at 50
and logs to 200, C forks B at 150 and logs to 250. Each run logs a different formula, so
the value at a step says which run it came from. Every claim is checked twice: in
Plotly's data in the page (what was drawn) and in the pixels of a screenshot (what a
person sees): the dashed fork lines, the series colours, the inherited points.
"""

from __future__ import annotations

import datetime
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from playwright.sync_api import Page, Request
from support.browser import SCREENSHOT_DIR, save_screenshot
from support.server_process import ServerProcess

import pluto
from pluto.wire import MSGPACK, Chunk, IngestBatch, encode_msgpack

PROJECT = "chart-forks"
BIG_PROJECT = "chart-big"
SPIKE_STEP = 777_777
SPIKE = 50.0
BIG_POINTS = 1_000_000

#: The palette of server/static/charts_data.js (docs/dashboard.md, "Charts").
BLUE, ORANGE, GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)
FORK_GREY = (0x99, 0x99, 0x99)

RGB = tuple[int, int, int]


def value_a(step: int) -> float:
    return 1.0 / (step + 1)


def value_b(step: int) -> float:
    return 0.5 + 0.001 * step


def value_c(step: int) -> float:
    return 0.2 + 0.0005 * step


# -- fixtures ------------------------------------------------------------------------


@dataclass
class Lineage:
    server: ServerProcess
    ids: dict[str, int]  # "A", "B", "C" -> numeric id
    display: dict[str, str]  # "A" -> display id

    def owner(self, run_id: int) -> str:
        return next(name for name, rid in self.ids.items() if rid == run_id)


@pytest.fixture(scope="module")
def chart_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One SQLite server for the module: the charts read the same API on every backend
    (the queries themselves are tested on both in test_server_queries.py)."""
    with ServerProcess(tmp_path_factory.mktemp("charts") / "pluto-data") as proc:
        yield proc


@pytest.fixture(scope="module")
def lineage(chart_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    settings = {"url": chart_server.url, "console": False}
    spool = tmp_path_factory.mktemp("sdk")
    a = pluto.init(project=PROJECT, name="exp", settings=settings, dir=spool)
    for step in range(101):
        a.log({"loss": value_a(step)}, step=step)
    a.finish()  # delivered before the fork: the fork step must be in A's logged range
    b = pluto.init(project=PROJECT, fork_run_id=a.id, fork_step=50, settings=settings, dir=spool)
    for step in range(51, 201):
        b.log({"loss": value_b(step)}, step=step)
    b.finish()
    c = pluto.init(project=PROJECT, fork_run_id=b.id, fork_step=150, settings=settings,
                   dir=spool)
    for step in range(151, 251):
        c.log({"loss": value_c(step)}, step=step)
    c.finish()
    ids = {"A": a.id, "B": b.id, "C": c.id}
    display = {name: httpx.get(f"{chart_server.url}/api/v1/runs/{rid}").json()["display_id"]
               for name, rid in ids.items()}
    return Lineage(chart_server, ids, display)


def ingest(url: str, run: int, steps: np.ndarray[Any, Any], values: np.ndarray[Any, Any],
           *, seq0: int = 0, chunk: int = 100_000, writer: int = 0, key: str = "loss") -> None:
    """Points through the HTTP ingest API in MessagePack chunks (what the SDK sends)."""
    with httpx.Client(base_url=url + "/api/v1", timeout=60) as client:
        for n, start in enumerate(range(0, len(steps), chunk)):
            part = slice(start, start + chunk)
            count = len(steps[part])
            body = IngestBatch(chunks=[Chunk(
                run=run, session=f"chart-test-{writer}", seq=seq0 + n, writer=writer, keys=[key],
                key_index=[0] * count, steps=steps[part].tolist(),
                values=values[part].tolist(),
                times=(1.7e9 + steps[part] * 0.01).tolist())])
            resp = client.post("/ingest", content=encode_msgpack(body),
                               headers={"content-type": MSGPACK})
            assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def big_run(chart_server: ServerProcess) -> dict[str, Any]:
    """A finished run of 1M points of ``loss`` with one spike."""
    run: dict[str, Any] = httpx.post(f"{chart_server.url}/api/v1/runs",
                                     json={"project": BIG_PROJECT, "name": "big"}).json()
    steps: np.ndarray[Any, Any] = np.arange(BIG_POINTS, dtype=np.int64)
    values = np.sin(steps / 20_000.0)
    values[SPIKE_STEP] = SPIKE
    ingest(chart_server.url, run["id"], steps, values)
    httpx.post(f"{chart_server.url}/api/v1/runs/{run['id']}/finish", json={})
    return run


# -- reading the page ----------------------------------------------------------------

CHART = ".pluto-chart[data-key='loss']"


def open_chart(page: Page, url: str, scope: str = "") -> None:
    page.goto(url)
    page.wait_for_selector(f"{scope} {CHART}[data-state=ready]".strip())


def traces(page: Page, scope: str = "") -> list[dict[str, Any]]:
    """Plotly's own data of the chart: what it drew."""
    result: list[dict[str, Any]] = page.evaluate(
        """(sel) => document.querySelector(sel).data.map((t) => ({
             role: t.meta.role, run: t.meta.run, color: t.line ? t.line.color : null,
             x: Array.from(t.x), y: Array.from(t.y),
             customdata: t.customdata ? Array.from(t.customdata) : [],
             hovertemplate: t.hovertemplate || ""}))""",
        f"{scope} {CHART}".strip())
    return result


def series(page: Page, scope: str = "") -> list[dict[str, Any]]:
    return [t for t in traces(page, scope) if t["role"] == "series"]


def fork_lines(page: Page, scope: str = "") -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate(
        """(sel) => (document.querySelector(sel).layout.shapes || [])
             .filter((s) => s.type === "line").map((s) => ({x: s.x0, dash: s.line.dash,
                                                             color: s.line.color}))""",
        f"{scope} {CHART}".strip())
    return result


def draws(page: Page, scope: str = "") -> int:
    return int(page.get_attribute(f"{scope} {CHART}".strip(), "data-draws") or 0)


def wait_redrawn(page: Page, before: int, scope: str = "") -> None:
    page.wait_for_function(
        "([sel, n]) => { const el = document.querySelector(sel);"
        " return el && Number(el.dataset.draws) > n && el.dataset.state === 'ready'; }",
        arg=[f"{scope} {CHART}".strip(), before])


@dataclass
class Axes:
    """Where the plot area is in the chart element's screenshot, and step <-> pixel."""

    left: float
    top: float
    width: float
    height: float
    x0: float  # the x axis range
    x1: float

    def px(self, step: float) -> int:
        return round(self.left + (step - self.x0) / (self.x1 - self.x0) * self.width)

    def step(self, px: float) -> float:
        return self.x0 + (px - self.left) / self.width * (self.x1 - self.x0)


def axes(page: Page, scope: str = "") -> Axes:
    box: dict[str, float] = page.evaluate(
        """(sel) => { const gd = document.querySelector(sel); const L = gd._fullLayout;
             return {left: L._size.l, top: L._size.t, width: L._size.w, height: L._size.h,
                     x0: L.xaxis.range[0], x1: L.xaxis.range[1],
                     l2p50: L.xaxis.l2p(50) + L._size.l}; }""",
        f"{scope} {CHART}".strip())
    found = Axes(box["left"], box["top"], box["width"], box["height"], box["x0"], box["x1"])
    # Our linear mapping is Plotly's own (checked at one step).
    assert abs(found.px(50) - box["l2p50"]) <= 1, (found, box)
    return found


# -- pixels (PNG decoded with the standard library) ------------------------------------


class Image:
    def __init__(self, path: Path) -> None:
        self.width, self.height, self.channels, self.rows = _decode_png(path.read_bytes())

    def pixel(self, x: int, y: int) -> RGB:
        row, i = self.rows[y], x * self.channels
        return row[i], row[i + 1], row[i + 2]

    def column(self, x: int, top: int, bottom: int) -> list[RGB]:
        return [self.pixel(x, y) for y in range(top, bottom)]

    def columns_with(self, color: RGB, top: int, bottom: int, tolerance: int = 40) -> list[int]:
        """x of every column that has a pixel near ``color`` between ``top`` and ``bottom``."""
        return [x for x in range(self.width)
                if any(near(self.pixel(x, y), color, tolerance) for y in range(top, bottom))]


def near(pixel: RGB, color: RGB, tolerance: int = 40) -> bool:
    return all(abs(p - c) <= tolerance for p, c in zip(pixel, color, strict=True))


def _decode_png(data: bytes) -> tuple[int, int, int, list[bytearray]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color_type in (2, 6) and interlace == 0, "unexpected PNG"
            channels = 3 if color_type == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        method = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if method == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif method == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif method == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif method == 4:
            for i in range(stride):
                a = line[i - channels] if i >= channels else 0
                b, c = prev[i], prev[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(line)
        prev = line
    return width, height, channels, rows


def chart_shot(page: Page, name: str, scope: str = "") -> Image:
    """Screenshot of the whole page (kept as an artifact) and of the chart (checked)."""
    save_screenshot(page, name)
    path = save_screenshot_of(page, f"{scope} {CHART}".strip(), f"{name}-chart")
    return Image(path)


def save_screenshot_of(page: Page, selector: str, name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.locator(selector).screenshot(path=str(path), animations="disabled")
    return path


def dash_runs(pixels: list[RGB], color: RGB) -> int:
    """How many separate runs of ``color`` a pixel column has (a dashed line: many)."""
    runs, inside = 0, False
    for pixel in pixels:
        hit = near(pixel, color, 24) and max(pixel) - min(pixel) <= 12
        if hit and not inside:
            runs += 1
        inside = hit
    return runs


def dashed_at(image: Image, box: Axes, step: float) -> int:
    """The most dash runs of the fork grey in the columns around ``step``'s pixel."""
    x = box.px(step)
    top, bottom = round(box.top) + 2, round(box.top + box.height) - 2
    return max(dash_runs(image.column(cx, top, bottom), FORK_GREY) for cx in (x - 1, x, x + 1))


def steps_drawn_in(image: Image, box: Axes, color: RGB) -> tuple[float, float]:
    """The step range over which ``color`` appears inside the plot area."""
    top, bottom = round(box.top) + 1, round(box.top + box.height) - 1
    cols = [x for x in image.columns_with(color, top, bottom)
            if box.left + 2 <= x <= box.left + box.width - 2]
    assert cols, f"no pixel of {color} in the plot area"
    return box.step(min(cols)), box.step(max(cols))


# -- the run page: stitched lineage, fork lines, the inherited toggle ------------------


def run_url(lineage: Lineage, name: str, query: str = "") -> str:
    return (f"{lineage.server.url}/projects/{PROJECT}/runs/{lineage.display[name]}"
            + (f"?{query}" if query else ""))


def test_a_forked_run_shows_its_lineage_as_one_series_with_dashed_fork_lines(
        page: Page, lineage: Lineage) -> None:
    open_chart(page, run_url(lineage, "C"))
    [line] = series(page)
    steps = [point[0] for point in line["customdata"]]
    assert steps == list(range(251)), "one continuous series over 0..250"
    owners = [lineage.owner(point[1]) for point in line["customdata"]]
    assert owners == ["A"] * 51 + ["B"] * 100 + ["C"] * 100
    expected = ([value_a(s) for s in range(51)] + [value_b(s) for s in range(51, 151)]
                + [value_c(s) for s in range(151, 251)])
    assert line["y"] == pytest.approx(expected)
    assert line["color"] == "#{:02x}{:02x}{:02x}".format(*BLUE)
    forks = fork_lines(page)
    assert sorted(f["x"] for f in forks) == [50, 150]
    assert all(f["dash"] == "dash" for f in forks)
    tips = {t["x"][0]: t["hovertemplate"] for t in traces(page) if t["role"] == "fork"}
    assert f"forked from {lineage.display['A']} at step 50" in tips[50]
    assert f"forked from {lineage.display['B']} at step 150" in tips[150]

    image = chart_shot(page, "run-C-inherited")
    box = axes(page)
    assert dashed_at(image, box, 50) >= 4, "a dashed grey line at step 50"
    assert dashed_at(image, box, 150) >= 4, "a dashed grey line at step 150"
    assert dashed_at(image, box, 100) == 0, "no fork line where there is no fork"
    lo, hi = steps_drawn_in(image, box, BLUE)
    assert lo <= 2 and hi >= 248, f"the line covers 0..250 on screen, not {lo:.0f}..{hi:.0f}"


def test_the_fork_line_tooltip_names_the_parent_and_step(page: Page, lineage: Lineage) -> None:
    open_chart(page, run_url(lineage, "C"))
    box = axes(page)
    chart = page.locator(CHART).bounding_box()
    assert chart is not None
    page.mouse.move(chart["x"] + box.px(150), chart["y"] + box.top + box.height * 0.3)
    page.wait_for_function(
        "(sel) => document.querySelector(sel).textContent.includes('forked from')",
        arg=f"{CHART} .hoverlayer")
    tip = page.locator(f"{CHART} .hoverlayer").text_content() or ""
    assert f"forked from {lineage.display['B']} at step 150" in tip


def test_hiding_inherited_points_shows_only_the_runs_own_and_is_kept_in_the_url(
        page: Page, lineage: Lineage) -> None:
    open_chart(page, run_url(lineage, "C"))
    before = draws(page)
    inherited = chart_shot(page, "run-C-toggle-on")
    box_on = axes(page)
    page.get_by_label("Show inherited datapoints").uncheck()
    wait_redrawn(page, before)
    [line] = series(page)
    assert [p[0] for p in line["customdata"]] == list(range(151, 251))
    assert {lineage.owner(p[1]) for p in line["customdata"]} == {"C"}
    assert line["y"] == pytest.approx([value_c(s) for s in range(151, 251)])
    assert parse_qs(urlsplit(page.url).query)["inherited"] == ["0"]
    own = chart_shot(page, "run-C-toggle-off")
    box_off = axes(page)
    # What a person sees: the blue line starts at 0 with inherited points, past 150 without.
    lo_on, _ = steps_drawn_in(inherited, box_on, BLUE)
    lo_off, hi_off = steps_drawn_in(own, box_off, BLUE)
    assert lo_on <= 2
    assert lo_off >= 148 and hi_off >= 248, (lo_off, hi_off)

    page.reload()
    page.wait_for_selector(f"{CHART}[data-state=ready]")
    assert not page.get_by_label("Show inherited datapoints").is_checked()
    assert [p[0] for p in series(page)[0]["customdata"]] == list(range(151, 251))
    # The URL wins over what localStorage remembered; without it, localStorage counts.
    open_chart(page, run_url(lineage, "C", "inherited=1"))
    assert page.get_by_label("Show inherited datapoints").is_checked()
    assert len(series(page)[0]["customdata"]) == 251
    page.evaluate("localStorage.setItem('pluto.charts.inherited', '0')")
    open_chart(page, run_url(lineage, "C"))
    assert not page.get_by_label("Show inherited datapoints").is_checked()


# -- compare and experiment views ---------------------------------------------------


def test_compare_draws_each_run_in_its_own_colour_with_only_its_own_points(
        page: Page, lineage: Lineage) -> None:
    refs = ",".join(lineage.display[n] for n in "ABC")
    open_chart(page, f"{lineage.server.url}/compare?project={PROJECT}&runs={refs}")
    drawn = {lineage.owner(t["run"]): t for t in series(page)}
    assert set(drawn) == {"A", "B", "C"}
    assert len({t["color"] for t in drawn.values()}) == 3
    ranges = {"A": range(0, 101), "B": range(51, 201), "C": range(151, 251)}
    formulas = {"A": value_a, "B": value_b, "C": value_c}
    for name, trace in drawn.items():
        assert [p[0] for p in trace["customdata"]] == list(ranges[name]), name
        assert {lineage.owner(p[1]) for p in trace["customdata"]} == {name}
        assert trace["y"] == pytest.approx([formulas[name](s) for s in ranges[name]])
    assert sorted(f["x"] for f in fork_lines(page)) == [50, 150]

    image = chart_shot(page, "compare-A-B-C")
    box = axes(page)
    for name, color in (("A", BLUE), ("B", ORANGE), ("C", GREEN)):
        assert drawn[name]["color"] == "#{:02x}{:02x}{:02x}".format(*color)
        lo, hi = steps_drawn_in(image, box, color)
        first, last = ranges[name][0], ranges[name][-1]
        assert first - 3 <= lo and hi <= last + 3, f"{name} drawn over {lo:.0f}..{hi:.0f}"
    assert dashed_at(image, box, 50) >= 4 and dashed_at(image, box, 150) >= 4


def test_an_experiment_is_one_colour_one_continuous_series(page: Page, lineage: Lineage) -> None:
    open_chart(page, f"{lineage.server.url}/projects/{PROJECT}/experiments/exp")
    [line] = series(page)  # C is the only leaf: its stitched lineage is the experiment
    assert [p[0] for p in line["customdata"]] == list(range(251))
    assert sorted(f["x"] for f in fork_lines(page)) == [50, 150]
    image = chart_shot(page, "experiment-exp")
    box = axes(page)
    lo, hi = steps_drawn_in(image, box, BLUE)
    assert lo <= 2 and hi >= 248
    for other in (ORANGE, GREEN):
        top, bottom = round(box.top) + 1, round(box.top + box.height) - 1
        assert not image.columns_with(other, top, bottom, tolerance=30)


# -- 1M points: downsampled, zoom re-queries, double-click resets ---------------------


def metric_requests(page: Page) -> list[Request]:
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if "/metrics?" in r.url else None)
    return seen


def query_of(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}


def test_a_million_points_are_downsampled_and_zoom_requeries_the_server(
        page: Page, chart_server: ServerProcess, big_run: dict[str, Any]) -> None:
    requests = metric_requests(page)
    open_chart(page, f"{chart_server.url}/projects/{BIG_PROJECT}/runs/{big_run['display_id']}")
    first = query_of(requests[-1])
    assert "buckets" in first and "step_min" not in first
    buckets = int(first["buckets"])
    assert 200 <= buckets <= 4000
    [line] = series(page)
    assert len(line["x"]) <= buckets + 2
    assert line["x"][0] < 1000 and line["x"][-1] > BIG_POINTS - 1000
    band = next(t for t in traces(page) if t["role"] == "band")
    assert max(v for v in band["y"] if v is not None) == SPIKE, "the spike is in the band"
    full_width = np.median(np.diff(line["x"]))

    # Drag across the plot: Plotly zooms, and the chart asks the server for that range.
    box = axes(page)
    chart = page.locator(CHART).bounding_box()
    assert chart is not None
    y = chart["y"] + box.top + box.height / 2
    before, asked = draws(page), len(requests)
    page.mouse.move(chart["x"] + box.px(400_000), y)
    page.mouse.down()
    page.mouse.move(chart["x"] + box.px(430_000), y, steps=5)
    page.mouse.up()
    wait_redrawn(page, before)
    zoomed = [query_of(r) for r in requests[asked:]]
    assert zoomed, "zooming asked the server"
    q = zoomed[-1]
    lo, hi = int(q["step_min"]), int(q["step_max"])
    assert 390_000 <= lo < hi <= 440_000 and "buckets" in q, q
    [line] = series(page)
    steps = [p[0] for p in line["customdata"]] + [p[2] for p in line["customdata"]]
    assert lo <= min(steps) and max(steps) <= hi, "only the zoomed range is drawn"
    assert np.median(np.diff(line["x"])) < full_width / 10, "at a finer resolution"
    chart_shot(page, "big-zoomed")

    before, asked = draws(page), len(requests)
    page.mouse.dblclick(chart["x"] + box.left + box.width / 2, y)
    wait_redrawn(page, before)
    reset = [query_of(r) for r in requests[asked:]]
    assert reset and "step_min" not in reset[-1]
    [line] = series(page)
    assert line["x"][0] < 1000 and line["x"][-1] > BIG_POINTS - 1000


# -- live --------------------------------------------------------------------------


def test_a_running_run_extends_its_chart_with_only_the_new_steps(
        page: Page, chart_server: ServerProcess) -> None:
    run = httpx.post(f"{chart_server.url}/api/v1/runs",
                     json={"project": "chart-live", "name": "live"}).json()
    ingest(chart_server.url, run["id"], np.arange(100), np.linspace(1, 0, 100))
    page.add_init_script("window.PLUTO_CHARTS_POLL_MS = 300")
    requests = metric_requests(page)
    open_chart(page, f"{chart_server.url}/projects/chart-live/runs/{run['display_id']}")
    assert [p[0] for p in series(page)[0]["customdata"]] == list(range(100))
    ingest(chart_server.url, run["id"], np.arange(100, 160), np.full(60, 0.5), seq0=10)
    page.wait_for_function(
        "(sel) => { const t = document.querySelector(sel).data.find((d) => d.meta.role === "
        "'series'); return t && t.x[t.x.length - 1] === 159; }", arg=CHART)
    polls = [query_of(r) for r in requests if "step_min" in query_of(r)]
    assert polls and polls[0]["step_min"] == "100", "only the steps after the last one seen"
    assert [p[0] for p in series(page)[0]["customdata"]] == list(range(160))
    assert page.evaluate("document.querySelector('.pluto-charts').dataset.live") == "1"
    httpx.post(f"{chart_server.url}/api/v1/runs/{run['id']}/finish", json={})


def test_live_charts_get_the_new_points_of_a_rank_that_lags_behind(
        page: Page, chart_server: ServerProcess) -> None:
    """Rank 0 is at step 50, rank 1 at 30: rank 1's next points (31..50) are below the
    last step seen on the chart, and still drawn; rank 0's are not drawn twice."""
    run = httpx.post(f"{chart_server.url}/api/v1/runs",
                     json={"project": "chart-live-ranks", "name": "live"}).json()
    ingest(chart_server.url, run["id"], np.arange(51), np.linspace(1, 0, 51), writer=0)
    ingest(chart_server.url, run["id"], np.arange(31), np.linspace(2, 1, 31), writer=1)
    page.add_init_script("window.PLUTO_CHARTS_POLL_MS = 300")
    requests = metric_requests(page)
    open_chart(page, f"{chart_server.url}/projects/chart-live-ranks/runs/{run['display_id']}")

    def steps_by_rank() -> dict[int, list[int]]:
        found: dict[int, list[int]] = page.evaluate(
            """(sel) => Object.fromEntries(document.querySelector(sel).data
                 .filter((t) => t.meta.role === 'series')
                 .map((t) => [t.meta.writer, Array.from(t.customdata, (p) => p[0])]))""",
            CHART)
        return {int(w): steps for w, steps in found.items()}

    assert steps_by_rank() == {0: list(range(51)), 1: list(range(31))}
    ingest(chart_server.url, run["id"], np.arange(31, 51), np.full(20, 0.5), writer=1, seq0=10)
    ingest(chart_server.url, run["id"], np.arange(51, 61), np.full(10, 0.1), writer=0, seq0=10)
    page.wait_for_function(
        """(sel) => { const ts = document.querySelector(sel).data
             .filter((t) => t.meta.role === 'series');
           return ts.length === 2 && ts.every((t) => t.x.length >= 51)
             && ts.some((t) => t.x[t.x.length - 1] === 60); }""", arg=CHART)
    page.wait_for_timeout(1000)  # a few more polls: nothing is appended twice
    assert steps_by_rank() == {0: list(range(61)), 1: list(range(51))}
    polls = [query_of(r) for r in requests if "step_min" in query_of(r)]
    assert polls and polls[0]["step_min"] == "31", "from the lowest of the ranks' last steps"
    httpx.post(f"{chart_server.url}/api/v1/runs/{run['id']}/finish", json={})


# -- user text in Plotly ---------------------------------------------------------------

HOSTILE_NAME = 'n%{y} <b>bold</b> <a href="https://example.com/">link</a> & <br>x'
HOSTILE_KEY = "acc%{y}<br><i>it</i>"


def test_run_names_and_metric_keys_are_shown_as_written_not_as_plotly_markup(
        page: Page, chart_server: ServerProcess) -> None:
    """Plotly reads HTML tags (<a href>, <br>, <b>) in names and titles and fills
    ``%{...}`` in tooltips: a run's name and a metric key are user text, shown literally."""
    ids = []
    for i in range(2):
        run = httpx.post(f"{chart_server.url}/api/v1/runs",
                         json={"project": "chart-text", "name": f"{HOSTILE_NAME} {i}"}).json()
        ingest(chart_server.url, run["id"], np.arange(5), np.arange(5) * 0.5, key=HOSTILE_KEY)
        httpx.post(f"{chart_server.url}/api/v1/runs/{run['id']}/finish", json={})
        ids.append(run["display_id"])
    page.goto(f"{chart_server.url}/compare?project=chart-text&runs={','.join(ids)}")
    chart = ".pluto-chart[data-state=ready]"
    page.wait_for_selector(chart)
    # No markup of ours is made of the user's text: no link, no bold, no italic, no line break.
    for tag in ["a", "tspan[style*='bold']", "tspan[style*='italic']"]:
        assert page.locator(f"{chart} svg {tag}").count() == 0, tag
    title = page.locator(f"{chart} .gtitle").text_content()
    assert title == HOSTILE_KEY
    legend = page.locator(f"{chart} .legendtext").all_text_contents()
    assert sorted(legend) == sorted(f"{display} {HOSTILE_NAME} {i}"
                                    for i, display in enumerate(ids))
    # The tooltip: Plotly fills %{y} of our template, not of the name.
    page.evaluate(
        """(sel) => { const gd = document.querySelector(sel);
             const i = gd.data.findIndex((t) => t.meta.role === 'series');
             window.Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 2}]); }""", chart)
    page.wait_for_function(
        "(sel) => document.querySelector(sel).textContent.includes('step 2')",
        arg=f"{chart} .hoverlayer")
    tip = page.locator(f"{chart} .hoverlayer").text_content() or ""
    assert f"{ids[0]} {HOSTILE_NAME} 0" in tip, tip


# -- several ranks -------------------------------------------------------------------


def test_ranks_are_one_line_each_or_their_mean_with_a_band_and_system_metrics_per_node(
        page: Page, chart_server: ServerProcess) -> None:
    run = httpx.post(f"{chart_server.url}/api/v1/runs",
                     json={"project": "chart-ranks", "name": "ranks"}).json()
    steps = np.arange(50)
    for rank, offset in ((0, 0.0), (1, 1.0)):
        ingest(chart_server.url, run["id"], steps, steps * 0.01 + offset, writer=rank)
        ingest(chart_server.url, run["id"], steps, np.full(50, 10.0 + rank), writer=rank,
               key="sys/cpu", seq0=5)
    httpx.post(f"{chart_server.url}/api/v1/runs/{run['id']}/finish", json={})
    url = f"{chart_server.url}/projects/chart-ranks/runs/{run['display_id']}"
    open_chart(page, url, "#run-charts")
    lines = series(page, "#run-charts")
    assert len(lines) == 2 and len({t["color"] for t in lines}) == 2, "one line per rank"
    assert sorted(t["y"][0] for t in lines) == pytest.approx([0.0, 1.0])

    before = draws(page, "#run-charts")
    page.locator("#run-charts select[name=agg]").select_option("mean")
    wait_redrawn(page, before, "#run-charts")
    assert parse_qs(urlsplit(page.url).query)["agg"] == ["mean"]
    [mean] = series(page, "#run-charts")
    assert mean["y"] == pytest.approx([s * 0.01 + 0.5 for s in range(50)])
    [band] = [t for t in traces(page, "#run-charts") if t["role"] == "band"]
    # The band spans the ranks: rank 0's values below, rank 1's above.
    assert max(band["y"]) == pytest.approx(0.49 + 1.0)
    assert min(band["y"]) == pytest.approx(0.0)

    # sys/ keys are not among the run's metric charts: they are per node, below.
    keys = page.eval_on_selector_all("#run-charts .pluto-chart",
                                     "els => els.map((e) => e.dataset.key)")
    assert keys == ["loss"]
    page.wait_for_selector("#run-system .pluto-chart[data-key='sys/cpu'][data-state=ready]")
    page.locator("#run-system select[name=agg]").select_option("none")
    page.wait_for_function(
        "() => document.querySelector(\"#run-system .pluto-chart\").data"
        ".filter((t) => t.meta.role === 'series').length === 2")
    names = page.evaluate(
        "() => document.querySelector('#run-system .pluto-chart').data"
        ".filter((t) => t.meta.role === 'series').map((t) => t.name)")
    assert sorted(names) == ["node 0", "node 1"]


def expected_ema(values: list[float], weight: float) -> list[float]:
    """Debiased EMA, computed here independently of the page's code."""
    out, last, debias = [], 0.0, 0.0
    for value in values:
        last = last * weight + (1 - weight) * value
        debias = debias * weight + (1 - weight)
        out.append(last / debias)
    return out


def test_smoothing_time_axes_and_log_scale_come_from_the_url(
        page: Page, lineage: Lineage) -> None:
    raw = ([value_a(s) for s in range(51)] + [value_b(s) for s in range(51, 151)]
           + [value_c(s) for s in range(151, 251)])
    open_chart(page, run_url(lineage, "C", "smooth=0.9"))
    [line] = series(page)
    assert line["y"] == pytest.approx(expected_ema(raw, 0.9))
    assert line["y"] != pytest.approx(raw)

    open_chart(page, run_url(lineage, "C", "x=time&logy=1"))
    layout = page.evaluate(f"""() => {{ const l = document.querySelector("{CHART}").layout;
                                 return {{x: l.xaxis.type, y: l.yaxis.type}}; }}""")
    assert layout == {"x": "date", "y": "log"}
    [timed] = series(page)
    now = datetime.datetime.now(datetime.UTC)
    assert all(isinstance(x, datetime.datetime) and abs(now - x).total_seconds() < 3600
               for x in timed["x"])  # wall times of the points, logged minutes ago

    open_chart(page, run_url(lineage, "C", "x=relative"))
    [relative] = series(page)
    assert relative["x"][0] == pytest.approx(0.0)
    assert relative["x"] == sorted(relative["x"]) and relative["x"][-1] > 0
