"""Initial schema: projects, runs, lineage, metric blocks, ingest log, logs, API keys.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("prefix", sa.String(8), nullable=False),
        sa.Column("run_counter", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=True),
        sa.Column("external_id", sa.String(128), nullable=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("forked_from_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("fork_step", sa.BigInteger, nullable=True),
        sa.Column("first_step", sa.BigInteger, nullable=True),
        sa.Column("last_step", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("project_id", "external_id", name="uq_runs_project_external"),
        sa.UniqueConstraint("project_id", "number", name="uq_runs_project_number"),
    )
    op.create_index("ix_runs_forked_from", "runs", ["forked_from_id"])
    op.create_table(
        "status_history",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_status_history_run", "status_history", ["run_id"])
    op.create_table(
        "metric_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.UniqueConstraint("project_id", "key", name="uq_metric_keys_project_key"),
    )
    op.create_table(
        "run_keys",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("metric_keys.id"), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "key_id", name="pk_run_keys"),
    )
    op.create_table(
        "metric_blocks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("metric_keys.id"), nullable=False),
        sa.Column("writer", sa.Integer, nullable=False),
        sa.Column("step_min", sa.BigInteger, nullable=False),
        sa.Column("step_max", sa.BigInteger, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("steps", sa.LargeBinary, nullable=False),
        sa.Column("vals", sa.LargeBinary, nullable=False),
        sa.Column("times", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "ix_metric_blocks_run_key_step", "metric_blocks", ["run_id", "key_id", "step_min"]
    )
    op.create_table(
        "ingest_log",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "session", "seq", name="pk_ingest_log"),
    )
    op.create_table(
        "log_lines",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("writer", sa.Integer, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("stream", sa.Integer, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )
    op.create_index("ix_log_lines_run", "log_lines", ["run_id", "id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("lookup", sa.String(16), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("project", sa.String(100), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )


def downgrade() -> None:
    for table in (
        "api_keys", "log_lines", "ingest_log", "metric_blocks", "run_keys", "metric_keys",
        "status_history", "runs", "projects",
    ):
        op.drop_table(table)
