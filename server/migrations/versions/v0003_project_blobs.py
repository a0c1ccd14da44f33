"""Blobs per project: a project may name only the blobs it uploaded or copied.

Revision ID: 0003

Existing files and checkpoints keep working: each project is granted the blobs its runs'
files and checkpoints already name. A blob uploaded but never committed belongs to no
project; whoever commits it uploads it again (the bytes are stored once either way).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "project_blobs",
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "sha256", name="pk_project_blobs"),
    )
    op.execute(
        "INSERT INTO project_blobs (project_id, sha256) "
        "SELECT DISTINCT runs.project_id, checkpoint_files.sha256 FROM checkpoint_files "
        "JOIN checkpoints ON checkpoints.id = checkpoint_files.checkpoint_id "
        "JOIN runs ON runs.id = checkpoints.run_id "
        "UNION "
        "SELECT DISTINCT runs.project_id, run_files.sha256 FROM run_files "
        "JOIN runs ON runs.id = run_files.run_id"
    )


def downgrade() -> None:
    op.drop_table("project_blobs")
