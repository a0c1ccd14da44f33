"""Files and checkpoints: content-addressed blobs, checkpoint manifests, run files.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("source_run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("source_step", sa.BigInteger, nullable=True),
        sa.Column("source_uri", sa.Text, nullable=True),
        sa.UniqueConstraint("run_id", "step", name="uq_checkpoints_run_step"),
    )
    op.create_table(
        "checkpoint_files",
        sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"),
                  nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.PrimaryKeyConstraint("checkpoint_id", "path", name="pk_checkpoint_files"),
    )
    op.create_table(
        "run_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.Column("step", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("run_id", "name", name="uq_run_files_run_name"),
    )


def downgrade() -> None:
    for table in ("run_files", "checkpoint_files", "checkpoints", "blobs"):
        op.drop_table(table)
