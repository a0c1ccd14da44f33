"""Lineage resolution and stitching, checked against a brute-force model.

Random fork trees are built on a real ``pluto server`` over HTTP (SQLite and
PostgreSQL, via ``shared_server``; each example in a project of its own). A
pure-Python model predicts, from the definitions in ARCHITECTURE.md ("The run
model") alone, what the server must answer:

* Ownership: walking from a run R up to the root, each run owns the steps in
  ``(its own fork_step, its child's fork_step]`` (R: up to infinity; the root:
  from minus infinity). The model finds the owner of a step by testing every
  segment of the chain, not by the server's walk-up query.
* A fork records as parent the ancestor of the requested run that owns the
  fork step; it is allowed only when the step lies in the requested run's
  logged range ``[first step logged by the lineage root, max(own last logged
  step, own fork_step)]``, else 422.
* The stitched series of R is every chain member's own points inside its
  segment, labelled with that member; points a fork logged at or before its
  own fork step stay in its own-points query but are hidden when stitched.

A deterministic 600-deep chain checks that none of this degrades with depth.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from support.server_process import ServerProcess

from pluto.wire import (
    API_PREFIX,
    MSGPACK,
    Chunk,
    IngestBatch,
    IngestResult,
    MetricQueryResult,
    encode_msgpack,
)

KEYS = ("loss", "acc")

# A point as the model and the server's answers are compared: (key, step, value, writer, owner).
Row = tuple[str, int, float, int, int]


# ---------------------------------------------------------------------------
# The brute-force model


class Rejected(Exception):
    """The model says the server must refuse this fork with a 422."""


@dataclass(frozen=True)
class Point:
    key: str
    step: int
    value: float
    writer: int


@dataclass
class ModelRun:
    index: int
    parent: int | None  # resolved parent (model index)
    fork_step: int | None
    points: list[Point] = field(default_factory=list)


class Model:
    """Runs, forks and points, with every answer derived from the definitions."""

    def __init__(self) -> None:
        self.runs: dict[int, ModelRun] = {}

    # -- structure -----------------------------------------------------------

    def chain(self, index: int) -> list[ModelRun]:
        """The run itself, then its parent, ..., the root."""
        out = [self.runs[index]]
        while out[-1].parent is not None:
            out.append(self.runs[out[-1].parent])
            assert len(out) <= len(self.runs), "cycle in the model"
        return out

    def segments(self, index: int) -> list[tuple[ModelRun, int | None, int | None]]:
        """Each chain member with the steps it owns: (member, lower excl., upper incl.),
        None meaning unbounded (exact ints throughout: steps may exceed 2**53)."""
        chain = self.chain(index)
        return [
            (run, run.fork_step, None if depth == 0 else chain[depth - 1].fork_step)
            for depth, run in enumerate(chain)
        ]

    @staticmethod
    def in_segment(step: int, lower: int | None, upper: int | None) -> bool:
        return (lower is None or lower < step) and (upper is None or step <= upper)

    def owner_of(self, index: int, step: int) -> int:
        """The chain member whose segment holds ``step`` (by testing every segment)."""
        owners = [run.index for run, lower, upper in self.segments(index)
                  if self.in_segment(step, lower, upper)]
        # Fork steps strictly decrease going up, so the segments partition the integers.
        assert len(owners) == 1, f"model invariant broken: step {step} owned by {owners}"
        return owners[0]

    def fork_range(self, index: int) -> tuple[int, int] | None:
        """Steps at which ``index`` may be forked, or None when it cannot be forked at all."""
        run = self.runs[index]
        root = self.chain(index)[-1]
        if not root.points:
            return None
        first = min(p.step for p in root.points)
        last_candidates = [p.step for p in run.points]
        if run.fork_step is not None:
            last_candidates.append(run.fork_step)
        return first, max(last_candidates)

    # -- operations ----------------------------------------------------------

    def create(self, index: int, fork_of: int | None, fork_step: int | None) -> ModelRun:
        assert index not in self.runs
        if fork_of is None:
            run = ModelRun(index, None, None)
        else:
            assert fork_step is not None
            allowed = self.fork_range(fork_of)
            if allowed is None or not allowed[0] <= fork_step <= allowed[1]:
                raise Rejected(f"fork of {fork_of} at {fork_step} outside {allowed}")
            run = ModelRun(index, self.owner_of(fork_of, fork_step), fork_step)
        self.runs[index] = run
        return run

    def log(self, index: int, points: Sequence[Point]) -> None:
        self.runs[index].points.extend(points)

    # -- answers -------------------------------------------------------------

    def own_rows(self, index: int) -> list[tuple[Point, int]]:
        return [(p, index) for p in self.runs[index].points]

    def stitched_rows(self, index: int) -> list[tuple[Point, int]]:
        return [
            (p, run.index)
            for run, lower, upper in self.segments(index)
            for p in run.points
            if self.in_segment(p.step, lower, upper)
        ]

    def ancestors(self, index: int) -> list[tuple[int, int | None, int | None]]:
        """(run, fork_step, until_step) from the run up to the root."""
        chain = self.chain(index)
        return [
            (run.index, run.fork_step, None if depth == 0 else chain[depth - 1].fork_step)
            for depth, run in enumerate(chain)
        ]

    def descendants(self, index: int) -> list[tuple[int, int | None, int | None, int]]:
        """(run, parent, fork_step, depth) in pre-order, children by creation order.

        The run itself comes first at depth 0, with its own fork parent (outside the tree).
        """
        out: list[tuple[int, int | None, int | None, int]] = []

        def visit(i: int, depth: int) -> None:
            run = self.runs[i]
            out.append((i, run.parent, run.fork_step, depth))
            for child in sorted(j for j, r in self.runs.items() if r.parent == i):
                visit(child, depth + 1)

        visit(index, 0)
        return out


# ---------------------------------------------------------------------------
# Programs: what a random example does, in order


@dataclass(frozen=True)
class CreateOp:
    run: int
    fork_of: int | None = None
    fork_step: int | None = None


@dataclass(frozen=True)
class ChunkSpec:
    run: int
    writer: int
    points: tuple[tuple[str, int], ...]  # (key, step); values are assigned when run
    seq: int = 0


@dataclass(frozen=True)
class LogOp:
    chunks: tuple[ChunkSpec, ...]


Op = CreateOp | LogOp


def _interesting_steps(model: Model, index: int, lo: int, hi: int) -> list[int]:
    """Range ends and every chain fork step with its neighbours: where ownership flips."""
    steps = {lo, hi}
    for run in model.chain(index):
        if run.fork_step is not None:
            steps.update({run.fork_step - 1, run.fork_step, run.fork_step + 1})
    return sorted(s for s in steps if lo <= s <= hi)


@st.composite
def programs(draw: st.DrawFn) -> list[Op]:
    """A random fork tree: runs created in order, each a root or a fork of an earlier
    one. Each run has one or two writers; each writer's points go in one or two chunks,
    each sent right away or later (so forks see a parent's points arrive after the fork).
    Sometimes a fork step is out of range (expect 422). Steps sit near 0, or past 2**31
    or 2**53 (64-bit steps must survive SQL, JSON and numpy exactly)."""
    model = Model()
    ops: list[Op] = []
    pending: list[ChunkSpec] = []
    offset = draw(st.sampled_from([0, 2**31 - 8, 2**53 + 1]))
    n_runs = draw(st.integers(1, 12))
    for index in range(n_runs):
        created = list(model.runs)
        fork_of: int | None = None
        fork_step: int | None = None
        # Rare choices sit mid-range: Hypothesis favours the ends of an integer range.
        if created and draw(st.integers(0, 9)) != 4:  # mostly forks
            # Half the time the newest run, so chains grow deep.
            fork_of = created[-1] if draw(st.booleans()) else draw(st.sampled_from(created))
            allowed = model.fork_range(fork_of)
            if allowed is None:
                fork_step = draw(st.integers(0, 20))
            else:
                lo, hi = allowed
                own = model.runs[fork_of].fork_step
                # Anywhere in range; where ownership flips; or in the run's own segment
                # (which keeps the fork on the requested run, so chains grow deep).
                inside = st.one_of(
                    st.integers(lo, hi),
                    st.sampled_from(_interesting_steps(model, fork_of, lo, hi)),
                    st.integers(lo if own is None else min(own + 1, hi), hi),
                )
                outside = st.sampled_from(
                    sorted({s for s in (lo - 2, lo - 1, hi + 1, hi + 3) if s >= 0})
                    or [hi + 1]
                )
                fork_step = draw(outside if draw(st.integers(0, 9)) == 4 else inside)
        ops.append(CreateOp(index, fork_of, fork_step))
        try:
            run = model.create(index, fork_of, fork_step)
        except Rejected:
            continue
        base = run.fork_step if run.fork_step is not None else offset + draw(st.integers(0, 10))
        writers = draw(st.sampled_from([(0,), (0,), (1,), (0, 1)]))
        now: list[ChunkSpec] = []
        for writer in writers:
            points = draw(st.lists(
                st.tuples(st.sampled_from(KEYS), st.integers(max(0, base - 5), base + 20)),
                min_size=0 if draw(st.integers(0, 5)) == 3 else 1,  # sometimes none at all
                max_size=10,
            ))
            cut = draw(st.integers(0, len(points)))  # a cut at either end: one chunk
            parts = [points[:cut], points[cut:]] if 0 < cut < len(points) else [points]
            for seq, part in enumerate(parts):
                spec = ChunkSpec(index, writer, tuple(part), seq)
                if draw(st.integers(0, 4)) == 2:  # 1 in 5 comes later
                    pending.append(spec)
                else:
                    now.append(spec)
                    model.log(index, [Point(k, s, 0.0, writer) for k, s in part])
        if now:
            ops.append(LogOp(tuple(now)))
        deliver: bool = bool(pending) and draw(st.booleans())
        if deliver:  # deliver some earlier, deferred chunks
            late = draw(st.lists(st.sampled_from(pending), unique=True, min_size=1))
            pending = [c for c in pending if c not in late]
            ops.append(LogOp(tuple(late)))
            for spec in late:
                model.log(spec.run, [Point(k, s, 0.0, spec.writer) for k, s in spec.points])
    if pending:
        ops.append(LogOp(tuple(pending)))
    return ops


# ---------------------------------------------------------------------------
# Talking to the server


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_server.url + API_PREFIX, timeout=120.0) as http:
        yield http


def new_project(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def create_run(
    http: httpx.Client, project: str, name: str, fork_of: int | None, fork_step: int | None
) -> httpx.Response:
    body: dict[str, Any] = {"project": project, "run_id": name}
    if fork_of is not None:
        body["fork_run_id"] = str(fork_of)
        body["fork_step"] = fork_step
    return http.post("/runs", json=body)


def ingest(http: httpx.Client, chunks: list[Chunk]) -> None:
    resp = http.post(
        "/ingest",
        content=encode_msgpack(IngestBatch(chunks=chunks)),
        headers={"content-type": MSGPACK, "accept": MSGPACK},
    )
    assert resp.status_code == 200, resp.text
    result = msgspec.msgpack.decode(resp.content, type=IngestResult)
    assert (result.applied, result.duplicates) == (len(chunks), 0)
    assert result.points == sum(c.point_count for c in chunks)


def make_chunk(
    run_id: int, writer: int, points: Sequence[Point], session: str, seq: int = 0
) -> Chunk:
    key_list = sorted({p.key for p in points})
    return Chunk(
        run=run_id,
        session=session,
        seq=seq,
        writer=writer,
        keys=key_list,
        key_index=[key_list.index(p.key) for p in points],
        steps=[p.step for p in points],
        values=[p.value for p in points],
        times=[1_700_000_000.0 + p.value for p in points],
    )


def query_rows(http: httpx.Client, run_id: int, *, lineage: bool) -> list[Row]:
    """Every point of the answer as (key, step, value, writer, owner); each series
    must be non-empty, distinct by (key, writer), and in step order."""
    resp = http.get(
        f"/runs/{run_id}/metrics",
        params={"keys": list(KEYS), "lineage": "true" if lineage else "false"},
        headers={"accept": MSGPACK},
    )
    assert resp.status_code == 200, resp.text
    result = msgspec.msgpack.decode(resp.content, type=MetricQueryResult)
    assert result.run == run_id and result.lineage is lineage
    seen: set[tuple[str, int | None]] = set()
    rows: list[Row] = []
    for series in result.series:
        assert series.writer is not None, "an unaggregated series names its writer"
        assert (series.key, series.writer) not in seen, f"series {series.key}/{series.writer} twice"
        seen.add((series.key, series.writer))
        n = len(series.steps)
        assert n > 0 and len(series.values) == n and len(series.owners) == n
        assert series.steps == sorted(series.steps), f"{series.key}/{series.writer} out of order"
        rows.extend(
            (series.key, step, value, series.writer, owner)
            for step, value, owner in zip(series.steps, series.values, series.owners, strict=True)
        )
    return rows


def expected_rows(pairs: list[tuple[Point, int]], ids: dict[int, int]) -> list[Row]:
    return [(p.key, p.step, p.value, p.writer, ids[owner]) for p, owner in pairs]


def assert_same_rows(got: list[Row], want: list[Row], what: str) -> None:
    if Counter(got) != Counter(want):
        missing = sorted((Counter(want) - Counter(got)).elements())
        extra = sorted((Counter(got) - Counter(want)).elements())
        pytest.fail(f"{what}: missing {missing[:20]}, unexpected {extra[:20]}")


def lineage_of(http: httpx.Client, run_id: int) -> dict[str, Any]:
    resp = http.get(f"/runs/{run_id}/lineage")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def check_run(http: httpx.Client, model: Model, ids: dict[int, int], index: int) -> None:
    run_id = ids[index]
    assert_same_rows(query_rows(http, run_id, lineage=True),
                     expected_rows(model.stitched_rows(index), ids),
                     f"stitched points of run #{index}")
    assert_same_rows(query_rows(http, run_id, lineage=False),
                     expected_rows(model.own_rows(index), ids),
                     f"own points of run #{index}")
    body = lineage_of(http, run_id)
    got_up = [(a["id"], a["fork_step"], a["until_step"]) for a in body["ancestors"]]
    want_up = [(ids[i], fs, until) for i, fs, until in model.ancestors(index)]
    assert got_up == want_up, f"ancestors of run #{index}"
    got_down = [(d["id"], d["parent"], d["fork_step"], d["depth"]) for d in body["descendants"]]
    want_down = [
        (ids[i], None if parent is None else ids[parent], fs, depth)
        for i, parent, fs, depth in model.descendants(index)
    ]
    assert got_down == want_down, f"descendants of run #{index}"


# ---------------------------------------------------------------------------
# Random fork trees

# The seed example of the spec: A logs 0-100; B forks A at 50 and logs 51-200; C forks B at
# 150. Forking C at 75 resolves to B, at 30 to A.
SEED_PROGRAM: list[Op] = [
    CreateOp(0),
    LogOp((ChunkSpec(0, 0, tuple(("loss", s) for s in range(0, 101))),)),
    CreateOp(1, 0, 50),
    LogOp((ChunkSpec(1, 0, tuple(("loss", s) for s in range(51, 201))),)),
    CreateOp(2, 1, 150),
    CreateOp(3, 2, 75),
    CreateOp(4, 2, 30),
]


def test_the_model_agrees_with_the_seed_example() -> None:
    model = Model()
    for op in SEED_PROGRAM:
        if isinstance(op, CreateOp):
            model.create(op.run, op.fork_of, op.fork_step)
        else:
            for spec in op.chunks:
                model.log(spec.run, [Point(k, s, 0.0, spec.writer) for k, s in spec.points])
    assert [model.runs[i].parent for i in range(5)] == [None, 0, 1, 1, 0]
    assert model.fork_range(2) == (0, 150)
    with pytest.raises(Rejected):
        model.create(5, 2, 151)
    stitched = model.stitched_rows(2)
    assert [(p.step, owner) for p, owner in stitched] == [
        *((s, 1) for s in range(51, 151)), *((s, 0) for s in range(0, 51))
    ]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=programs())
@example(program=SEED_PROGRAM)
def test_random_fork_trees_match_the_model(client: httpx.Client, program: list[Op]) -> None:
    project = new_project("lineage-prop")
    model = Model()
    ids: dict[int, int] = {}
    values = itertools.count(1)
    for op in program:
        if isinstance(op, CreateOp):
            parent_id = None if op.fork_of is None else ids[op.fork_of]
            resp = create_run(client, project, f"run-{op.run}", parent_id, op.fork_step)
            try:
                run = model.create(op.run, op.fork_of, op.fork_step)
            except Rejected as why:
                event("fork refused (422)")
                assert resp.status_code == 422, f"model: {why}; server: {resp.text}"
                continue
            assert resp.status_code == 201, resp.text
            if op.fork_of is not None:
                event("fork resolved " + ("up the chain" if run.parent != op.fork_of
                                          else "to the requested run"))
            info = resp.json()
            ids[op.run] = info["id"]
            want_parent = None if run.parent is None else ids[run.parent]
            assert (info["forked_from"], info["fork_step"]) == (want_parent, op.fork_step), (
                f"run #{op.run}: fork of #{op.fork_of} at {op.fork_step} should resolve to "
                f"#{run.parent}"
            )
        else:
            chunks = []
            for spec in op.chunks:
                points = [Point(k, s, float(next(values)), spec.writer) for k, s in spec.points]
                model.log(spec.run, points)
                chunks.append(make_chunk(ids[spec.run], spec.writer, points,
                                         f"s{spec.run}-w{spec.writer}", spec.seq))
            ingest(client, chunks)
    for index in model.runs:
        event(f"depth {len(model.chain(index)) - 1}")
        if len(model.stitched_rows(index)) < len(model.own_rows(index)) + sum(
            len(r.points) for r in model.chain(index)[1:]
        ):
            event("points hidden by the stitch")
        check_run(client, model, ids, index)


# ---------------------------------------------------------------------------
# A deep chain

DEPTH = 600


def test_deep_chain_resolves_and_stitches(client: httpx.Client) -> None:
    """R0 logs steps 0-2; R_k forks R_{k-1} at 2k and logs 2k (hidden), 2k+1 and 2k+2."""
    project = new_project("lineage-deep")
    model = Model()
    ids: dict[int, int] = {}
    for k in range(DEPTH + 1):
        fork_of, fork_step = (None, None) if k == 0 else (k - 1, 2 * k)
        resp = create_run(client, project, f"chain-{k}",
                          None if fork_of is None else ids[fork_of], fork_step)
        assert resp.status_code == 201, resp.text
        run = model.create(k, fork_of, fork_step)
        info = resp.json()
        ids[k] = info["id"]
        assert info["forked_from"] == (None if run.parent is None else ids[run.parent])
        assert run.parent == fork_of
        steps = [0, 1, 2] if k == 0 else [2 * k, 2 * k + 1, 2 * k + 2]
        points = [Point("loss", s, float(10 * k + j), j % 2) for j, s in enumerate(steps)]
        model.log(k, points)
        ingest(client, [make_chunk(ids[k], w, [p for p in points if p.writer == w], f"c{k}-{w}")
                        for w in (0, 1)])
    deepest = ids[DEPTH]

    # Stitched: every one of the 601 segments, labelled with its owner; hidden points gone.
    stitched = query_rows(client, deepest, lineage=True)
    assert len(stitched) == 3 + 2 * DEPTH
    assert_same_rows(stitched, expected_rows(model.stitched_rows(DEPTH), ids), "deep stitched")
    by_step = {step: owner for _, step, _, _, owner in stitched}
    assert sorted(by_step) == list(range(2 * DEPTH + 3))
    assert all(by_step[s] == ids[0] for s in (0, 1, 2))
    assert all(by_step[s] == ids[(s - 1) // 2] for s in range(3, 2 * DEPTH + 3))
    assert len(set(by_step.values())) == DEPTH + 1
    assert_same_rows(query_rows(client, deepest, lineage=False),
                     expected_rows(model.own_rows(DEPTH), ids), "deep own points")

    # The lineage endpoint: 601 ancestors with their fork steps, the root last.
    body = lineage_of(client, deepest)
    assert len(body["ancestors"]) == DEPTH + 1
    assert [(a["id"], a["fork_step"], a["until_step"]) for a in body["ancestors"]] == [
        (ids[i], fs, until) for i, fs, until in model.ancestors(DEPTH)
    ]
    root_tree = lineage_of(client, ids[0])["descendants"]
    assert [(d["id"], d["depth"]) for d in root_tree] == [(ids[k], k) for k in range(DEPTH + 1)]

    # Forking the deepest run resolves, in one request each, to the run owning the step.
    probes = [0, 1, 2, 3, 4, 5, 2 * 300, 2 * 300 + 1, 2 * DEPTH - 1, 2 * DEPTH, 2 * DEPTH + 1,
              2 * DEPTH + 2]
    for n, step in enumerate(probes):
        resp = create_run(client, project, f"probe-{n}", deepest, step)
        assert resp.status_code == 201, resp.text
        owner = model.create(DEPTH + 1 + n, DEPTH, step).parent
        assert owner is not None
        assert resp.json()["forked_from"] == ids[owner], f"fork of the deepest at {step}"
        assert owner == (0 if step <= 2 else (step - 1) // 2)
    for step in (2 * DEPTH + 3, 10**6):
        resp = create_run(client, project, f"probe-out-{step}", deepest, step)
        assert resp.status_code == 422, resp.text
