"""Checkpoint and file manifests: which blobs make up what, and lineage resolution.

A checkpoint is one row per (run, step) plus a row per file; a run file is one row.
Both are written in one transaction after every blob they name is stored, which is
what keeps a half-uploaded checkpoint from ever being listed.

Picking a checkpoint across a lineage: a run's own checkpoints all count, and each
ancestor's count up to the step its child forked at (the same ranges that stitch
metrics, see ``lineage.py``). The newest step wins; at equal steps the run nearest
to the one asked about wins (a checkpoint forked into a run shadows its source).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.wire import CheckpointCreate, CheckpointInfo, FileCreate, FileEntry, FileInfo
from pluto_server import lineage
from pluto_server.bodies import storable_map
from pluto_server.errors import Conflict, NotFound, Unprocessable
from pluto_server.ingest import INT64_MAX
from pluto_server.naming import display_id
from pluto_server.schema import (
    blobs,
    checkpoint_files,
    checkpoints,
    project_blobs,
    projects,
    run_files,
    runs,
)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: no "\n" after it
MAX_PATH = 1024
MAX_FILES = 100_000
MAX_METADATA_BYTES = 64 * 1024


def check_sha256(value: str) -> str:
    if not SHA256_HEX.fullmatch(value):
        raise Unprocessable(f"{value!r} is not a SHA-256: use 64 lowercase hex digits")
    return value


def check_path(path: str, what: str = "path") -> str:
    """A relative ``/``-separated path that stays inside its checkpoint."""
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH or path.startswith("/") or "\\" in path
            or "\x00" in path or any(part in ("", ".", "..") for part in parts)):
        raise Unprocessable(
            f"{what} {path!r} is not valid: use a relative path of at most {MAX_PATH} "
            "characters, '/'-separated, without empty, '.' or '..' parts"
        )
    return path


def check_step(step: int, what: str = "step") -> int:
    if not 0 <= step <= INT64_MAX:
        raise Unprocessable(f"{what} {step} is out of range: use 0 to {INT64_MAX}")
    return step


def check_file_paths(paths: list[str], what: str = "path") -> None:
    """The paths of one checkpoint's files: valid, each once, and none of them also a
    folder of another (``a`` and ``a/b``: no download could write both)."""
    if not paths:
        raise Unprocessable("a checkpoint needs at least one file")
    if len(paths) > MAX_FILES:
        raise Unprocessable(f"a checkpoint holds at most {MAX_FILES} files; pack them")
    seen: set[str] = set()
    folders: dict[str, str] = {}
    for path in paths:
        check_path(path, what)
        if path in seen:
            raise Unprocessable(f"file {path!r} is listed twice")
        seen.add(path)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folders.setdefault("/".join(parts[:depth]), path)
    for path in seen & folders.keys():
        raise Unprocessable(f"{path!r} is both a file and the folder of {folders[path]!r}: "
                            "rename one of them")


def check_manifest(req: CheckpointCreate) -> None:
    check_step(req.step)
    check_file_paths([entry.path for entry in req.files])
    for entry in req.files:
        check_sha256(entry.sha256)
        if entry.size < 0:
            raise Unprocessable(f"file {entry.path!r} has a negative size")
    storable_map(req.metadata, "metadata")
    if len(msgspec.json.encode(req.metadata)) > MAX_METADATA_BYTES:
        raise Unprocessable(f"checkpoint metadata is over {MAX_METADATA_BYTES // 1024} KiB "
                            "encoded: keep it to small facts, log files for the rest")


# -- blobs ----------------------------------------------------------------


def blob_sizes(conn: Connection, shas: list[str], project_id: int | None = None
               ) -> dict[str, int]:
    """Sizes of the blobs among ``shas`` that the store holds; with ``project_id``, only of
    those that project may name (``project_blobs``): what it uploaded or copied itself."""
    if not shas:
        return {}
    query = sa.select(blobs.c.sha256, blobs.c.size).where(blobs.c.sha256.in_(shas))
    if project_id is not None:
        query = query.join(project_blobs, project_blobs.c.sha256 == blobs.c.sha256).where(
            project_blobs.c.project_id == project_id)
    return {sha: int(size) for sha, size in conn.execute(query)}


def record_blob(conn: Connection, sha256: str, size: int, project_id: int | None = None
                ) -> None:
    """The store holds this blob now, whole and verified; ``project_id`` uploaded it."""
    if sha256 not in blob_sizes(conn, [sha256]):
        conn.execute(sa.insert(blobs).values(sha256=sha256, size=size, created_at=time.time()))
    if project_id is not None:
        grant_blobs(conn, project_id, [sha256])


def grant_blobs(conn: Connection, project_id: int, shas: list[str]) -> None:
    """Let a project name these blobs (those of them the store holds)."""
    held = set(blob_sizes(conn, sorted(set(shas)), project_id))
    new = [sha for sha in blob_sizes(conn, sorted(set(shas))) if sha not in held]
    if new:
        conn.execute(sa.insert(project_blobs),
                     [{"project_id": project_id, "sha256": sha} for sha in new])


def _project_of(conn: Connection, run_id: int) -> int:
    return int(conn.execute(sa.select(runs.c.project_id).where(runs.c.id == run_id))
               .scalar_one())


def _require_blobs(conn: Connection, entries: list[FileEntry], project_id: int) -> None:
    """Every entry's blob is one the project may name, of the size the entry says. A blob
    of another project's is "not uploaded" here as much as one nobody uploaded: its size or
    its existence would tell what another project holds."""
    stored = blob_sizes(conn, sorted({e.sha256 for e in entries}), project_id)
    for entry in entries:
        size = stored.get(entry.sha256)
        if size is None:
            raise Conflict(f"the bytes of {entry.path!r} (sha256 {entry.sha256}) were not "
                           "uploaded: upload missing blobs before committing the manifest")
        if size != entry.size:
            raise Unprocessable(f"{entry.path!r} is said to be {entry.size} bytes but its "
                                f"blob holds {size}")


# -- checkpoints ----------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRow:
    id: int
    run_id: int
    step: int


_SOURCE = sa.alias(runs, "source")
_SOURCE_PROJECT = sa.alias(projects, "source_project")


def _info_query() -> sa.Select[Any]:
    return (
        sa.select(
            checkpoints, runs.c.number, projects.c.prefix,
            _SOURCE.c.number.label("source_number"),
            _SOURCE_PROJECT.c.prefix.label("source_prefix"),
            _SOURCE_PROJECT.c.name.label("source_project"),
        )
        .select_from(
            checkpoints.join(runs, runs.c.id == checkpoints.c.run_id)
            .join(projects, projects.c.id == runs.c.project_id)
            .outerjoin(_SOURCE, _SOURCE.c.id == checkpoints.c.source_run_id)
            .outerjoin(_SOURCE_PROJECT, _SOURCE_PROJECT.c.id == _SOURCE.c.project_id)
        )
    )


def _infos(conn: Connection, where: sa.ColumnElement[bool]) -> list[CheckpointInfo]:
    rows = conn.execute(_info_query().where(where).order_by(checkpoints.c.step,
                                                            checkpoints.c.run_id)).mappings()
    rows_by_id = {row["id"]: row for row in rows}
    files: dict[int, list[FileEntry]] = {i: [] for i in rows_by_id}
    if rows_by_id:
        for cid, path, size, sha in conn.execute(
            sa.select(checkpoint_files.c.checkpoint_id, checkpoint_files.c.path,
                      checkpoint_files.c.size, checkpoint_files.c.sha256)
            .where(checkpoint_files.c.checkpoint_id.in_(list(rows_by_id)))
            .order_by(checkpoint_files.c.path)
        ):
            files[cid].append(FileEntry(path=path, size=int(size), sha256=sha))
    return [
        CheckpointInfo(
            run=row["run_id"], run_display_id=display_id(row["prefix"], row["number"]),
            step=int(row["step"]), size=int(row["size"]), files=files[cid],
            metadata=msgspec.json.decode(row["metadata"]), created_at=row["created_at"],
            source_run=row["source_run_id"],
            source_display_id=(display_id(row["source_prefix"], row["source_number"])
                               if row["source_run_id"] is not None else None),
            source_step=row["source_step"], source_uri=row["source_uri"],
            source_project=row["source_project"],
        )
        for cid, row in rows_by_id.items()
    ]


def get_checkpoint(conn: Connection, run_id: int, step: int) -> CheckpointInfo | None:
    found = _infos(conn, sa.and_(checkpoints.c.run_id == run_id, checkpoints.c.step == step))
    return found[0] if found else None


def list_checkpoints(conn: Connection, run_id: int, *, lineage_view: bool = False
                     ) -> list[CheckpointInfo]:
    """The run's own checkpoints, or every one its lineage offers (``eligible``)."""
    if not lineage_view:
        return _infos(conn, checkpoints.c.run_id == run_id)
    return eligible(conn, run_id)


def eligible(conn: Connection, run_id: int) -> list[CheckpointInfo]:
    """Checkpoints a fork of the lineage can start from: one per step, nearest run first."""
    segments = lineage.segments(conn, run_id)
    depth_of = {segment.run_id: segment.depth for segment in segments}
    conditions = [
        sa.and_(checkpoints.c.run_id == segment.run_id,
                sa.true() if segment.upper is None else checkpoints.c.step <= segment.upper)
        for segment in segments
    ]
    by_step: dict[int, CheckpointInfo] = {}
    for info in _infos(conn, sa.or_(*conditions)):
        best = by_step.get(info.step)
        if best is None or depth_of[info.run] < depth_of[best.run]:
            by_step[info.step] = info
    return [by_step[step] for step in sorted(by_step)]


def resolve(conn: Connection, run_id: int, run_label: str, *,
            not_after_step: int | None = None, step: int | None = None) -> CheckpointInfo:
    """The newest eligible checkpoint at or before ``not_after_step`` (or exactly at
    ``step``), with an error that lists what exists when there is none."""
    if step is not None and not_after_step is not None:
        raise Unprocessable(f"step={step} and not_after_step={not_after_step} both choose a "
                            "checkpoint: pass one of them")
    offered = eligible(conn, run_id)
    if step is not None:
        chosen = [info for info in offered if info.step == step]
    elif not_after_step is not None:
        chosen = [info for info in offered if info.step <= not_after_step]
    else:
        chosen = offered
    if chosen:
        return chosen[-1]
    steps = ", ".join(str(info.step) for info in offered)
    where = f"run {run_label} and its ancestors up to their fork steps"
    if not offered:
        raise NotFound(f"{where} have no checkpoint yet: log one with "
                       "run.log_checkpoint(path) or run.save_checkpoint(obj)")
    if step is not None:
        raise NotFound(f"{where} have no checkpoint at step {step}; steps with one: {steps}")
    raise NotFound(f"{where} have no checkpoint at or before step {not_after_step}; "
                   f"steps with one: {steps}")


def create_checkpoint(conn: Connection, run_id: int, req: CheckpointCreate, *,
                      source: CheckpointInfo | None = None, source_uri: str | None = None
                      ) -> tuple[CheckpointInfo, bool]:
    """Commit a manifest; ``(info, created)``. Committing the same files again at the
    same step is a no-op (a retried request), different ones are a conflict."""
    project_id = _project_of(conn, run_id)
    if source is not None or source_uri is not None:
        # Copied by the server from a checkpoint the caller may read (or a bucket it
        # imported): the target's project may name those blobs from now on.
        grant_blobs(conn, project_id, [entry.sha256 for entry in req.files])
    _require_blobs(conn, req.files, project_id)
    existing = get_checkpoint(conn, run_id, req.step)
    if existing is not None:
        if _same_files(existing.files, req.files) and (
                source is None or existing.source_run == source.run):
            return existing, False
        if existing.source_run is not None:
            what = f"a copy of {existing.source_display_id}'s step {existing.source_step}"
        elif _same_files(existing.files, req.files):
            what = "the same files, logged by the run itself"
        else:
            what = "other files"
        raise Conflict(f"run {existing.run_display_id} already has a checkpoint at step "
                       f"{req.step} ({what}); checkpoints are immutable: use another step")
    inserted = conn.execute(
        sa.insert(checkpoints).values(
            run_id=run_id, step=req.step, size=sum(entry.size for entry in req.files),
            metadata=msgspec.json.encode(req.metadata).decode(), created_at=time.time(),
            source_run_id=None if source is None else source.run,
            source_step=None if source is None else source.step,
            source_uri=source_uri,
        ).returning(checkpoints.c.id)
    ).scalar_one()
    conn.execute(sa.insert(checkpoint_files), [
        {"checkpoint_id": inserted, "path": entry.path, "size": entry.size,
         "sha256": entry.sha256}
        for entry in req.files
    ])
    info = get_checkpoint(conn, run_id, req.step)
    assert info is not None
    return info, True


def fork_into(conn: Connection, to_run: int, source: CheckpointInfo) -> tuple[CheckpointInfo,
                                                                             bool]:
    """Copy a checkpoint's manifest to another run at the same step: its blobs are
    shared, so no byte moves."""
    request = CheckpointCreate(step=source.step, files=source.files, metadata=source.metadata)
    return create_checkpoint(conn, to_run, request, source=source)


def _same_files(a: list[FileEntry], b: list[FileEntry]) -> bool:
    return sorted((e.path, e.sha256, e.size) for e in a) == sorted(
        (e.path, e.sha256, e.size) for e in b)


def checkpoint_file(info: CheckpointInfo, path: str) -> FileEntry:
    for entry in info.files:
        if entry.path == path:
            return entry
    names = ", ".join(entry.path for entry in info.files[:20])
    raise NotFound(f"checkpoint at step {info.step} of {info.run_display_id} has no file "
                   f"{path!r}; it has: {names}")


# -- run files ------------------------------------------------------------


def _file_info(row: Any) -> FileInfo:
    return FileInfo(name=row.name, size=int(row.size), sha256=row.sha256, step=row.step,
                    created_at=row.created_at)


def create_file(conn: Connection, run_id: int, req: FileCreate) -> tuple[FileInfo, bool]:
    check_path(req.name, "file name")
    check_sha256(req.sha256)
    if req.step is not None:
        check_step(req.step)
    entry = FileEntry(path=req.name, size=req.size, sha256=req.sha256)
    _require_blobs(conn, [entry], _project_of(conn, run_id))
    existing = get_file(conn, run_id, req.name)
    if existing is not None:
        if existing.sha256 == req.sha256:
            return existing, False
        raise Conflict(f"this run already has a different file named {req.name!r}; "
                       "files are immutable: pass another name=")
    conn.execute(sa.insert(run_files).values(
        run_id=run_id, name=req.name, size=req.size, sha256=req.sha256, step=req.step,
        created_at=time.time(),
    ))
    created = get_file(conn, run_id, req.name)
    assert created is not None
    return created, True


def get_file(conn: Connection, run_id: int, name: str) -> FileInfo | None:
    row = conn.execute(sa.select(run_files).where(run_files.c.run_id == run_id,
                                                  run_files.c.name == name)).first()
    return None if row is None else _file_info(row)


def list_files(conn: Connection, run_id: int) -> list[FileInfo]:
    rows = conn.execute(sa.select(run_files).where(run_files.c.run_id == run_id)
                        .order_by(run_files.c.name))
    return [_file_info(row) for row in rows]
