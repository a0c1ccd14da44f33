"""The operations behind the HTTP API, each in its own transaction."""

from __future__ import annotations

import math
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pluto.digits import parse_digits
from pluto.wire import (
    IngestBatch,
    IngestResult,
    Lineage,
    LogPage,
    MetricKeys,
    MetricQueryResult,
    ProjectInfo,
    ProjectList,
    RunAttached,
    RunCreate,
    RunFinish,
    RunInfo,
    RunList,
    RunUpdate,
)
from pluto_server import auth, ingest, lineage, logstore, queries, runs
from pluto_server.columns import PackedIngestBatch
from pluto_server.database import Database
from pluto_server.errors import Forbidden, NotFound, Unprocessable
from pluto_server.schema import projects
from pluto_server.schema import runs as runs_table
from pluto_server.settings import ServerSettings


class Service:
    def __init__(self, settings: ServerSettings, database: Database) -> None:
        self.settings = settings
        self.db = database
        self.keys = ingest.KeyCache()
        self.verifier = auth.KeyVerifier()

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    # -- auth -------------------------------------------------------------

    def authenticate(self, presented: str | None) -> auth.KeyIdentity | None:
        if not self.settings.auth_required:
            return None
        with self.db.read() as conn:
            return self.verifier.check(conn, presented)

    @staticmethod
    def guard(identity: auth.KeyIdentity | None, project: str) -> None:
        """A key scoped to a project reaches only that project's runs."""
        if identity is not None and identity.project not in (None, project):
            raise Forbidden(
                f"this API key is limited to project {identity.project!r} and cannot reach "
                f"project {project!r}"
            )

    # -- runs -------------------------------------------------------------

    def create_run(self, req: RunCreate, who: auth.KeyIdentity | None) -> RunAttached:
        runs.check_create(req)
        self.guard(who, req.project)
        with self.db.write() as conn:
            run, resumed = runs.create_or_attach(
                conn, req, reveal_projects=who is None or who.project is None)
            return run.to_attached(conn, self.base_url, resumed)

    def _find(self, conn: Connection, ref: str, project: str | None,
              who: auth.KeyIdentity | None) -> runs.RunRow:
        """Resolve a run reference; a project-scoped key looks only inside its project."""
        if who is not None and who.project is not None:
            self.guard(who, project or who.project)
            try:
                run = runs.find_run(conn, ref, who.project, reveal_projects=False)
            except NotFound:
                number = parse_digits(ref)
                if number is not None and runs.exists(conn, number):
                    raise Forbidden(f"this API key is limited to project {who.project!r} and "
                                    f"cannot reach run {ref}") from None
                raise
        else:
            run = runs.find_run(conn, ref, project)
        self.guard(who, run.project)
        return run

    def find(self, ref: str, project: str | None, who: auth.KeyIdentity | None) -> runs.RunRow:
        """A run the caller may reach, by any of its references."""
        with self.db.read() as conn:
            return self._find(conn, ref, project, who)

    def get_run(self, ref: str, project: str | None, who: auth.KeyIdentity | None) -> RunInfo:
        with self.db.read() as conn:
            return self._find(conn, ref, project, who).to_info(conn, self.base_url)

    def _resolve(self, ref: str, project: str | None, who: auth.KeyIdentity | None) -> int:
        with self.db.read() as conn:
            return self._find(conn, ref, project, who).id

    def update_run(self, ref: str, project: str | None, req: RunUpdate,
                   who: auth.KeyIdentity | None) -> RunInfo:
        run_id = self._resolve(ref, project, who)
        with self.db.write() as conn:
            return runs.update(conn, run_id, req).to_info(conn, self.base_url)

    def finish_run(self, ref: str, project: str | None, req: RunFinish,
                   who: auth.KeyIdentity | None) -> RunInfo:
        run_id = self._resolve(ref, project, who)
        with self.db.write() as conn:
            return runs.finish(conn, run_id, req.status).to_info(conn, self.base_url)

    def list_runs(self, project: str, who: auth.KeyIdentity | None,
                  metrics: list[str] | None = None, *, limit: int = runs.MAX_RUN_PAGE,
                  cursor: str | None = None, external_id: str | None = None) -> RunList:
        self.guard(who, project)
        before = None if cursor is None else parse_digits(cursor)
        if cursor is not None and before is None:
            raise Unprocessable(f"cursor {cursor[:40]!r} is not one this server gave: pass the "
                                "next_cursor of the page before, or no cursor for the first page")
        with self.db.read() as conn:
            rows, next_before = runs.list_runs(conn, project, limit, before,
                                               external_id=external_id)
            infos = [row.to_info(conn, self.base_url, history=False) for row in rows]
            if metrics and rows:
                last = queries.last_values(conn, rows[0].project_id, [r.id for r in rows],
                                           metrics)
                for info in infos:
                    info.last_values = {key: _json_number(value)
                                        for key, value in last.get(info.id, {}).items()}
            return RunList(runs=infos,
                           next_cursor=None if next_before is None else str(next_before))

    def list_projects(self, who: auth.KeyIdentity | None) -> ProjectList:
        with self.db.read() as conn:
            counts = (
                sa.select(runs_table.c.project_id, sa.func.count().label("n"))
                .group_by(runs_table.c.project_id).subquery()
            )
            rows = conn.execute(
                sa.select(projects.c.name, projects.c.prefix, projects.c.created_at,
                          sa.func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.project_id == projects.c.id)
                .order_by(projects.c.name)
            ).all()
        return ProjectList(projects=[
            ProjectInfo(name=name, prefix=prefix, runs=int(n), created_at=created)
            for name, prefix, created, n in rows
            if who is None or who.project in (None, name)
        ])

    def lineage(self, ref: str, project: str | None, who: auth.KeyIdentity | None) -> Lineage:
        run_id = self._resolve(ref, project, who)
        with self.db.read() as conn:
            return Lineage(ancestors=lineage.ancestors(conn, run_id),
                           descendants=lineage.descendants(conn, run_id))

    # -- data -------------------------------------------------------------

    def ingest(self, batch: IngestBatch | PackedIngestBatch,
               who: auth.KeyIdentity | None) -> IngestResult:
        chunks = batch.chunks
        columns_of = ingest.validate(chunks)
        if who is not None and who.project is not None:
            for chunk in chunks:
                if chunk.run == 0:
                    self.guard(who, chunk.project or "")
        with self.db.read() as conn:
            projects_of = ingest.run_projects(conn, chunks)
            if who is not None and who.project is not None and chunks:
                # Named by run, never by the other project's name (as ``_find`` does).
                allowed = conn.execute(sa.select(projects.c.id).where(
                    projects.c.name == who.project)).scalar()
                for run, project_id in sorted(projects_of.items()):
                    if project_id != allowed:
                        raise Forbidden(f"this API key is limited to project "
                                        f"{who.project!r} and cannot reach run {run}")
        missing = ingest.unknown_keys(chunks, columns_of, projects_of, self.keys)
        if missing:
            with self.db.write() as conn:
                created = ingest.ensure_keys(conn, missing)
            self.keys.remember(created)  # committed: safe to remember
        with self.db.write() as conn:
            return ingest.apply(conn, chunks, columns_of, projects_of, self.keys)

    def metrics(self, ref: str, project: str | None, query: queries.MetricQuery,
                who: auth.KeyIdentity | None) -> MetricQueryResult:
        run_id = self._resolve(ref, project, who)
        with self.db.read() as conn:
            return queries.run_metrics(conn, replace(query, run_id=run_id))

    def metric_keys(self, ref: str, project: str | None, lineage_view: bool,
                    who: auth.KeyIdentity | None) -> MetricKeys:
        run_id = self._resolve(ref, project, who)
        with self.db.read() as conn:
            return MetricKeys(keys=queries.metric_keys_of(conn, run_id, lineage_view))

    def logs(self, ref: str, project: str | None, who: auth.KeyIdentity | None, *,
             after: int | None, limit: int, writer: int | None, contains: str | None) -> LogPage:
        run_id = self._resolve(ref, project, who)
        with self.db.read() as conn:
            return logstore.read_logs(conn, run_id, after=after, limit=limit, writer=writer,
                                      contains=contains)



def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinity: those read as null (no value to show)."""
    return value if math.isfinite(value) else None
