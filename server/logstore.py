"""Console lines of a run, in arrival order, filterable by writer and text."""

from __future__ import annotations

import weakref

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pluto.wire import LogPage, LogRecord
from pluto_server.database import CASEFOLD_FUNCTION
from pluto_server.schema import log_lines

MAX_PAGE = 10_000
#: Line ids are 32-bit integers in the schema: nothing comes after the largest.
MAX_LINE_ID = 2**31 - 1


def read_logs(
    conn: Connection,
    run_id: int,
    *,
    after: int | None = None,
    limit: int = 1000,
    writer: int | None = None,
    contains: str | None = None,
) -> LogPage:
    limit = max(1, min(limit, MAX_PAGE))
    if after is not None and after >= MAX_LINE_ID:  # PostgreSQL refuses a bigger int4 bound
        return LogPage(lines=[], next_after=None)
    query = sa.select(log_lines).where(log_lines.c.run_id == run_id)
    if after is not None:
        query = query.where(log_lines.c.id > after)
    if writer is not None:
        query = query.where(log_lines.c.writer == writer)
    if contains:
        query = query.where(_contains(conn, contains))
    rows = conn.execute(query.order_by(log_lines.c.id).limit(limit + 1)).mappings().all()
    page = [
        LogRecord(id=r["id"], writer=r["writer"], time=r["time"], stream=r["stream"],
                  line=r["line"])
        for r in rows[:limit]
    ]
    return LogPage(lines=page, next_after=page[-1].id if len(rows) > limit else None)


#: PostgreSQL's ICU root collation, where the server was built with ICU: it lower-cases every
#: script, whatever the database's own locale (under "C", ILIKE folds ASCII only).
ICU_COLLATION = "und-x-icu"
_icu_collation: weakref.WeakKeyDictionary[Engine, str | None] = weakref.WeakKeyDictionary()


def _contains(conn: Connection, text: str) -> sa.ColumnElement[bool]:
    """``line`` holds ``text``, case-insensitively, for any script (not only ASCII)."""
    if conn.dialect.name == "sqlite":
        folded: sa.ColumnElement[str] = getattr(sa.func, CASEFOLD_FUNCTION)(log_lines.c.line,
                                                                           type_=sa.Text)
        return folded.contains(text.casefold(), autoescape=True)
    engine = conn.engine
    if engine not in _icu_collation:
        _icu_collation[engine] = conn.execute(
            sa.text("SELECT collname FROM pg_collation WHERE collname = :name"),
            {"name": ICU_COLLATION},
        ).scalar()
    collation = _icu_collation[engine]
    line = log_lines.c.line if collation is None else log_lines.c.line.collate(collation)
    return line.icontains(text, autoescape=True)
