"""Metric, key, log and lineage queries over HTTP, on SQLite and on PostgreSQL.

Ownership in a lineage: the root owns steps up to its child's fork step, a fork
owns the steps after its own fork step. Queries return a run's own points or
its stitched lineage, each point labelled with the run that owns it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from api_helpers import Api, Json, assert_error, chunk, ramp, seed_lineage, unique_project
from support.server_process import ServerProcess

from pluto.wire import MetricSeries


@pytest.fixture(scope="module")
def api(shared_server: ServerProcess) -> Iterator[Api]:
    with Api(shared_server.url) as client:
        yield client


@dataclass(frozen=True)
class Tree:
    """The seed lineage plus a little more.

    A logs ``loss`` = step and ``lr`` over 0-100; B forks A at 50 and logs
    ``loss`` = 1000 + step and ``b_metric`` over 51-200; C forks B at 150 and
    logs ``loss`` = 5000 + step over 151-160.
    """

    project: str
    a: Json
    b: Json
    c: Json


@pytest.fixture(scope="module")
def tree(api: Api) -> Tree:
    project = unique_project("tree")
    a, b, c = seed_lineage(api, project)
    api.log(a["id"], {"lr": ramp(0, 100, lambda s: 0.1)})
    api.log(b["id"], {"b_metric": ramp(51, 200, lambda s: -s)})
    api.log(c["id"], {"loss": ramp(151, 160, lambda s: 5000.0 + s)})
    return Tree(project, a, b, c)


def expected_loss(step: int) -> float:
    """The stitched ``loss`` of C at ``step``."""
    if step <= 50:
        return float(step)
    if step <= 150:
        return 1000.0 + step
    return 5000.0 + step


# -- own points and stitched lineage ----------------------------------------------------


def test_own_points_are_only_the_runs_own(api: Api, tree: Tree) -> None:
    b = api.one_series(tree.b["id"], "loss")
    assert b.steps == list(range(51, 201))
    assert b.values == [1000.0 + s for s in range(51, 201)]
    assert set(b.owners) == {tree.b["id"]} and b.writer == 0
    assert len(b.times) == len(b.steps)

    a = api.one_series(tree.a["id"], "loss")
    assert a.steps == list(range(101))  # A's points after the fork are still A's
    c = api.one_series(tree.c["id"], "loss")
    assert c.steps == list(range(151, 161)) and set(c.owners) == {tree.c["id"]}


def test_the_stitched_lineage_labels_each_point_with_its_owner(api: Api, tree: Tree) -> None:
    a, b, c = tree.a["id"], tree.b["id"], tree.c["id"]
    result = api.metrics(tree.c["display_id"], project=tree.project, keys=["loss"], lineage=True)
    assert result.run == c and result.lineage is True
    (series,) = result.series
    assert series.steps == list(range(161))
    assert series.values == [expected_loss(s) for s in range(161)]
    assert series.owners == [a] * 51 + [b] * 100 + [c] * 10

    from_b = api.one_series(b, "loss", lineage=True)
    assert from_b.steps == list(range(201))
    assert from_b.owners == [a] * 51 + [b] * 150


def test_the_json_answer_carries_the_same_stitched_points(api: Api, tree: Tree) -> None:
    resp = api.metrics_raw(tree.c["id"], msgpack=False, keys=["loss"], lineage=True)
    assert resp.status_code == 200
    (series,) = resp.json()["series"]
    assert series["steps"] == list(range(161))
    assert series["values"] == [expected_loss(s) for s in range(161)]
    assert series["owners"][50:52] == [tree.a["id"], tree.b["id"]]


def test_a_lineage_query_without_keys_returns_every_inherited_key(api: Api, tree: Tree) -> None:
    by_key = {s.key: s for s in api.metrics(tree.c["id"], lineage=True).series}
    assert sorted(by_key) == ["b_metric", "loss", "lr"]
    assert by_key["lr"].steps == list(range(51))  # A's lr, up to the fork step only
    assert set(by_key["lr"].owners) == {tree.a["id"]}
    assert by_key["b_metric"].steps == list(range(51, 151))
    assert [s.key for s in api.metrics(tree.c["id"]).series] == ["loss"]


def test_step_min_and_step_max_cut_own_and_stitched_points(api: Api, tree: Tree) -> None:
    window = api.one_series(tree.c["id"], "loss", lineage=True, step_min=40, step_max=60)
    assert window.steps == list(range(40, 61))
    assert window.owners == [tree.a["id"]] * 11 + [tree.b["id"]] * 10
    own = api.one_series(tree.b["id"], "loss", step_max=55)
    assert own.steps == list(range(51, 56))
    assert api.one_series(tree.b["id"], "loss", step_min=195).steps == list(range(195, 201))
    assert api.series(tree.b["id"], "loss", step_min=300) == []
    assert api.series(tree.b["id"], "loss", step_min=60, step_max=55) == []


def test_the_keys_endpoint_lists_own_or_lineage_keys(api: Api, tree: Tree) -> None:
    assert api.keys(tree.b["id"]).json() == {"keys": ["b_metric", "loss"]}
    assert api.keys(tree.b["id"], lineage=True).json() == {"keys": ["b_metric", "loss", "lr"]}
    assert api.keys(tree.c["id"]).json() == {"keys": ["loss"]}
    assert api.keys(tree.c["display_id"], project=tree.project, lineage=True).json() == {
        "keys": ["b_metric", "loss", "lr"]
    }
    assert_error(api.keys(999_999_999), 404, "does not exist")


def test_keys_select_series_and_unknown_keys_select_nothing(api: Api, tree: Tree) -> None:
    result = api.metrics(tree.a["id"], keys=["loss", "lr", "missing"])
    assert [s.key for s in result.series] == ["loss", "lr"]
    assert api.metrics(tree.a["id"], keys=["missing"]).series == []


# -- writers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(api: Api) -> Json:
    """Three writers of ``x``: rank 0 logs s, rank 1 logs 10*s with NaN at 3, rank 2 only NaN.

    Steps 0-9 for ranks 0 and 1, 5-9 for rank 2, and a step 10 that only rank 0
    logs, as NaN.
    """
    run = api.create_ok(unique_project("ranks"))
    api.log(run["id"], {"x": [*ramp(0, 9), (10, math.nan)]}, writer=0)
    api.log(run["id"], {"x": ramp(0, 9, lambda s: math.nan if s == 3 else 10.0 * s)}, writer=1)
    api.log(run["id"], {"x": ramp(5, 9, lambda s: math.nan)}, writer=2)
    return run


def test_without_aggregation_each_writer_is_its_own_series(api: Api, ranks: Json) -> None:
    series = api.series(ranks["id"], "x")
    assert [s.writer for s in series] == [0, 1, 2]
    assert series[0].steps == list(range(11))
    assert series[1].values[:3] == [0.0, 10.0, 20.0] and math.isnan(series[1].values[3])
    assert series[2].steps == list(range(5, 10))


def test_the_writer_filter_keeps_one_rank(api: Api, ranks: Json) -> None:
    only = api.one_series(ranks["id"], "x", writer=1)
    assert only.writer == 1 and only.steps == list(range(10))
    assert api.series(ranks["id"], "x", writer=7) == []


def test_the_mean_across_writers_ignores_nan(api: Api, ranks: Json) -> None:
    mean = api.one_series(ranks["id"], "x", aggregate="mean")
    assert mean.writer is None
    assert mean.steps == list(range(11))
    expected = [5.5 * s for s in range(10)]
    expected[3] = 3.0  # rank 1 logged NaN: the mean of the others
    assert mean.values[:10] == expected  # rank 2's NaNs at 5-9 are ignored too
    assert math.isnan(mean.values[10])  # nobody logged a number at step 10
    assert set(mean.owners) == {ranks["id"]}


def test_buckets_split_by_writer_unless_averaged(api: Api, ranks: Json) -> None:
    split = api.series(ranks["id"], "x", buckets=2)
    assert [(s.writer, s.counts) for s in split] == [(0, [6, 5]), (1, [5, 5]), (2, [3, 2])]
    (mean,) = api.series(ranks["id"], "x", buckets=2, aggregate="mean")
    assert mean.counts == [6, 5] and mean.writer is None


# -- downsampling ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiky(api: Api) -> Json:
    """``y`` is 0 over steps 0-999 except a spike of 1e6 at 637 and a dip of -1e6 at 12."""
    run = api.create_ok(unique_project("spiky"))
    values = {637: 1e6, 12: -1e6}
    api.log(run["id"], {"y": ramp(0, 999, lambda s: values.get(s, 0.0))})
    return run


def test_buckets_give_min_max_mean_and_count_and_keep_spikes(api: Api, spiky: Json) -> None:
    s = api.one_series(spiky["id"], "y", buckets=10)
    assert s.steps == list(range(0, 1000, 100))
    assert s.last_steps == list(range(99, 1000, 100))
    assert s.counts == [100] * 10
    assert s.maxs == [0.0] * 6 + [1e6] + [0.0] * 3  # the spike survives
    assert s.mins == [-1e6] + [0.0] * 9
    assert s.means == [-1e4] + [0.0] * 5 + [1e4] + [0.0] * 3
    assert s.values == [] and s.owners == [spiky["id"]] * 10

    (whole,) = api.series(spiky["id"], "y", buckets=1)
    assert (whole.mins, whole.maxs, whole.counts) == ([-1e6], [1e6], [1000])
    fine = api.one_series(spiky["id"], "y", buckets=5000)  # more buckets than points
    assert fine.counts == [1] * 1000 and fine.maxs[637] == 1e6


def test_buckets_of_a_step_window(api: Api, spiky: Json) -> None:
    s = api.one_series(spiky["id"], "y", buckets=4, step_min=600, step_max=699)
    assert s.steps == [600, 625, 650, 675] and s.counts == [25] * 4
    assert s.maxs == [0.0, 1e6, 0.0, 0.0]


def check_buckets_against_points(buckets: MetricSeries, points: MetricSeries) -> None:
    """Every bucket summarises exactly the raw points in its step range, of one owner."""
    assert sum(buckets.counts) == len(points.steps)
    for i, (first, last) in enumerate(zip(buckets.steps, buckets.last_steps, strict=True)):
        inside = [j for j, step in enumerate(points.steps) if first <= step <= last]
        values = [points.values[j] for j in inside]
        assert {points.owners[j] for j in inside} == {buckets.owners[i]}, (first, last)
        assert buckets.counts[i] == len(inside)
        assert (buckets.mins[i], buckets.maxs[i]) == (min(values), max(values))
        assert buckets.means[i] == pytest.approx(sum(values) / len(values))


@pytest.mark.parametrize("count", [1, 3, 4, 7, 50])
def test_a_bucket_never_straddles_a_fork(api: Api, tree: Tree, count: int) -> None:
    points = api.one_series(tree.c["id"], "loss", lineage=True)
    buckets = api.one_series(tree.c["id"], "loss", lineage=True, buckets=count)
    check_buckets_against_points(buckets, points)
    assert len(buckets.steps) >= count
    if count == 1:
        assert buckets.owners == [tree.a["id"], tree.b["id"], tree.c["id"]]
        assert (buckets.steps, buckets.last_steps) == ([0, 51, 151], [50, 150, 160])
        assert buckets.counts == [51, 100, 10]


# -- bad queries ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"buckets": 0}, "buckets"),
        ({"buckets": 100_001}, "buckets"),
        ({"aggregate": "median"}, "aggregate"),
        ({"writer": -1}, "writer"),
        ({"step_min": "ten"}, "step_min"),
        ({"lineage": "maybe"}, "lineage"),
    ],
)
def test_bad_metric_parameters_are_422_naming_the_parameter(
    api: Api, tree: Tree, params: Json, phrase: str
) -> None:
    resp = api.metrics_raw(tree.a["id"], msgpack=False, **params)
    assert_error(resp, 422, "invalid parameters", phrase)


def test_metrics_of_an_unknown_run_is_404(api: Api, tree: Tree) -> None:
    assert_error(api.metrics_raw(999_999_999, msgpack=False), 404, "does not exist")
    assert_error(
        api.metrics_raw("NOPE-1", msgpack=False, project=tree.project), 404, "does not exist"
    )


# -- logs ----------------------------------------------------------------------------------------


LINES_0 = [(1, "epoch 1 loss=0.50"), (1, "100% done"), (2, "ERROR nan at step 5")]
LINES_1 = [(1, "rank 1 ready"), (1, "progress 5_0 of 60"), (2, "error: retrying")]


@pytest.fixture(scope="module")
def chatty(api: Api) -> Json:
    """A run with console lines from two writers, in two chunks each."""
    run = api.create_ok(unique_project("logs"))
    api.ingest_ok(chunk(run["id"], writer=0, logs=LINES_0[:2], time=100.0))
    api.ingest_ok(chunk(run["id"], writer=1, logs=LINES_1[:2], time=200.0))
    api.ingest_ok(chunk(run["id"], writer=0, logs=LINES_0[2:], time=300.0))
    api.ingest_ok(chunk(run["id"], writer=1, logs=LINES_1[2:], time=400.0))
    return run


def lines_of(resp_json: Json) -> list[str]:
    return [record["line"] for record in resp_json["lines"]]


def test_logs_come_back_in_arrival_order_with_writer_stream_and_time(
    api: Api, chatty: Json
) -> None:
    page = api.logs(chatty["id"]).json()
    assert lines_of(page) == [
        LINES_0[0][1],
        LINES_0[1][1],
        LINES_1[0][1],
        LINES_1[1][1],
        LINES_0[2][1],
        LINES_1[2][1],
    ]
    assert page["next_after"] is None
    records = page["lines"]
    assert [r["writer"] for r in records] == [0, 0, 1, 1, 0, 1]
    assert [r["stream"] for r in records] == [1, 1, 1, 1, 2, 2]
    assert [r["time"] for r in records] == [100.0, 101.0, 200.0, 201.0, 300.0, 400.0]
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_logs_filter_by_writer(api: Api, chatty: Json) -> None:
    assert lines_of(api.logs(chatty["id"], writer=1).json()) == [line for _, line in LINES_1]
    assert lines_of(api.logs(chatty["id"], writer=5).json()) == []


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("nan at", ["ERROR nan at step 5"]),
        ("100%", ["100% done"]),  # % is a literal, not a wildcard
        ("%", ["100% done"]),
        ("5_0", ["progress 5_0 of 60"]),  # _ too
        ("ss", ["epoch 1 loss=0.50", "progress 5_0 of 60"]),
        ("no such text", []),
    ],
)
def test_logs_filter_by_substring(api: Api, chatty: Json, q: str, expected: list[str]) -> None:
    assert lines_of(api.logs(chatty["id"], q=q).json()) == expected


def test_the_substring_filter_ignores_case_on_every_backend(api: Api, chatty: Json) -> None:
    assert lines_of(api.logs(chatty["id"], q="error").json()) == lines_of(
        api.logs(chatty["id"], q="ERROR").json()
    )
    assert "error: retrying" in lines_of(api.logs(chatty["id"], q="Error").json())
    assert len(lines_of(api.logs(chatty["id"], q="error").json())) == 2


def test_logs_page_with_after_and_next_after(api: Api, chatty: Json) -> None:
    everything = api.logs(chatty["id"]).json()["lines"]
    seen: list[Json] = []
    after: int | None = None
    pages = 0
    while True:
        page = api.logs(chatty["id"], limit=4 if pages == 0 else 1, after=after).json()
        seen += page["lines"]
        pages += 1
        if page["next_after"] is None:
            break
        assert page["next_after"] == page["lines"][-1]["id"]
        after = page["next_after"]
    assert seen == everything
    assert pages == 3  # 4, then 1, then the last 1 with no next page

    filtered = api.logs(chatty["id"], writer=0, limit=2).json()
    assert lines_of(filtered) == [LINES_0[0][1], LINES_0[1][1]]
    rest = api.logs(chatty["id"], writer=0, limit=2, after=filtered["next_after"]).json()
    assert lines_of(rest) == [LINES_0[2][1]] and rest["next_after"] is None


def test_bad_log_parameters_are_422_and_unknown_runs_404(api: Api, chatty: Json) -> None:
    assert_error(api.logs(chatty["id"], limit=0), 422, "invalid parameters", "limit")
    assert_error(api.logs(chatty["id"], after=-1), 422, "invalid parameters", "after")
    assert_error(api.logs(chatty["id"], q="x" * 201), 422, "invalid parameters", "q")
    assert_error(api.logs(999_999_999), 404, "does not exist")


def test_a_fork_starts_with_a_clean_log(api: Api) -> None:
    project = unique_project()
    parent = api.create_ok(project)
    api.ingest_ok(chunk(parent["id"], {"loss": ramp(0, 10)}, logs=[(1, "parent says hi")]))
    fork = api.create_ok(project, fork_run_id=str(parent["id"]), fork_step=5)
    assert api.logs(fork["id"]).json() == {"lines": [], "next_after": None}
    assert lines_of(api.logs(parent["id"]).json()) == ["parent says hi"]


def test_a_forks_own_point_at_its_fork_step_belongs_to_the_parent_in_the_lineage(
    api: Api,
) -> None:
    project = unique_project()
    parent = api.create_ok(project)
    api.log(parent["id"], {"m": ramp(0, 10)})
    fork = api.create_ok(project, fork_run_id=str(parent["id"]), fork_step=5)
    api.log(fork["id"], {"m": ramp(5, 8, lambda s: -s)})  # it re-logs its fork step too
    own = api.one_series(fork["id"], "m")
    assert own.steps == [5, 6, 7, 8]
    stitched = api.one_series(fork["id"], "m", lineage=True)
    assert stitched.steps == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert stitched.values == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -6.0, -7.0, -8.0]
    assert stitched.owners == [parent["id"]] * 6 + [fork["id"]] * 3


# -- lineage -------------------------------------------------------------------------------


def test_lineage_lists_ancestors_with_fork_steps_and_descendants_in_pre_order(api: Api) -> None:
    project = unique_project()
    a, b, c = seed_lineage(api, project)
    d = api.create_ok(project, fork_run_id=str(a["id"]), fork_step=20)
    e = api.create_ok(project, fork_run_id=str(b["id"]), fork_step=60)

    resp = api.lineage(c["display_id"], project)
    assert resp.status_code == 200, resp.text
    up = resp.json()["ancestors"]
    assert [(x["id"], x["fork_step"], x["until_step"]) for x in up] == [
        (c["id"], 150, None),
        (b["id"], 50, 150),
        (a["id"], None, 50),
    ]
    assert [x["display_id"] for x in up] == [c["display_id"], b["display_id"], a["display_id"]]
    assert [x["name"] for x in up] == ["exp-c", "exp-b", "exp-a"]
    assert [n["id"] for n in resp.json()["descendants"]] == [c["id"]]

    down = api.lineage(a["id"]).json()
    assert [x["id"] for x in down["ancestors"]] == [a["id"]]
    nodes = [(n["id"], n["parent"], n["fork_step"], n["depth"]) for n in down["descendants"]]
    assert nodes == [
        (a["id"], None, None, 0),
        (b["id"], a["id"], 50, 1),
        (c["id"], b["id"], 150, 2),
        (e["id"], b["id"], 60, 2),
        (d["id"], a["id"], 20, 1),
    ]
    sub = api.lineage(b["id"]).json()["descendants"]
    assert [(n["id"], n["depth"]) for n in sub] == [(b["id"], 0), (c["id"], 1), (e["id"], 1)]
    assert_error(api.lineage(999_999_999), 404, "does not exist")


def test_a_deep_chain_resolves_in_one_request(api: Api) -> None:
    """Forks of forks, 40 deep: each fork at a step its own parent owns."""
    project = unique_project()
    root = api.create_ok(project)
    api.log(root["id"], {"x": ramp(0, 1)})
    chain: list[Any] = [root]
    for depth in range(1, 41):
        fork = api.create_ok(project, fork_run_id=str(chain[-1]["id"]), fork_step=depth)
        assert fork["forked_from"] == chain[-1]["id"]
        api.log(fork["id"], {"x": [(depth + 1, float(depth))]})
        chain.append(fork)
    # Step 1 belongs to the first fork's parent, the root: resolved from the bottom.
    bottom = chain[-1]
    assert (
        api.create_ok(project, fork_run_id=str(bottom["id"]), fork_step=1)["forked_from"]
        == root["id"]
    )
    assert (
        api.create_ok(project, fork_run_id=str(bottom["id"]), fork_step=20)["forked_from"]
        == chain[19]["id"]
    )
    up = api.lineage(bottom["id"]).json()["ancestors"]
    assert [x["id"] for x in up] == [r["id"] for r in reversed(chain)]
    steps = api.one_series(bottom["id"], "x", lineage=True).steps
    assert steps == list(range(0, 42))


def test_a_fork_does_not_inherit_system_metrics(api: Api) -> None:
    project = unique_project("sys")
    parent = api.create_ok(project)
    api.log(parent["id"], {"loss": ramp(0, 9), "sys/cpu_percent": ramp(0, 9)})
    fork = api.create_ok(project, fork_run_id=str(parent["id"]), fork_step=5)
    api.log(fork["id"], {"loss": ramp(6, 8), "sys/cpu_percent": ramp(6, 8)})
    stitched = {s.key: s.steps for s in api.metrics(fork["id"], lineage=True).series}
    assert stitched["loss"] == list(range(9))  # inherited 0-5, own 6-8
    assert stitched["sys/cpu_percent"] == [6, 7, 8]  # only the fork's own machines
    keys = api.keys(fork["id"], lineage="true").json()["keys"]
    assert "sys/cpu_percent" in keys and "loss" in keys
    parent_only = api.create_ok(project, fork_run_id=str(parent["id"]), fork_step=5)
    assert api.keys(parent_only["id"], lineage="true").json()["keys"] == ["loss"]


def test_repeats_of_a_step_at_the_same_time_keep_their_arrival_order(api: Api) -> None:
    """Blocks are read without ``ORDER BY`` and put in arrival order afterwards: the
    second chunk here starts at a lower step, so the index would read it first."""
    run = api.create_ok(unique_project("ties"))
    api.log(run["id"], {"x": [(10, 1.0)]}, time=100.0)
    api.log(run["id"], {"x": [(1, 0.0), (10, 2.0)]}, time=99.0)  # step 10 at 100.0 again
    api.log(run["id"], {"x": [(10, 3.0)]}, time=100.0)
    s = api.one_series(run["id"], "x")
    assert (s.steps, s.values, s.times) == ([1, 10, 10, 10], [0.0, 1.0, 2.0, 3.0],
                                            [99.0, 100.0, 100.0, 100.0])
    (mean,) = api.series(run["id"], "x", aggregate="mean")
    assert (mean.steps, mean.values) == ([1, 10], [0.0, 2.0])


def test_points_logged_out_of_order_come_back_sorted_by_step(api: Api) -> None:
    project = unique_project("unsorted")
    root = api.create_ok(project)
    api.log(root["id"], {"x": [(5, 5.0), (3, 3.0), (4, 4.0)]})
    api.log(root["id"], {"x": [(2, 2.0), (6, 6.0)]})
    fork = api.create_ok(project, fork_run_id=str(root["id"]), fork_step=4)
    api.log(fork["id"], {"x": [(8, 80.0), (7, 70.0), (4, 40.0)]})  # 4: hidden when stitched
    assert api.one_series(root["id"], "x").steps == [2, 3, 4, 5, 6]
    stitched = api.one_series(fork["id"], "x", lineage="true")
    assert (stitched.steps, stitched.values, stitched.owners) == (
        [2, 3, 4, 7, 8], [2.0, 3.0, 4.0, 70.0, 80.0], [root["id"]] * 3 + [fork["id"]] * 2)


def test_buckets_carry_the_wall_time_of_their_first_point(api: Api) -> None:
    run = api.create_ok(unique_project("times"))
    api.log(run["id"], {"t": ramp(0, 99)}, time=5000.0)  # point i at 5000 + i
    s = api.one_series(run["id"], "t", buckets=10)
    assert s.times == [5000.0 + first for first in s.steps]


def test_a_run_list_carries_the_last_value_of_the_metrics_asked_for(api: Api) -> None:
    project = unique_project("last")
    a = api.create_ok(project, run_id="a")
    b = api.create_ok(project, run_id="b")
    api.log(a["id"], {"loss": ramp(0, 9, lambda s: 10.0 - s), "acc": [(3, 0.5)]})
    api.log(a["id"], {"loss": [(9, 3.0)]}, writer=1)  # two ranks at the last step: the mean
    api.log(b["id"], {"loss": [(0, 7.0), (4, float("nan"))]})
    listed = api.request("GET", f"/projects/{project}/runs",
                         params={"metrics": ["loss", "acc", "absent"]}).json()["runs"]
    last = {run["run_id"]: run["last_values"] for run in listed}
    assert last == {"a": {"loss": 2.0, "acc": 0.5}, "b": {"loss": None}}
    plain = api.request("GET", f"/projects/{project}/runs").json()["runs"]
    assert all(run["last_values"] == {} for run in plain)


def test_a_nul_in_a_url_is_refused_and_a_log_cursor_past_every_id_is_an_empty_page(
    api: Api
) -> None:
    """Both were 500s on PostgreSQL (found by tests/test_fuzz_api.py)."""
    project = unique_project("nul")
    run = api.create_ok(project, run_id="r")
    api.ingest_ok(chunk(run["id"], {"loss": ramp(0, 2)}, logs=[(1, "hello")]))
    refused = api.request("GET", f"/projects/{project}/runs?metrics=%00loss")
    assert refused.status_code == 422 and "NUL" in refused.json()["detail"]
    far = api.request("GET", f"/runs/{run['id']}/logs", params={"after": 12674685999603})
    assert far.status_code == 200 and far.json() == {"lines": [], "next_after": None}
