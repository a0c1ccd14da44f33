"""Runs: create-or-attach, references, forks, status and updates.

Every function takes an open connection so callers decide the transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from pluto.digits import parse_digits
from pluto.merge import deep_merge, union_tags
from pluto.wire import (
    MAX_NAME_LENGTH,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    RunAttached,
    RunCreate,
    RunInfo,
    RunStatus,
    RunUpdate,
    StatusChange,
)
from pluto_server import lineage
from pluto_server.bodies import storable_map
from pluto_server.errors import BadRequest, Conflict, NotFound, Unprocessable
from pluto_server.naming import (
    check_external_id,
    check_project_name,
    check_storable_text,
    display_id,
    parse_display_id,
    project_prefix,
)
from pluto_server.schema import projects, runs, status_history
from pluto_server.sql import insert_ignore

MAX_RUN_ID = 2**31 - 1

parent = runs.alias("parent")

RUN_COLUMNS = (
    runs,
    projects.c.name.label("project_name"),
    projects.c.prefix.label("project_prefix"),
    parent.c.number.label("parent_number"),
)


def _run_query() -> sa.Select[Any]:
    return sa.select(*RUN_COLUMNS).select_from(
        runs.join(projects, runs.c.project_id == projects.c.id).outerjoin(
            parent, runs.c.forked_from_id == parent.c.id
        )
    )


@dataclass(frozen=True)
class RunRow:
    """A run as stored, with its project's name and prefix."""

    id: int
    project_id: int
    project: str
    prefix: str
    number: int | None
    external_id: str | None
    name: str
    config: dict[str, Any]
    tags: list[str]
    status: RunStatus
    created_at: float
    updated_at: float
    finished_at: float | None
    forked_from: int | None
    parent_number: int | None
    fork_step: int | None
    first_step: int | None
    last_step: int | None

    @property
    def display_id(self) -> str:
        return display_id(self.prefix, self.number)

    @classmethod
    def from_mapping(cls, row: RowMapping) -> RunRow:
        return cls(
            id=row["id"],
            project_id=row["project_id"],
            project=row["project_name"],
            prefix=row["project_prefix"],
            number=row["number"],
            external_id=row["external_id"],
            name=row["name"],
            config=msgspec.json.decode(row["config"]),
            tags=msgspec.json.decode(row["tags"]),
            status=RunStatus(row["status"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            finished_at=row["finished_at"],
            forked_from=row["forked_from_id"],
            parent_number=row["parent_number"],
            fork_step=row["fork_step"],
            first_step=row["first_step"],
            last_step=row["last_step"],
        )

    def stitched_last_step(self) -> int | None:
        """The last step a query of this run's lineage can return."""
        candidates = [s for s in (self.last_step, self.fork_step) if s is not None]
        return max(candidates) if candidates else None

    def to_info(self, conn: Connection, base_url: str, *, history: bool = True) -> RunInfo:
        return RunInfo(**self._info_fields(conn, base_url, history))

    def to_attached(self, conn: Connection, base_url: str, resumed: bool) -> RunAttached:
        return RunAttached(resumed=resumed, **self._info_fields(conn, base_url, True))

    def _info_fields(self, conn: Connection, base_url: str, history: bool) -> dict[str, Any]:
        changes: list[StatusChange] = []
        if history:
            rows = conn.execute(
                sa.select(status_history.c.status, status_history.c.at)
                .where(status_history.c.run_id == self.id)
                .order_by(status_history.c.id)
            )
            changes = [StatusChange(status=RunStatus(s), at=at) for s, at in rows]
        return {
            "id": self.id,
            "project": self.project,
            "display_id": self.display_id,
            "run_id": self.external_id,
            "name": self.name,
            "config": self.config,
            "tags": self.tags,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "forked_from": self.forked_from,
            "forked_from_display_id": (
                display_id(self.prefix, self.parent_number) if self.forked_from else None
            ),
            "fork_step": self.fork_step,
            "status_history": changes,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "url": f"{base_url}/projects/{self.project}/runs/{self.display_id}",
        }


# ---------------------------------------------------------------------------
# Projects


def ensure_project(conn: Connection, name: str) -> int:
    """Projects are created on first use; concurrent first uses create one."""
    check_project_name(name)
    conn.execute(
        insert_ignore(conn, projects, ["name"]).values(
            name=name, prefix=project_prefix(name), run_counter=0, created_at=time.time()
        )
    )
    project_id = conn.execute(sa.select(projects.c.id).where(projects.c.name == name)).scalar()
    assert project_id is not None
    return int(project_id)


def find_project_id(conn: Connection, name: str) -> int:
    project_id = conn.execute(sa.select(projects.c.id).where(projects.c.name == name)).scalar()
    if project_id is None:
        raise NotFound(f"project {name!r} does not exist; a project is created by its first run")
    return int(project_id)


# ---------------------------------------------------------------------------
# Reading runs


def get_run(conn: Connection, run_id: int) -> RunRow:
    row = conn.execute(_run_query().where(runs.c.id == run_id)).mappings().first()
    if row is None:
        raise NotFound(f"run {run_id} does not exist")
    return RunRow.from_mapping(row)


def exists(conn: Connection, run_id: int) -> bool:
    if run_id > MAX_RUN_ID:
        return False
    return conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first() is not None


def find_run(conn: Connection, ref: str, project: str | None = None, *,
             reveal_projects: bool = True) -> RunRow:
    """A run by numeric id, display id (``MMP-42``) or external id, in that order.

    An all-digit ref that is no run's numeric id (or names a run of another
    project) is looked up as an external id too: job ids make good run ids.
    With ``project`` given, display and external ids are looked up in it; a run
    that exists only elsewhere is reported as such, unless ``reveal_projects`` is
    off (a project-scoped key must not learn other projects' names).
    """
    ref = check_storable_text(ref.strip(), "run reference")
    by_number: RunRow | None = None
    number = parse_digits(ref)
    if number is not None and number <= MAX_RUN_ID:
        row = conn.execute(_run_query().where(runs.c.id == number)).mappings().first()
        by_number = None if row is None else RunRow.from_mapping(row)
        if by_number is not None and (project is None or by_number.project == project):
            return by_number
    candidates = _runs_by_display_id(conn, ref) + _runs_by_external_id(conn, ref)
    if project is not None:
        in_project = [run for run in candidates if run.project == project]
        if in_project:
            return in_project[0]
        if by_number is not None and reveal_projects:
            raise BadRequest(
                f"run {ref} belongs to project {by_number.project!r}, not {project!r}; "
                f"use project={by_number.project!r}"
            )
        if candidates and reveal_projects:
            others = sorted({run.project for run in candidates})
            raise BadRequest(
                f"run {ref!r} is not in project {project!r} but exists in {', '.join(others)}; "
                "use that project"
            )
        raise NotFound(f"run {ref!r} does not exist in project {project!r}")
    unique = {run.id: run for run in candidates}
    if len(unique) == 1:
        return next(iter(unique.values()))
    if not unique:
        raise NotFound(f"run {ref!r} does not exist")
    names = sorted({run.project for run in unique.values()})
    if len(names) == 1:  # one project: a display id and an external id spelled the same
        ids = ", ".join(str(run_id) for run_id in sorted(unique))
        raise Conflict(f"{ref!r} names {len(unique)} runs of project {names[0]!r}: a display "
                       f"id and an external id spelled the same; use the numeric id ({ids})")
    raise Conflict(f"run {ref!r} exists in several projects ({', '.join(names)}); name the project")


def _runs_by_display_id(conn: Connection, ref: str) -> list[RunRow]:
    parsed = parse_display_id(ref)
    if parsed is None:
        return []
    prefix, number = parsed
    rows = conn.execute(
        _run_query().where(projects.c.prefix == prefix, runs.c.number == number)
    ).mappings()
    return [RunRow.from_mapping(row) for row in rows]


def _runs_by_external_id(conn: Connection, ref: str) -> list[RunRow]:
    rows = conn.execute(_run_query().where(runs.c.external_id == ref)).mappings()
    return [RunRow.from_mapping(row) for row in rows]


#: The most runs one page of ``GET /projects/{project}/runs`` holds (and its default).
MAX_RUN_PAGE = 1000


def list_runs(conn: Connection, project: str, limit: int = MAX_RUN_PAGE,
              before: int | None = None, *,
              external_id: str | None = None) -> tuple[list[RunRow], int | None]:
    """One page of a project's runs, newest first: those with an id below ``before`` (all
    with None), and the ``before`` of the next page (None on the last one).

    Pages are cut by id, not by offset, so runs created while a client pages through
    neither shift a run onto two pages nor off all of them.
    """
    project_id = find_project_id(conn, project)
    query = _run_query().where(runs.c.project_id == project_id)
    if external_id is not None:
        query = query.where(runs.c.external_id == check_storable_text(external_id, "run_id"))
    if before is not None and before <= MAX_RUN_ID:  # every id is below a bigger one
        query = query.where(runs.c.id < before)
    rows = [RunRow.from_mapping(row) for row in conn.execute(
        query.order_by(runs.c.id.desc()).limit(limit + 1)).mappings()]
    more = len(rows) > limit
    return rows[:limit], rows[limit - 1].id if more else None


# ---------------------------------------------------------------------------
# Create, attach, fork


def check_create(req: RunCreate) -> None:
    """Everything that can be said about a request before touching the database."""
    check_project_name(req.project)
    if req.run_id is not None:
        check_external_id(req.run_id)
    if (req.fork_run_id is None) != (req.fork_step is None):
        missing = "fork_step" if req.fork_step is None else "fork_run_id"
        raise Unprocessable(
            f"fork_run_id and fork_step go together: {missing} is missing; "
            "pass both to fork, or neither"
        )
    if req.fork_step is not None and req.fork_step < 0:
        raise Unprocessable(f"fork_step must be >= 0, got {req.fork_step}")
    if req.resume and req.fork_run_id is not None:
        raise Unprocessable("resume=True attaches to an existing run and cannot fork; drop one")
    if req.resume and req.run_id is None:
        raise Unprocessable("resume=True needs run_id (external, numeric or display id)")
    if req.name is not None:
        if len(req.name) > MAX_NAME_LENGTH:
            raise Unprocessable(f"name is longer than {MAX_NAME_LENGTH} characters")
        check_storable_text(req.name, "name")
    if req.fork_run_id is not None:
        check_storable_text(req.fork_run_id, "fork_run_id")
    check_tags(req.tags or [])
    if req.config:
        storable_map(req.config, "config")


def check_tags(tags: list[str]) -> None:
    if len(tags) > MAX_TAGS:
        raise Unprocessable(f"a run has at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_LENGTH:
            raise Unprocessable(f"tag {tag!r} must be 1-{MAX_TAG_LENGTH} characters")


def create_or_attach(conn: Connection, req: RunCreate, *,
                     reveal_projects: bool = True) -> tuple[RunRow, bool]:
    """Returns the run and whether it already existed (``resumed``).

    ``reveal_projects`` off: errors about the run to resume or fork never name a project
    the caller did not name (a project-scoped key, see ``find_run``).
    """
    check_create(req)
    project_id = ensure_project(conn, req.project)
    if req.run_id is not None:
        existing = _by_external_id(conn, project_id, req.run_id)
        if existing is None and req.resume:
            existing = _resume_target(conn, req, reveal_projects)
        if existing is not None:
            _check_same_fork(conn, existing, req, reveal_projects)
            return _reopen(conn, existing), True
    name = req.name
    config = dict(req.config or {})
    tags = union_tags(req.tags or [])
    forked_from: int | None = None
    fork_step: int | None = None
    if req.fork_run_id is not None:
        assert req.fork_step is not None
        owner = resolve_fork_parent(conn, req.fork_run_id, req.fork_step, req.project,
                                    reveal_projects=reveal_projects)
        forked_from, fork_step = owner.id, req.fork_step
        if name is None:
            name = owner.name
        if req.inherit_config:
            config = deep_merge(owner.config, config)
        if req.inherit_tags:
            tags = union_tags(owner.tags, tags)
            if len(tags) > MAX_TAGS:
                raise Unprocessable(
                    f"inherit_tags would give the fork {len(tags)} tags ({len(owner.tags)} of "
                    f"run {owner.display_id} and this request's), over the limit of {MAX_TAGS}: "
                    "pass fewer tags, or inherit_tags=False"
                )
    now = time.time()
    inserted = conn.execute(
        insert_ignore(conn, runs, ["project_id", "external_id"])
        .values(
            project_id=project_id,
            number=None,
            external_id=req.run_id,
            name=name or req.run_id or "run",
            config=msgspec.json.encode(config).decode(),
            tags=msgspec.json.encode(tags).decode(),
            status=RunStatus.RUNNING.value,
            created_at=now,
            updated_at=now,
            forked_from_id=forked_from,
            fork_step=fork_step,
        )
        .returning(runs.c.id)
    ).scalar()
    if inserted is None:
        # Another process created it between our look-up and insert: we attach.
        assert req.run_id is not None
        winner = _by_external_id(conn, project_id, req.run_id)
        assert winner is not None
        _check_same_fork(conn, winner, req, reveal_projects)
        return winner, True
    number = conn.execute(
        sa.update(projects)
        .where(projects.c.id == project_id)
        .values(run_counter=projects.c.run_counter + 1)
        .returning(projects.c.run_counter)
    ).scalar_one()
    values: dict[str, Any] = {"number": number}
    if name is None and req.run_id is None:
        values["name"] = f"run-{number}"
    conn.execute(sa.update(runs).where(runs.c.id == inserted).values(**values))
    _record_status(conn, int(inserted), RunStatus.RUNNING, now)
    return get_run(conn, int(inserted)), False


def _by_external_id(conn: Connection, project_id: int, external_id: str) -> RunRow | None:
    row = conn.execute(
        _run_query().where(runs.c.project_id == project_id, runs.c.external_id == external_id)
    ).mappings().first()
    return None if row is None else RunRow.from_mapping(row)


def _check_same_fork(conn: Connection, existing: RunRow, req: RunCreate,
                     reveal_projects: bool) -> None:
    """Attaching with fork arguments: the run must be that very fork. Otherwise the caller's
    data, meant for a fork, would land in a run that is something else (an unforked run,
    or a fork of another run or step) without a word."""
    if req.fork_run_id is None:
        return
    assert req.fork_step is not None
    if existing.forked_from is not None and existing.fork_step == req.fork_step:
        owner = resolve_fork_parent(conn, req.fork_run_id, req.fork_step, req.project,
                                    reveal_projects=reveal_projects)
        if owner.id == existing.forked_from:
            return
    if existing.forked_from is None:
        what = "is not a fork"
    else:
        parent = get_run(conn, existing.forked_from)
        what = f"is a fork of {parent.display_id} at step {existing.fork_step}"
    raise Conflict(
        f"run {req.run_id!r} ({existing.display_id}) exists already and {what}, but this "
        f"request forks {req.fork_run_id!r} at step {req.fork_step}: give the new fork a "
        "run_id of its own, or drop fork_run_id and fork_step to attach to the existing run"
    )


def _resume_target(conn: Connection, req: RunCreate, reveal_projects: bool) -> RunRow:
    assert req.run_id is not None
    try:
        return find_run(conn, req.run_id, req.project, reveal_projects=reveal_projects)
    except NotFound:
        raise NotFound(
            f"cannot resume run {req.run_id!r}: it does not exist in project {req.project!r}; "
            "drop resume=True to create it"
        ) from None


def _reopen(conn: Connection, run: RunRow) -> RunRow:
    """Attaching to a finished run (a restarted job) makes it RUNNING again, once."""
    if run.status is RunStatus.RUNNING:
        return run
    now = time.time()
    result = conn.execute(
        sa.update(runs)
        .where(runs.c.id == run.id, runs.c.status != RunStatus.RUNNING.value)
        .values(status=RunStatus.RUNNING.value, finished_at=None, updated_at=now)
    )
    if result.rowcount == 1:
        _record_status(conn, run.id, RunStatus.RUNNING, now)
    return get_run(conn, run.id)


def resolve_fork_parent(conn: Connection, ref: str, step: int, project: str, *,
                        reveal_projects: bool = True) -> RunRow:
    """The ancestor of ``ref`` that owns ``step``: the parent a fork records."""
    requested = find_run(conn, ref, project, reveal_projects=reveal_projects)
    last = lineage.stitched_last_step(conn, requested.id)
    first = lineage.stitched_first_step(conn, requested.id)
    if last is None or first is None:
        raise Unprocessable(
            f"cannot fork run {requested.display_id} at step {step}: it has logged no steps yet; "
            "log at least one step before forking"
        )
    if not first <= step <= last:
        raise Unprocessable(
            f"fork_step {step} is outside the steps logged by run {requested.display_id} "
            f"({first}-{last}); choose a step in that range"
        )
    owner_id = lineage.step_owner(conn, requested.id, step)
    return get_run(conn, owner_id)


# ---------------------------------------------------------------------------
# Status and updates


def finish(conn: Connection, run_id: int, status: RunStatus) -> RunRow:
    """Move to ``status`` unless the run already has an equally or more severe one.

    The guard is in the UPDATE's WHERE clause, so N ranks finishing at once
    write exactly one transition per severity level reached.
    """
    if status is RunStatus.RUNNING:
        raise Unprocessable("finish needs COMPLETED, FAILED or TERMINATED, not RUNNING")
    get_run(conn, run_id)
    now = time.time()
    severity = sa.case(
        *((runs.c.status == s.value, s.severity) for s in RunStatus), else_=0
    )
    result = conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, severity < status.severity)
        .values(status=status.value, finished_at=now, updated_at=now)
    )
    if result.rowcount == 1:
        _record_status(conn, run_id, status, now)
    return get_run(conn, run_id)


def update(conn: Connection, run_id: int, req: RunUpdate) -> RunRow:
    if req.config:
        storable_map(req.config, "config")
    # Lock the row (PostgreSQL) so concurrent merges from many ranks don't lose keys.
    locked = conn.execute(
        sa.select(runs.c.config, runs.c.tags).where(runs.c.id == run_id).with_for_update()
    ).first()
    if locked is None:
        raise NotFound(f"run {run_id} does not exist")
    config: dict[str, Any] = msgspec.json.decode(locked.config)
    tags: list[str] = msgspec.json.decode(locked.tags)
    stored_tags = len(tags)
    if req.config:
        config = deep_merge(config, req.config)
    if req.add_tags:
        check_tags(req.add_tags)
        tags = union_tags(tags, req.add_tags)
    if req.remove_tags:
        removed = set(req.remove_tags)
        tags = [tag for tag in tags if tag not in removed]
    if len(tags) > stored_tags:
        # Only an update that adds tags can pass the limit: a run over it (stored before the
        # limit held on forks) still takes config updates, and removals that shrink it.
        check_tags(tags)
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id)
        .values(
            config=msgspec.json.encode(config).decode(),
            tags=msgspec.json.encode(tags).decode(),
            updated_at=time.time(),
        )
    )
    return get_run(conn, run_id)


def _record_status(conn: Connection, run_id: int, status: RunStatus, at: float) -> None:
    conn.execute(sa.insert(status_history).values(run_id=run_id, status=status.value, at=at))
