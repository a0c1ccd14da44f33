"""Ingest: apply each chunk exactly once, stored as one columnar block per key.

The chunk's ``(run, session, seq)`` row in ``ingest_log`` is inserted in the
same transaction as its points. A retried chunk finds its row already there and
is skipped; a chunk whose first attempt rolled back is applied by the retry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.wire import Chunk, IngestBatch, IngestResult, RunStatus
from pluto_server.errors import NotFound, Unprocessable
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

MAX_KEY_LENGTH = 256
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


def validate(batch: IngestBatch) -> None:
    """Reject a malformed batch whole, before anything is written."""
    for position, chunk in enumerate(batch.chunks):
        where = f"chunk {position} (run {chunk.run}, session {chunk.session!r}, seq {chunk.seq})"
        n = len(chunk.steps)
        for name in ("key_index", "values", "times"):
            length = len(getattr(chunk, name))
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
        if not 0 <= chunk.seq <= INT64_MAX:
            raise Unprocessable(f"{where}: seq must be between 0 and 2**63-1")
        if not 0 <= chunk.writer <= INT32_MAX:
            raise Unprocessable(f"{where}: writer (the rank) must be between 0 and 2**31-1")
        for key in chunk.keys:
            if not key or len(key) > MAX_KEY_LENGTH:
                raise Unprocessable(f"{where}: metric key {key[:40]!r} must be 1-256 characters")
        if n:
            key_index = np.asarray(chunk.key_index, dtype=np.int64)
            if key_index.min() < 0 or key_index.max() >= len(chunk.keys):
                raise Unprocessable(
                    f"{where}: key_index refers to a key that is not in keys "
                    f"({len(chunk.keys)} keys)"
                )
            if min(chunk.steps) < 0 or max(chunk.steps) > INT64_MAX:
                raise Unprocessable(f"{where}: steps must be between 0 and 2**63-1")
        if chunk.finish is RunStatus.RUNNING:
            raise Unprocessable(f"{where}: finish must be COMPLETED, FAILED or TERMINATED")
        for line in chunk.logs:
            if len(line.line) > MAX_LOG_LINE:
                raise Unprocessable(f"{where}: a log line is longer than {MAX_LOG_LINE} characters")


def resolve_run_refs(conn: Connection, batch: IngestBatch) -> None:
    """Give chunks addressed by (project, external id) their numeric run id."""
    refs = sorted({(c.project or "", c.run_ref or "") for c in batch.chunks if c.run == 0})
    found: dict[tuple[str, str], int] = {}
    for project, ref in refs:
        run_id = conn.execute(
            sa.select(runs.c.id)
            .join(projects, projects.c.id == runs.c.project_id)
            .where(projects.c.name == project, runs.c.external_id == ref)
        ).scalar()
        if run_id is None:
            raise NotFound(f"run {ref!r} does not exist in project {project!r}; open it with "
                           "POST /api/v1/runs before logging to it")
        found[(project, ref)] = int(run_id)
    for chunk in batch.chunks:
        if chunk.run == 0:
            chunk.run = found[(chunk.project or "", chunk.run_ref or "")]


def run_projects(conn: Connection, batch: IngestBatch) -> dict[int, int]:
    """The project of every run the batch writes to; 404 for a run that does not exist."""
    resolve_run_refs(conn, batch)
    run_ids = sorted({chunk.run for chunk in batch.chunks})
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


def unknown_keys(batch: IngestBatch, projects_of: dict[int, int],
                 cache: KeyCache) -> list[tuple[int, str]]:
    wanted = {(projects_of[chunk.run], key) for chunk in batch.chunks if chunk.steps
              for key in chunk.keys}
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


def apply(conn: Connection, batch: IngestBatch, projects_of: dict[int, int],
          keys: KeyCache) -> IngestResult:
    """Apply a validated batch in the caller's transaction; its keys already exist."""
    applied = duplicates = points = 0
    now = time.time()
    # A fixed order keeps concurrent PostgreSQL transactions from deadlocking.
    for chunk in sorted(batch.chunks, key=lambda c: (c.run, c.session, c.seq)):
        fresh = conn.execute(
            insert_ignore(conn, ingest_log, ["run_id", "session", "seq"])
            .values(run_id=chunk.run, session=chunk.session, seq=chunk.seq, applied_at=now)
            .returning(ingest_log.c.seq)
        ).first()
        if fresh is None:
            duplicates += 1
            continue
        applied += 1
        points += chunk.point_count
        if chunk.point_count:
            project_id = projects_of[chunk.run]
            key_ids = []
            for name in chunk.keys:
                key_id = keys.get(project_id, name)
                assert key_id is not None, "ensure_keys() runs before apply()"
                key_ids.append(key_id)
            _insert_blocks(conn, chunk, key_ids)
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
    return IngestResult(applied=applied, duplicates=duplicates, points=points)


def _insert_blocks(conn: Connection, chunk: Chunk, key_ids: list[int]) -> None:
    key_index = np.asarray(chunk.key_index, dtype=np.int64)
    steps = np.asarray(chunk.steps, dtype="<i8")
    values = np.asarray(chunk.values, dtype="<f8")
    times = np.asarray(chunk.times, dtype="<f8")
    order = np.argsort(key_index, kind="stable")
    sorted_keys = key_index[order]
    bounds: npt.NDArray[np.intp] = np.flatnonzero(np.diff(sorted_keys)) + 1
    rows: list[dict[str, Any]] = []
    for group in np.split(order, bounds):
        group_steps = steps[group]
        rows.append({
            "run_id": chunk.run,
            "key_id": key_ids[int(key_index[group[0]])],
            "writer": chunk.writer,
            "step_min": int(group_steps.min()),
            "step_max": int(group_steps.max()),
            "n": len(group),
            "steps": group_steps.tobytes(),
            "vals": values[group].tobytes(),
            "times": times[group].tobytes(),
        })
    conn.execute(sa.insert(metric_blocks), rows)
    used = sorted({row["key_id"] for row in rows})
    conn.execute(
        insert_ignore(conn, run_keys, ["run_id", "key_id"]),
        [{"run_id": chunk.run, "key_id": key_id} for key_id in used],
    )
    low, high = int(steps.min()), int(steps.max())
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
