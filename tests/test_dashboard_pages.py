"""The web dashboard in a real headless Chromium against a real ``pluto server``.

The runs are made through the real SDK (``pluto.init``, ``run.log``, forks, checkpoints);
console lines of two ranks go through ``/ingest`` as a sidecar sends them. Every page is
checked for what a user reads on it and for its URL: filters, sort, rank and search live
in the query, so a reload (or a shared link) shows the same view.

The charts module (``charts.js``) is tested elsewhere; here a stub stands in for it where
the test is about what the pages hand to it.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect
from support.browser import RequestLog, save_screenshot
from support.server_process import ServerProcess, create_api_key

import pluto

FAST: dict[str, Any] = {
    "console": False,
    "flush_interval": 0.05,
    "init_timeout": 10,
    "finish_timeout": 10,
}

LOG_LINES = {
    0: ["rank 0 starting", "epoch 1 loss=0.52", "rank 0 saved checkpoint"],
    1: ["rank 1 starting", "epoch 1 loss=NaN detected", "rank 1 done"],
}

CHARTS_STUB = """
window.__chartCalls = [];
function record(fn) {
  return (container, options) => {
    window.__chartCalls.push({fn, container: container.id, isConnected: container.isConnected,
                              options: JSON.parse(JSON.stringify(options))});
    container.textContent = "stub chart: " + fn;
  };
}
window.PlutoCharts = {renderRun: record("renderRun"), renderSystem: record("renderSystem"),
                      renderCompare: record("renderCompare"),
                      renderExperiment: record("renderExperiment")};
"""


@pytest.fixture(scope="module")
def backend() -> str:
    """The dashboard reads the API only: one backend is enough (the API has its own tests)."""
    return "sqlite"


@dataclass
class Project:
    name: str
    url: str
    root: str  # display ids
    fork: str
    deep: str
    other: str
    root_id: int

    def path(self, suffix: str = "") -> str:
        return f"{self.url}/projects/{self.name}{suffix}"


def ingest_logs(url: str, run_id: int) -> None:
    """Console lines of two ranks, plus system metrics of node 0 (as a sidecar sends)."""
    chunks = [
        {"run": run_id, "session": f"dash-{uuid.uuid4().hex}", "seq": 0, "writer": writer,
         "logs": [[time.time() + i, 2 if "NaN" in line else 1, line]
                  for i, line in enumerate(lines)]}
        for writer, lines in LOG_LINES.items()
    ]
    chunks.append({"run": run_id, "session": f"dash-{uuid.uuid4().hex}", "seq": 0, "writer": 0,
                   "keys": ["sys/node0/cpu_percent"], "key_index": [0, 0], "steps": [0, 1],
                   "values": [12.5, 40.0], "times": [time.time(), time.time()]})
    resp = httpx.post(f"{url}/api/v1/ingest", json={"chunks": chunks}, timeout=30)
    assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def project(shared_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Project]:
    """Four runs: a root, a fork of it at 5, a fork of the fork at 7, and an unrelated one."""
    name = f"dash-{uuid.uuid4().hex[:6]}"
    tmp = tmp_path_factory.mktemp("dashboard")
    settings = {**FAST, "url": shared_server.url}
    common: dict[str, Any] = {"project": name, "dir": tmp / "spool", "settings": settings}

    root = pluto.init(name="baseline", config={"lr": 0.001, "model": {"layers": 2}},
                      tags=["baseline", "sweep"], **common)
    for step in range(10):
        root.log({"loss": 1.0 / (step + 1), "acc": step / 10})
    ckpt = tmp / "model.bin"
    ckpt.write_bytes(b"weights" * 1000)
    assert root.log_checkpoint(ckpt, step=5) is not None
    root.finish()

    fork = pluto.init(name="lr-high", config={"lr": 0.01}, tags=["fork"],
                      fork_run_id=root.display_id, fork_step=5, fork_checkpoint=True,
                      inherit_tags=True, **common)
    for step in range(6, 10):
        fork.log({"loss": 0.5 / step}, step=step)
    fork.finish(status="FAILED")

    deep = pluto.init(name="lr-high-deeper", fork_run_id=fork.display_id, fork_step=7,
                      **common)
    deep.log({"loss": 0.01}, step=8)

    other = pluto.init(name="zeta-probe", tags=["other"], **common)
    other.log({"loss": 3.0})
    other.finish(status="TERMINATED")

    ingest_logs(shared_server.url, root.id)
    try:
        yield Project(name=name, url=shared_server.url, root=root.display_id,
                      fork=fork.display_id, deep=deep.display_id, other=other.display_id,
                      root_id=root.id)
    finally:
        deep.finish()


def stub_charts(page: Page) -> None:
    page.route("**/static/charts.js", lambda route: route.fulfill(
        status=200, content_type="text/javascript", body=CHARTS_STUB))


def ready(page: Page, view: str) -> None:
    expect(page.locator(f'#app[data-view="{view}"][data-ready="true"]')).to_be_attached()


def row_ids(page: Page) -> list[str]:
    ids: list[str] = page.locator("#runs-table tbody tr[data-run]").evaluate_all(
        "rows => rows.map(r => r.dataset.run)")
    return ids


# -- server side: routes and caching -------------------------------------------------


def test_page_routes_serve_index_uncached_and_assets_cached(project: Project) -> None:
    with httpx.Client(base_url=project.url) as client:
        for path in ["/", f"/projects/{project.name}",
                     f"/projects/{project.name}/runs/{project.root}",
                     f"/projects/{project.name}/experiments/baseline",
                     f"/compare?project={project.name}&runs={project.root}"]:
            resp = client.get(path)
            assert resp.status_code == 200, path
            assert resp.headers["content-type"].startswith("text/html")
            assert 'src="/static/app.js"' in resp.text
            assert "no-cache" in resp.headers["cache-control"]
        css = client.get("/static/style.css")
        assert css.status_code == 200 and "max-age" in css.headers["cache-control"]
        plotly = client.get("/static/vendor/plotly.min.js")
        assert plotly.status_code == 200
        assert plotly.headers["content-type"].startswith("text/javascript")
        assert "plotly" in plotly.text[:2000].lower() and len(plotly.content) > 1_000_000
        # The API still answers JSON under the dashboard's routes.
        api = client.get(f"/api/v1/projects/{project.name}/runs")
        assert api.status_code == 200 and len(api.json()["runs"]) == 4
        assert client.get("/static/no-such-file.js").status_code == 404
        assert client.get("/api/v1/no-such-route").status_code == 404


# -- projects and runs ---------------------------------------------------------------


def test_projects_list_shows_the_project_and_links_to_its_runs(
        page: Page, project: Project) -> None:
    page.goto(project.url + "/")
    ready(page, "projects")
    row = page.locator(f'#projects-table tr[data-project="{project.name}"]')
    expect(row.locator('[data-col="runs"]')).to_have_text("4")
    save_screenshot(page, "dashboard-projects")
    row.locator("a").click()
    ready(page, "runs")
    assert page.url == project.path()
    assert sorted(row_ids(page)) == sorted([project.root, project.fork, project.deep,
                                            project.other])


def test_runs_table_shows_status_tags_and_linked_fork_parents(
        page: Page, project: Project) -> None:
    page.goto(project.path())
    ready(page, "runs")
    fork = page.locator(f'#runs-table tr[data-run="{project.fork}"]')
    expect(fork.locator('[data-col="status"]')).to_have_text("FAILED")
    expect(fork.locator('[data-col="fork_step"]')).to_have_text("5")
    expect(fork.locator('[data-tag="fork"]')).to_be_visible()
    deep = page.locator(f'#runs-table tr[data-run="{project.deep}"]')
    expect(deep.locator('[data-col="status"]')).to_have_text("RUNNING")
    expect(deep.locator('[data-col="parent"] a')).to_have_text(project.fork)
    save_screenshot(page, "dashboard-runs")
    fork.locator('[data-col="parent"] a').click()
    ready(page, "run")
    assert page.url == project.path(f"/runs/{project.root}")
    expect(page.locator("#run-header")).to_contain_text("baseline")


def test_filters_and_sort_change_rows_and_url_and_survive_a_reload(
        page: Page, project: Project) -> None:
    page.goto(project.path())
    ready(page, "runs")
    assert len(row_ids(page)) == 4

    page.select_option("#filter-status", "FAILED")
    assert row_ids(page) == [project.fork]
    assert "status=FAILED" in page.url

    page.select_option("#filter-status", "")
    page.select_option("#filter-tag", "sweep")  # the root's tag, inherited by its forks
    assert sorted(row_ids(page)) == sorted([project.root, project.fork])
    assert "tag=sweep" in page.url

    page.select_option("#filter-tag", "")
    page.fill("#filter-name", "lr-high")
    assert sorted(row_ids(page)) == sorted([project.fork, project.deep])

    page.fill("#filter-name", "")
    page.click('th[data-sort="name"]')
    assert row_ids(page) == [project.root, project.fork, project.deep, project.other]
    assert "sort=name" in page.url and "dir=asc" in page.url
    page.click('th[data-sort="name"]')
    assert row_ids(page) == [project.other, project.deep, project.fork, project.root]
    assert "dir=asc" not in page.url

    # A shared URL: filters and sort together, restored by a fresh load.
    page.select_option("#filter-tag", "sweep")
    url = page.url
    page.reload()
    ready(page, "runs")
    assert page.url == url
    expect(page.locator("#filter-tag")).to_have_value("sweep")
    expect(page.locator('th[data-sort="name"]')).to_have_attribute("aria-sort", "descending")
    assert row_ids(page) == [project.fork, project.root]  # the deep fork has no tags


def test_chosen_metrics_are_columns_kept_in_the_url(page: Page, project: Project) -> None:
    page.goto(project.path("?metric=loss"))
    ready(page, "runs")
    expect(page.locator('th[data-sort="metric:loss"]')).to_be_visible()
    # Each run's value at its highest own step.
    expect(page.locator(f'tr[data-run="{project.other}"] td[data-metric="loss"]')
           ).to_have_text("3")
    expect(page.locator(f'tr[data-run="{project.root}"] td[data-metric="loss"]')
           ).to_have_text("0.1")
    page.click('th[data-sort="metric:loss"]')
    assert row_ids(page) == [project.deep, project.fork, project.root, project.other]
    page.fill("#metric-input", "loss, acc")
    page.press("#metric-input", "Enter")
    ready(page, "runs")
    expect(page.locator(f'tr[data-run="{project.root}"] td[data-metric="acc"]')
           ).to_have_text("0.9")
    assert "sort=metric%3Aloss" in page.url and "metric=loss&metric=acc" in page.url
    assert row_ids(page) == [project.deep, project.fork, project.root, project.other]


def test_compare_button_opens_the_selected_runs(page: Page, project: Project) -> None:
    stub_charts(page)
    page.goto(project.path())
    ready(page, "runs")
    expect(page.locator("#compare-button")).to_have_attribute("aria-disabled", "true")
    page.check(f'input.run-select[data-run="{project.root}"]')
    page.check(f'input.run-select[data-run="{project.fork}"]')
    page.click("#compare-button")
    ready(page, "compare")
    query = parse_qs(urlsplit(page.url).query)
    assert query["project"] == [project.name]
    refs = query["runs"][0].split(",")
    assert sorted(refs) == sorted([project.root, project.fork])
    expect(page.locator("#compare-runs tbody tr")).to_have_count(2)
    expect(page.locator('#config-diff tr[data-key="lr"]')).to_be_visible()
    calls = page.evaluate("window.__chartCalls")
    assert [c["fn"] for c in calls] == ["renderCompare"]
    assert calls[0]["isConnected"]
    assert sorted(r["display_id"] for r in calls[0]["options"]["runs"]) == sorted(refs)


# -- run page -------------------------------------------------------------------------


def test_run_page_shows_config_tags_status_history_and_lineage(
        page: Page, project: Project) -> None:
    stub_charts(page)
    page.goto(project.path(f"/runs/{project.fork}"))
    ready(page, "run")
    expect(page.locator("#run-header")).to_contain_text("lr-high")
    config = page.locator("#config-json").inner_text()
    assert '"lr": 0.01' in config and '"layers": 2' in config  # own value + inherited one
    expect(page.locator('#run-tags [data-tag="fork"]')).to_be_visible()
    history = page.locator("#status-history tr").evaluate_all(
        "rows => rows.map(r => r.dataset.status)")
    assert history == ["RUNNING", "FAILED"]
    expect(page.locator(f'#lineage-ancestors li[data-run="{project.root}"] a')).to_be_visible()
    expect(page.locator(f'#lineage-descendants li[data-run="{project.deep}"] a')
           ).to_be_visible()
    expect(page.locator(f'#lineage-descendants li[data-run="{project.deep}"]')
           ).to_have_attribute("data-depth", "1")
    save_screenshot(page, "dashboard-run")

    page.click(f'#lineage-descendants li[data-run="{project.deep}"] a')
    ready(page, "run")
    assert page.url == project.path(f"/runs/{project.deep}")
    expect(page.locator("#run-header")).to_contain_text("lr-high-deeper")
    chain = page.locator("#lineage-ancestors li").evaluate_all(
        "items => items.map(i => i.dataset.run)")
    assert chain == [project.root, project.fork, project.deep]
    page.go_back()
    ready(page, "run")
    expect(page.locator("#run-header")).to_contain_text(project.fork)


def test_run_page_lists_checkpoints_and_where_a_forked_one_came_from(
        page: Page, project: Project) -> None:
    page.goto(project.path(f"/runs/{project.root}"))
    ready(page, "run")
    row = page.locator('#checkpoints-table tr[data-step="5"]')
    expect(row.locator('[data-col="size"]')).to_have_text("6.8 KiB")
    expect(row.locator('[data-col="files"]')).to_contain_text("1 file")
    page.goto(project.path(f"/runs/{project.fork}"))
    ready(page, "run")
    source = page.locator('#checkpoints-table tr[data-step="5"] [data-col="source"]')
    expect(source).to_have_text(f"{project.root} @ 5")
    page.goto(project.path(f"/runs/{project.other}"))
    ready(page, "run")
    expect(page.locator("#no-checkpoints")).to_be_visible()


def test_a_checkpoint_forked_from_another_project_links_to_its_run_there(
        page: Page, project: Project, tmp_path: Path) -> None:
    """``fork_checkpoint(from_project=...)`` crosses projects: the "Forked from" link goes
    to the source run in its own project, not to that display id in this one."""
    elsewhere = f"elsewhere-{uuid.uuid4().hex[:6]}"
    run = pluto.init(project=elsewhere, name="consumer", dir=tmp_path / "spool",
                     settings={**FAST, "url": project.url})
    info = pluto.fork_checkpoint(to_run=run, from_run=project.root, from_project=project.name,
                                 url=project.url)
    run.finish()
    assert (info.source_display_id, info.source_project) == (project.root, project.name)
    stub_charts(page)
    page.goto(f"{project.url}/projects/{elsewhere}/runs/{run.display_id}")
    ready(page, "run")
    source = page.locator('#checkpoints-table tr[data-step="5"] [data-col="source"] a')
    expect(source).to_have_attribute("href", f"/projects/{project.name}/runs/{project.root}")
    expect(source).to_contain_text(project.root)
    source.click()
    ready(page, "run")
    assert page.url == project.path(f"/runs/{project.root}")
    expect(page.locator("#run-header")).to_contain_text("baseline")


def test_a_rank_in_the_url_that_is_not_a_whole_number_is_ignored(
        page: Page, project: Project) -> None:
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/logs" in r.url else None)
    for rank in ["abc", "-1", "1.5", "1e0"]:
        asked.clear()
        page.goto(project.path(f"/runs/{project.root}?rank={rank}"))
        ready(page, "run")
        expect(page.locator('#log-lines[data-loaded="true"] .log-line')).to_have_count(6)
        options = page.locator("#log-rank option").evaluate_all(
            "os => os.map((o) => o.value)")
        assert options == ["", "0", "1"], (rank, options)
        expect(page.locator("#log-rank")).to_have_value("")
        assert asked and not [u for u in asked if "writer=" in u], (rank, asked)


def test_console_log_filters_by_rank_and_search_kept_in_the_url(
        page: Page, project: Project) -> None:
    page.goto(project.path(f"/runs/{project.root}"))
    ready(page, "run")
    lines = page.locator('#log-lines[data-loaded="true"] .log-line')
    expect(lines).to_have_count(6)

    page.select_option("#log-rank", "1")
    expect(page.locator('#log-lines[data-loaded="true"] .log-line')).to_have_count(3)
    writers = set(page.locator("#log-lines .log-line").evaluate_all(
        "ls => ls.map(l => l.dataset.writer)"))
    assert writers == {"1"} and "rank=1" in page.url

    page.select_option("#log-rank", "")
    page.fill("#log-search", "LOSS=")
    expect(page.locator('#log-lines[data-loaded="true"] .log-line')).to_have_count(2)
    expect(page).to_have_url(re.compile(r"q=LOSS"))

    page.select_option("#log-rank", "1")
    expect(page.locator('#log-lines[data-loaded="true"] .log-line')).to_have_count(1)
    page.reload()
    ready(page, "run")
    only = page.locator('#log-lines[data-loaded="true"] .log-line')
    expect(only).to_have_count(1)
    expect(only).to_contain_text("epoch 1 loss=NaN detected")
    expect(page.locator("#log-search")).to_have_value("LOSS=")
    expect(page.locator("#log-rank")).to_have_value("1")


def test_run_page_hands_its_containers_to_the_charts_module(
        page: Page, project: Project) -> None:
    stub_charts(page)
    page.goto(project.path(f"/runs/{project.root}"))
    ready(page, "run")
    expect(page.locator("#run-charts")).to_have_text("stub chart: renderRun")
    calls = {c["fn"]: c for c in page.evaluate("window.__chartCalls")}
    assert set(calls) == {"renderRun", "renderSystem"}
    run = calls["renderRun"]
    assert run["container"] == "run-charts" and run["isConnected"]
    assert run["options"]["project"] == project.name
    assert run["options"]["run"]["display_id"] == project.root
    system = calls["renderSystem"]
    assert system["container"] == "run-system"
    assert system["options"]["keys"] == ["sys/node0/cpu_percent"]


def test_without_the_charts_module_the_run_page_says_so(page: Page, project: Project) -> None:
    page.route("**/static/charts.js", lambda route: route.fulfill(status=404, body=""))
    page.goto(project.path(f"/runs/{project.root}"))
    ready(page, "run")
    expect(page.locator("#run-charts .charts-missing")).to_contain_text("Charts are not available")
    expect(page.locator("#config-json")).to_contain_text('"lr"')  # the rest still works


def test_experiment_view_lists_the_runs_of_that_name(page: Page, project: Project) -> None:
    stub_charts(page)
    page.goto(project.path(f"/runs/{project.root}"))
    ready(page, "run")
    page.click("#run-facts a[href*='/experiments/']")
    ready(page, "experiment")
    assert page.url == project.path("/experiments/baseline")
    expect(page.locator("#compare-runs tbody tr")).to_have_count(1)
    calls = page.evaluate("window.__chartCalls")  # the run page's calls came first
    assert [(c["fn"], c["options"]) for c in calls if c["fn"] == "renderExperiment"] == [
        ("renderExperiment", {"project": project.name, "name": "baseline"})]


def test_an_experiment_whose_name_holds_a_slash_has_a_working_url(
        page: Page, shared_server: ServerProcess) -> None:
    """``gpt/small`` is linked as ``/experiments/gpt%2Fsmall``; the server decodes ``%2F``
    before it matches a route, so a reload or a shared link must still find the page."""
    name = f"slash-{uuid.uuid4().hex[:6]}"
    created = httpx.post(f"{shared_server.url}/api/v1/runs",
                         json={"project": name, "name": "gpt/small"})
    assert created.status_code == 201, created.text
    url = f"{shared_server.url}/projects/{name}/experiments/gpt%2Fsmall"
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    stub_charts(page)
    page.goto(f"{shared_server.url}/projects/{name}/runs/{created.json()['display_id']}")
    ready(page, "run")
    page.click("#run-facts a[href*='/experiments/']")
    ready(page, "experiment")
    assert page.url == url
    page.reload()  # the server answers this URL itself now
    ready(page, "experiment")
    expect(page.locator("#compare-runs tbody tr")).to_have_count(1)
    calls = [c["options"] for c in page.evaluate("window.__chartCalls")
             if c["fn"] == "renderExperiment"]
    assert calls == [{"project": name, "name": "gpt/small"}]


def test_a_project_of_more_runs_than_one_api_page_shows_them_all(
        page: Page, shared_server: ServerProcess) -> None:
    """The API answers up to 1000 runs a page; the runs table and an experiment follow
    ``next_cursor`` to the last page (they used to show the newest 1000)."""
    name = f"many-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=f"{shared_server.url}/api/v1", timeout=30) as client, \
            ThreadPoolExecutor(max_workers=8) as pool:
        def create(i: int) -> None:
            body = {"project": name, "run_id": f"r{i}", "name": "same"}
            assert client.post("/runs", json=body).status_code == 201
        list(pool.map(create, range(1001)))
        first = client.get(f"/projects/{name}/runs").json()
    assert len(first["runs"]) == 1000 and first["next_cursor"] is not None
    stub_charts(page)
    page.goto(f"{shared_server.url}/projects/{name}")
    ready(page, "runs")
    expect(page.locator("#runs-count")).to_have_text("1001 of 1001 runs")
    page.goto(f"{shared_server.url}/projects/{name}/experiments/same")
    ready(page, "experiment")
    expect(page.locator("#compare-runs tbody tr")).to_have_count(1001)


# -- air-gapped ----------------------------------------------------------------------


def test_every_request_goes_to_the_server_itself(page: Page, project: Project) -> None:
    requests = RequestLog(page)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400
            and not r.url.endswith("/static/charts.js") else None)
    for path in ["/", f"/projects/{project.name}?metric=loss",
                 f"/projects/{project.name}/runs/{project.fork}",
                 f"/projects/{project.name}/experiments/baseline",
                 f"/compare?project={project.name}&runs={project.root},{project.fork}"]:
        page.goto(project.url + path)
        expect(page.locator('#app[data-ready="true"]')).to_be_attached()
        page.wait_for_load_state("networkidle")
        if "/runs/" in path:  # with the real charts module
            save_screenshot(page, "dashboard-run-with-charts")
    assert requests.foreign(project.url) == []
    assert any(u.endswith("/static/vendor/plotly.min.js") for u in requests.urls)
    assert page.evaluate("typeof window.Plotly") == "object"
    assert failed == []


# -- auth -------------------------------------------------------------------------------


def test_with_auth_on_the_page_asks_for_a_key_and_works_with_one(
        page: Page, server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "auth-data"
    server = server_factory(data_dir=data_dir, extra_args=["--auth"])
    key = create_api_key(data_dir, "dashboard")
    created = httpx.post(f"{server.url}/api/v1/runs", json={"project": "guarded", "name": "x"},
                         headers={"authorization": f"Bearer {key}"})
    assert created.status_code == 201, created.text

    page.goto(server.url + "/")
    expect(page.locator("#auth-form")).to_be_visible()
    expect(page.locator("#projects-table")).to_have_count(0)
    page.fill("#api-key-input", "pluto_wrong_key")
    page.click("#api-key-submit")
    expect(page.locator("#auth-form")).to_contain_text("refused")
    page.fill("#api-key-input", key)
    page.click("#api-key-submit")
    expect(page.locator('#projects-table tr[data-project="guarded"]')).to_be_visible()
    # The key is remembered: a new page load needs no prompt; forgetting it brings it back.
    page.reload()
    expect(page.locator('#projects-table tr[data-project="guarded"]')).to_be_visible()
    page.click("#key-button")
    expect(page.locator("#auth-form")).to_be_visible()
