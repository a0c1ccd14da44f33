"""Engines, transactions and migrations for SQLite (embedded) and PostgreSQL.

SQLite allows one writer at a time. Write transactions start with
``BEGIN IMMEDIATE`` so two writers queue on the database lock instead of both
reading and then failing to upgrade; reads use a plain deferred ``BEGIN`` and
run beside the writer thanks to WAL.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'pluto.db'}"


class Database:
    """One engine plus the transaction helpers every store uses."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL") -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._write_lock = threading.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            self.engine = sa.create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=8,
                max_overflow=8,
            )
            _configure_sqlite(self.engine, sqlite_synchronous)
        else:
            self.engine = sa.create_engine(self.url, pool_size=10, max_overflow=20,
                                           pool_pre_ping=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on exit, rolled back on error."""
        lock = self._write_lock
        if lock is not None:
            # Serialise SQLite writers in-process: cheaper than spinning on SQLITE_BUSY.
            with lock, self.engine.connect() as conn:
                conn = conn.execution_options(pluto_write=True)
                with conn.begin():
                    yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision``, the newest by default (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.write() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)

    def schema_revision(self) -> str | None:
        with self.read() as conn:
            try:
                row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
            except sa.exc.DBAPIError:
                return None
            return None if row is None else str(row[0])

    def dispose(self) -> None:
        self.engine.dispose()


#: A SQL function on SQLite connections: Python's ``str.casefold``. SQLite's own ``lower()``
#: and ``LIKE`` fold ASCII only, so a case-insensitive search ("ошибка" finding "Ошибка")
#: folds both sides with this instead.
CASEFOLD_FUNCTION = "pluto_casefold"


def _casefold(text: str | None) -> str | None:
    return text.casefold() if isinstance(text, str) else text


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        dbapi_conn.create_function(CASEFOLD_FUNCTION, 1, _casefold, deterministic=True)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("pluto_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def null_pool_engine(url: str) -> Engine:
    """A throwaway engine for one-shot CLI commands."""
    return sa.create_engine(normalize_url(url), poolclass=NullPool)
