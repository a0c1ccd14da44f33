"""Table definitions: the one description of the schema that queries use.

Migrations in ``migrations/versions`` create exactly this; a test compares the
two so they cannot drift.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("prefix", String(8), nullable=False),
    # Numbers runs per project for display ids; bumped in the creating transaction.
    Column("run_counter", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id"), nullable=False),
    Column("number", Integer, nullable=True),
    Column("external_id", String(128), nullable=True),
    Column("name", String(256), nullable=False),
    Column("config", Text, nullable=False),
    Column("tags", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("forked_from_id", Integer, ForeignKey("runs.id"), nullable=True),
    Column("fork_step", BigInteger, nullable=True),
    # The run's own logged step range, kept on ingest so fork validation is one row read.
    Column("first_step", BigInteger, nullable=True),
    Column("last_step", BigInteger, nullable=True),
    # The unique constraint, not luck, makes "exactly one creator" hold under any concurrency.
    UniqueConstraint("project_id", "external_id", name="uq_runs_project_external"),
    UniqueConstraint("project_id", "number", name="uq_runs_project_number"),
)
Index("ix_runs_forked_from", runs.c.forked_from_id)

status_history = Table(
    "status_history",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("at", Float, nullable=False),
)
Index("ix_status_history_run", status_history.c.run_id)

metric_keys = Table(
    "metric_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    # Per project, so one key id spans every run of a lineage.
    Column("project_id", Integer, ForeignKey("projects.id"), nullable=False),
    Column("key", String(256), nullable=False),
    UniqueConstraint("project_id", "key", name="uq_metric_keys_project_key"),
)

run_keys = Table(
    "run_keys",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("metric_keys.id"), nullable=False),
    PrimaryKeyConstraint("run_id", "key_id", name="pk_run_keys"),
)

# Points are stored as columnar blocks: one row per (chunk, key), holding packed
# little-endian int64 steps, float64 values and float64 wall times. A block row
# costs the same to write for 1 or 10,000 points, and a query reads a few wide
# rows instead of a million narrow ones. NaN and +/-Inf survive bit for bit.
metric_blocks = Table(
    "metric_blocks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("metric_keys.id"), nullable=False),
    Column("writer", Integer, nullable=False),
    Column("step_min", BigInteger, nullable=False),
    Column("step_max", BigInteger, nullable=False),
    Column("n", Integer, nullable=False),
    Column("steps", LargeBinary, nullable=False),
    Column("vals", LargeBinary, nullable=False),
    Column("times", LargeBinary, nullable=False),
)
Index("ix_metric_blocks_run_key_step", metric_blocks.c.run_id, metric_blocks.c.key_id,
      metric_blocks.c.step_min)

# One row per applied chunk: the primary key is the idempotency key.
ingest_log = Table(
    "ingest_log",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("session", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("applied_at", Float, nullable=False),
    PrimaryKeyConstraint("run_id", "session", "seq", name="pk_ingest_log"),
)

log_lines = Table(
    "log_lines",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("writer", Integer, nullable=False),
    Column("time", Float, nullable=False),
    Column("stream", Integer, nullable=False),
    Column("line", Text, nullable=False),
)
Index("ix_log_lines_run", log_lines.c.run_id, log_lines.c.id)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    # The public part of the key, used to find the row; the secret part is only hashed.
    Column("lookup", String(16), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False),
    Column("project", String(100), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

# Blobs are content-addressed (see ``blobs.py``): a row means the store holds the bytes,
# whole and verified. Checkpoints and files name blobs, so a forked checkpoint shares them.
blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    # A forked checkpoint: the checkpoint it copies (run and step), or the bucket it was
    # imported from.
    Column("source_run_id", Integer, ForeignKey("runs.id"), nullable=True),
    Column("source_step", BigInteger, nullable=True),
    Column("source_uri", Text, nullable=True),
    UniqueConstraint("run_id", "step", name="uq_checkpoints_run_step"),
)

checkpoint_files = Table(
    "checkpoint_files",
    metadata,
    Column("checkpoint_id", Integer, ForeignKey("checkpoints.id"), nullable=False),
    Column("path", String(1024), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    PrimaryKeyConstraint("checkpoint_id", "path", name="pk_checkpoint_files"),
)

run_files = Table(
    "run_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False),
    Column("name", String(1024), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    Column("step", BigInteger, nullable=True),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("run_id", "name", name="uq_run_files_run_name"),
)

# The projects that may name a blob in their files and checkpoints: those that uploaded its
# bytes, or copied a checkpoint naming it from a run the caller could read. Blobs are stored
# once for the whole server; without this, a key limited to one project could commit, then
# download, another project's blob by its SHA-256 alone (found by a security review).
project_blobs = Table(
    "project_blobs",
    metadata,
    Column("project_id", Integer, ForeignKey("projects.id"), nullable=False),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    PrimaryKeyConstraint("project_id", "sha256", name="pk_project_blobs"),
)
