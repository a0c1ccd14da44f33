"""Reading back what was logged: runs, metrics (own or stitched), lineage, logs.

    from pluto import query
    rows = query.get_metrics("MMP-3", project="mmp", keys=["loss"], lineage=True)
    for step, value, writer, run, time in rows["loss"]:
        ...

Connection settings come from ``PLUTO_URL`` and ``PLUTO_API_KEY`` unless a
``url``/``api_key`` is passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload

from pluto.settings import DEFAULT_URL
from pluto.transport.http import ApiClient
from pluto.wire import (
    Lineage,
    LogPage,
    LogRecord,
    MetricQueryResult,
    ProjectList,
    RunInfo,
    RunList,
)


class MetricRow(NamedTuple):
    step: int
    value: float
    writer: int | None  # None when averaged across writers
    run: int  # the run that owns this point in the lineage
    time: float


class MetricBucket(NamedTuple):
    step: int  # first step in the bucket
    last_step: int
    min: float
    max: float
    mean: float
    points: int  # how many points the bucket holds
    writer: int | None
    run: int


@dataclass
class LineageTree:
    id: int
    display_id: str
    name: str
    fork_step: int | None
    children: list[LineageTree] = field(default_factory=list)


@dataclass
class LineageView:
    """``ancestors``: the run, then its parent, up to the root; ``tree``: its descendants."""

    ancestors: list[tuple[int, str, int | None]]  # (id, display id, fork step)
    tree: LineageTree


def _client(url: str | None, api_key: str | None) -> ApiClient:
    return ApiClient(url or os.environ.get("PLUTO_URL", DEFAULT_URL),
                     api_key if api_key is not None else os.environ.get("PLUTO_API_KEY"))


def _params(project: str | None, **extra: Any) -> dict[str, Any]:
    params = {k: v for k, v in extra.items() if v is not None}
    project = project or os.environ.get("PLUTO_PROJECT")
    if project:
        params["project"] = project
    return params


def list_projects(*, url: str | None = None, api_key: str | None = None) -> list[str]:
    client = _client(url, api_key)
    try:
        return [p.name for p in client.call("GET", "/projects", ProjectList).projects]
    finally:
        client.close()


def list_runs(project: str, *, url: str | None = None, api_key: str | None = None
              ) -> list[RunInfo]:
    """Every run of ``project``, newest first (the server answers a page at a time)."""
    client = _client(url, api_key)
    found: list[RunInfo] = []
    cursor: str | None = None
    try:
        while True:
            page = client.call("GET", f"/projects/{project}/runs", RunList,
                               params={"cursor": cursor} if cursor is not None else None)
            found.extend(page.runs)
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor
    finally:
        client.close()


def get_run(run: str | int, project: str | None = None, *, url: str | None = None,
            api_key: str | None = None) -> RunInfo:
    """A run by numeric id, display id (``MMP-42``) or external id."""
    client = _client(url, api_key)
    try:
        return client.call("GET", f"/runs/{run}", RunInfo, params=_params(project))
    finally:
        client.close()


@overload
def get_metrics(
    run: str | int, keys: list[str] | str | None = ..., lineage: bool = ...,
    writer: int | None = ..., buckets: None = ..., *, aggregate: Literal["none", "mean"] = ...,
    step_min: int | None = ..., step_max: int | None = ..., project: str | None = ...,
    url: str | None = ..., api_key: str | None = ...,
) -> dict[str, list[MetricRow]]: ...


@overload
def get_metrics(
    run: str | int, keys: list[str] | str | None = ..., lineage: bool = ...,
    writer: int | None = ..., *, buckets: int, aggregate: Literal["none", "mean"] = ...,
    step_min: int | None = ..., step_max: int | None = ..., project: str | None = ...,
    url: str | None = ..., api_key: str | None = ...,
) -> dict[str, list[MetricBucket]]: ...


@overload
def get_metrics(
    run: str | int, keys: list[str] | str | None, lineage: bool, writer: int | None,
    buckets: int, *, aggregate: Literal["none", "mean"] = ...,
    step_min: int | None = ..., step_max: int | None = ..., project: str | None = ...,
    url: str | None = ..., api_key: str | None = ...,
) -> dict[str, list[MetricBucket]]: ...


def get_metrics(
    run: str | int,
    keys: list[str] | str | None = None,
    lineage: bool = False,
    writer: int | None = None,
    buckets: int | None = None,
    *,
    aggregate: Literal["none", "mean"] = "none",
    step_min: int | None = None,
    step_max: int | None = None,
    project: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> dict[str, list[MetricRow]] | dict[str, list[MetricBucket]]:
    """Points per key: the run's own, or with ``lineage=True`` its stitched lineage
    (each ancestor's points up to the fork step, then the run's). Several writers'
    points at one step are all returned unless ``aggregate="mean"``. With
    ``buckets=N``, each series is downsampled to about N min/max/mean buckets."""
    client = _client(url, api_key)
    params = _params(project, lineage=str(lineage).lower(), writer=writer, buckets=buckets,
                     aggregate=aggregate, step_min=step_min, step_max=step_max)
    if keys is not None:
        params["keys"] = [keys] if isinstance(keys, str) else list(keys)
    try:
        result = client.call("GET", f"/runs/{run}/metrics", MetricQueryResult, params=params,
                             msgpack_reply=True)
    finally:
        client.close()
    if buckets is None:
        rows: dict[str, list[MetricRow]] = {}
        for series in result.series:
            rows.setdefault(series.key, []).extend(
                MetricRow(step, value, series.writer, owner, at)
                for step, value, owner, at in zip(series.steps, series.values, series.owners,
                                                  series.times, strict=True)
            )
        return rows
    bucketed: dict[str, list[MetricBucket]] = {}
    for series in result.series:
        bucketed.setdefault(series.key, []).extend(
            MetricBucket(step, last, low, high, mean, count, series.writer, owner)
            for step, last, low, high, mean, count, owner in zip(
                series.steps, series.last_steps, series.mins, series.maxs, series.means,
                series.counts, series.owners, strict=True)
        )
    return bucketed


def get_lineage(run: str | int, project: str | None = None, *, url: str | None = None,
                api_key: str | None = None) -> LineageView:
    client = _client(url, api_key)
    try:
        lineage = client.call("GET", f"/runs/{run}/lineage", Lineage, params=_params(project))
    finally:
        client.close()
    nodes = {n.id: LineageTree(n.id, n.display_id, n.name, n.fork_step)
             for n in lineage.descendants}
    root: LineageTree | None = None
    for node in lineage.descendants:  # pre-order: parents come before children
        if node.depth == 0 or node.parent not in nodes:
            root = root or nodes[node.id]
        else:
            nodes[node.parent].children.append(nodes[node.id])
    assert root is not None
    return LineageView(
        ancestors=[(a.id, a.display_id, a.fork_step) for a in lineage.ancestors], tree=root,
    )


def get_logs(run: str | int, project: str | None = None, *, writer: int | None = None,
             contains: str | None = None, url: str | None = None,
             api_key: str | None = None) -> list[LogRecord]:
    client = _client(url, api_key)
    lines: list[LogRecord] = []
    after: int | None = None
    try:
        while True:
            page = client.call("GET", f"/runs/{run}/logs", LogPage,
                               params=_params(project, after=after, writer=writer, q=contains,
                                              limit=10_000))
            lines.extend(page.lines)
            if page.next_after is None:
                return lines
            after = page.next_after
    finally:
        client.close()
