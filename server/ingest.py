"""Ingest: apply each chunk exactly once, stored as one columnar block per key.

The chunk's ``(run, session, seq)`` row in ``ingest_log`` is inserted in the
same transaction as its points. A retried chunk finds its row already there and
is skipped; a chunk whose first attempt rolled back is applied by the retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.wire import (
    LOG_STREAMS,
    MAX_KEY_LENGTH,
    MAX_WRITER,
    STDERR,
    STDOUT,
    SYSTEM_PREFIX,
    ChunkHeader,
    IngestResult,
    RunStatus,
)
from pluto_server.columns import Array, Points, points
from pluto_server.errors import BadRequest, NotFound, Unprocessable
from pluto_server.runs import find_run
from pluto_server.runs import finish as finish_run
from pluto_server.schema import (
    ingest_log,
    log_lines,
    metric_blocks,
    metric_keys,
    projects,
    run_keys,
    runs,
)
from pluto_server.sql import insert_ignore

MAX_LOG_LINE = 64 * 1024
MAX_SESSION_LENGTH = 64
INT32_MAX = 2**31 - 1  # run ids and writers are 32-bit columns
INT64_MAX = 2**63 - 1  # steps and sequence numbers are 64-bit


class KeyCache:
    """(project, key) -> key id. Ids never change once committed, so they are
    remembered across requests; ids seen in a transaction join only after it commits."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    def get(self, project_id: int, key: str) -> int | None:
        return self._ids.get((project_id, key))

    def remember(self, entries: dict[tuple[int, str], int]) -> None:
        with self._lock:
            self._ids.update(entries)


def chunk_name(position: int, chunk: ChunkHeader) -> str:
    """How an error names a chunk: its place in the batch and its idempotency key."""
    return f"chunk {position} (run {chunk.run}, session {chunk.session!r}, seq {chunk.seq})"


def validate(chunks: Sequence[ChunkHeader]) -> list[Points]:
    """Reject a malformed batch whole, before anything is written; its chunks' points.

    The per-point checks (every step in range, every key index naming a key) are made
    by ``columns`` as it groups a chunk's points by key in ``apply``: looking at each of
    a million points once more here cost as much as storing them. A bad point there
    rolls the whole batch back, so nothing of it is applied either way.
    """
    columns_of: list[Points] = []
    for position, chunk in enumerate(chunks):
        where = chunk_name(position, chunk)
        chunk_points = points(chunk, f"$.chunks[{position}]")
        columns_of.append(chunk_points)
        n = len(chunk_points.steps)
        for name in ("key_index", "values", "times"):
            length = len(getattr(chunk_points, name))
            if length != n:
                raise Unprocessable(
                    f"{where}: {name} has {length} entries but steps has {n}; "
                    "every point needs a key index, step, value and time"
                )
        if chunk.run == 0:
            if not chunk.project or not chunk.run_ref:
                raise Unprocessable(f"{where}: name the run: a numeric run id, or run 0 with "
                                    "project and run_ref (its external id)")
        elif not 1 <= chunk.run <= INT32_MAX:
            raise NotFound(f"run {chunk.run} does not exist; create it with POST /api/v1/runs "
                           "before logging")
        if not chunk.session or len(chunk.session) > MAX_SESSION_LENGTH:
            raise Unprocessable(f"{where}: session must be 1-{MAX_SESSION_LENGTH} characters")
        # PostgreSQL cannot store a NUL in text (it raised, the sender got a 500 and retried
        # for ever); one backend refusing it refuses it on all, with what to change.
        for name in ("session", "project", "run_ref"):
            if "\x00" in (getattr(chunk, name) or ""):
                raise Unprocessable(f"{where}: {name} holds a NUL character: remove it")
        if not 0 <= chunk.seq <= INT64_MAX:
            raise Unprocessable(f"{where}: seq must be between 0 and 2**63-1")
        if not 0 <= chunk.writer <= MAX_WRITER:
            raise Unprocessable(f"{where}: writer (the rank) must be between 0 and 2**31-1")
        for key in chunk.keys:
            if not key or len(key) > MAX_KEY_LENGTH:
                raise Unprocessable(f"{where}: metric key {key[:40]!r} must be 1-256 characters")
            if "\x00" in key:
                raise Unprocessable(f"{where}: metric key {key[:40]!r} holds a NUL character; "
                                    "a key cannot hold one")
        if chunk.finish is RunStatus.RUNNING:
            raise Unprocessable(f"{where}: finish must be COMPLETED, FAILED or TERMINATED")
        for number, line in enumerate(chunk.logs):
            if line.stream not in LOG_STREAMS:
                # PostgreSQL's 32-bit column refused a big one with a 500; SQLite kept anything.
                raise Unprocessable(
                    f"{where}: log line {number} has stream {line.stream}: use {STDOUT} "
                    f"(stdout) or {STDERR} (stderr)"
                )
            if len(line.line) > MAX_LOG_LINE:
                raise Unprocessable(f"{where}: a log line is longer than {MAX_LOG_LINE} characters")
            if "\x00" in line.line:
                # A program may print a NUL: console text is kept, the NUL shown as U+FFFD
                # (refusing the chunk would lose the points that travel with it).
                line.line = line.line.replace("\x00", "\ufffd")
    return columns_of


def resolve_run_refs(conn: Connection, chunks: Sequence[ChunkHeader]) -> None:
    """Give chunks addressed by (project, run_ref) their numeric run id: the run with that
    external id in that project, else (a run resumed by another of its names) the run that
    ref names there as ``POST /runs`` with ``resume`` would find it."""
    refs = sorted({(c.project or "", c.run_ref or "") for c in chunks if c.run == 0})
    found: dict[tuple[str, str], int] = {}
    for project, ref in refs:
        run_id = conn.execute(
            sa.select(runs.c.id)
            .join(projects, projects.c.id == runs.c.project_id)
            .where(projects.c.name == project, runs.c.external_id == ref)
        ).scalar()
        if run_id is None:
            try:
                run_id = find_run(conn, ref, project, reveal_projects=False).id
            except (NotFound, BadRequest):
                raise NotFound(f"run {ref!r} does not exist in project {project!r}; open it "
                               "with POST /api/v1/runs before logging to it") from None
        found[(project, ref)] = int(run_id)
    for chunk in chunks:
        if chunk.run == 0:
            chunk.run = found[(chunk.project or "", chunk.run_ref or "")]


def run_projects(conn: Connection, chunks: Sequence[ChunkHeader]) -> dict[int, int]:
    """The project of every run the batch writes to; 404 for a run that does not exist."""
    resolve_run_refs(conn, chunks)
    run_ids = sorted({chunk.run for chunk in chunks})
    projects_of = {
        int(run): int(project)
        for run, project in conn.execute(
            sa.select(runs.c.id, runs.c.project_id).where(runs.c.id.in_(run_ids))
        )
    }
    missing = [run for run in run_ids if run not in projects_of]
    if missing:
        raise NotFound(
            f"run {missing[0]} does not exist; create it with POST /api/v1/runs before logging"
        )
    return projects_of


def unknown_keys(chunks: Sequence[ChunkHeader], columns_of: Sequence[Points],
                 projects_of: dict[int, int], cache: KeyCache) -> list[tuple[int, str]]:
    wanted = {(projects_of[chunk.run], key)
              for chunk, chunk_points in zip(chunks, columns_of, strict=True)
              if len(chunk_points) for key in chunk.keys}
    return sorted(pair for pair in wanted if cache.get(*pair) is None)


def ensure_keys(conn: Connection, pairs: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """Create metric keys, in sorted order, in a transaction of their own.

    One fixed order and a short transaction mean concurrent batches that meet the
    same new keys wait for each other briefly instead of deadlocking; a key whose
    data transaction later fails is harmless.
    """
    ids: dict[tuple[int, str], int] = {}
    for project_id in sorted({project for project, _ in pairs}):
        names = [name for project, name in pairs if project == project_id]
        conn.execute(
            insert_ignore(conn, metric_keys, ["project_id", "key"]),
            [{"project_id": project_id, "key": name} for name in names],
        )
        rows = conn.execute(
            sa.select(metric_keys.c.key, metric_keys.c.id).where(
                metric_keys.c.project_id == project_id, metric_keys.c.key.in_(names)
            )
        )
        ids.update({(project_id, str(name)): int(key_id) for name, key_id in rows})
    return ids


def apply(conn: Connection, chunks: Sequence[ChunkHeader], columns_of: Sequence[Points],
          projects_of: dict[int, int], keys: KeyCache) -> IngestResult:
    """Apply a validated batch (``columns_of``: its chunks' points, from ``validate``) in
    the caller's transaction; its keys already exist."""
    applied = duplicates = total = 0
    now = time.time()
    # A fixed order keeps concurrent PostgreSQL transactions from deadlocking.
    for position, chunk in sorted(enumerate(chunks),
                                  key=lambda item: (item[1].run, item[1].session, item[1].seq)):
        fresh = conn.execute(
            insert_ignore(conn, ingest_log, ["run_id", "session", "seq"])
            .values(run_id=chunk.run, session=chunk.session, seq=chunk.seq, applied_at=now)
            .returning(ingest_log.c.seq)
        ).first()
        if fresh is None:
            duplicates += 1
            continue
        applied += 1
        chunk_points = columns_of[position]
        total += len(chunk_points)
        if len(chunk_points):
            project_id = projects_of[chunk.run]
            key_ids = []
            for name in chunk.keys:
                key_id = keys.get(project_id, name)
                assert key_id is not None, "ensure_keys() runs before apply()"
                key_ids.append(key_id)
            _insert_blocks(conn, chunk, chunk_points, key_ids, chunk_name(position, chunk))
        if chunk.logs:
            conn.execute(
                sa.insert(log_lines),
                [
                    {"run_id": chunk.run, "writer": chunk.writer, "time": line.time,
                     "stream": line.stream, "line": line.line}
                    for line in chunk.logs
                ],
            )
        if chunk.finish is not None:
            finish_run(conn, chunk.run, chunk.finish)
    return IngestResult(applied=applied, duplicates=duplicates, points=total)


def columns(chunk: ChunkHeader, chunk_points: Points,
            where: str) -> list[tuple[int, Array, Array, Array]]:
    """A chunk's points as ``(key index, steps, values, times)`` per key, each column a
    contiguous little-endian array, in the order the points came; ``Unprocessable`` for a
    step out of range or a key index that names no key.
    """
    n_keys = len(chunk.keys)
    steps, key_index = chunk_points.steps, chunk_points.key_index
    values, times = chunk_points.values, chunk_points.times
    if len(steps) and steps.min() < 0:
        raise Unprocessable(f"{where}: steps must be between 0 and 2**63-1")
    if len(key_index) and (key_index.min() < 0 or key_index.max() >= n_keys):
        raise Unprocessable(f"{where}: key_index refers to a key that is not in keys "
                            f"({n_keys} keys)")
    n = len(steps)
    if n % n_keys == 0:
        # The SDK's layout: every logged row carries the same keys in the same order, so
        # key_index repeats one permutation of the keys. Then a (rows x keys) reshape and
        # one transpose give every key's column without sorting anything.
        grid = key_index.reshape(-1, n_keys)
        first = grid[0]
        if (grid == first).all() and len(np.unique(first)) == n_keys:
            by_key = [np.ascontiguousarray(column.reshape(-1, n_keys).T)
                      for column in (steps, values, times)]
            return [(int(first[c]), by_key[0][c], by_key[1][c], by_key[2][c])
                    for c in range(n_keys)]
    # Any other layout: group by key, keeping each key's points in their order. A small
    # key type lets numpy use a radix sort (linear) instead of a merge sort.
    small = key_index.astype(np.uint16) if n_keys <= 65536 else key_index
    order = np.argsort(small, kind="stable")
    bounds: npt.NDArray[np.intp] = np.flatnonzero(np.diff(small[order])) + 1
    return [(int(key_index[group[0]]), steps[group], values[group], times[group])
            for group in np.split(order, bounds)]


def _insert_blocks(conn: Connection, chunk: ChunkHeader, chunk_points: Points,
                   key_ids: list[int], where: str) -> None:
    """One ``metric_blocks`` row per key of the chunk (see ``schema.metric_blocks``)."""
    rows: list[dict[str, Any]] = []
    low = high = -1
    for index, steps, values, times in columns(chunk, chunk_points, where):
        step_min, step_max = int(steps.min()), int(steps.max())
        # The run's step range (where it resumes, where it may be forked) is its training
        # steps: system metrics' steps are Unix times.
        if not chunk.keys[index].startswith(SYSTEM_PREFIX):
            low = step_min if low < 0 else min(low, step_min)
            high = max(high, step_max)
        rows.append({
            "run_id": chunk.run,
            "key_id": key_ids[index],
            "writer": chunk.writer,
            "step_min": step_min,
            "step_max": step_max,
            "n": len(steps),
            "steps": steps.tobytes(),
            "vals": values.tobytes(),
            "times": times.tobytes(),
        })
    conn.execute(sa.insert(metric_blocks), rows)
    used = sorted({row["key_id"] for row in rows})
    conn.execute(
        insert_ignore(conn, run_keys, ["run_id", "key_id"]),
        [{"run_id": chunk.run, "key_id": key_id} for key_id in used],
    )
    if high < 0:  # system metrics only
        return
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == chunk.run)
        .values(
            first_step=sa.case(
                (sa.or_(runs.c.first_step.is_(None), runs.c.first_step > low), low),
                else_=runs.c.first_step,
            ),
            last_step=sa.case(
                (sa.or_(runs.c.last_step.is_(None), runs.c.last_step < high), high),
                else_=runs.c.last_step,
            ),
        )
    )
