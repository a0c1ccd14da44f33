"""Alembic environment: migrations run on a connection the server hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from pluto_server.schema import metadata

connection: Connection | None = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached when alembic is run by hand
    raise RuntimeError("run migrations through pluto_server.database.migrate()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
