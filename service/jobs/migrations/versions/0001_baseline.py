"""Baseline: the schema of the releases before migrations (``create_all`` at commit 17c8c87).

Idempotent on purpose: a database made by ``create_all`` (no ``alembic_version``)
gets only what it lacks. Databases patched in place by the old column adder have
every column but not the ``ix_jobs_owner_key`` index; this creates it.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A frozen copy of the tables (not the models: those move on with later revisions).
META = sa.MetaData()
sa.Table(
    "jobs",
    META,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("phase", sa.String(16)),
    sa.Column("frames_done", sa.Integer, nullable=False),
    sa.Column("frames_total", sa.Integer),
    sa.Column("fps", sa.Float),
    sa.Column("eta_seconds", sa.Float),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("expires_at", sa.DateTime),
    sa.Column("expired", sa.Boolean, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("source_kind", sa.String(8), nullable=False),
    sa.Column("source_filename", sa.String(255)),
    sa.Column("source_url", sa.Text),
    sa.Column("source_bytes", sa.Integer),
    sa.Column("input_ready", sa.Boolean, nullable=False),
    sa.Column("result_ext", sa.String(8), nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("stats", sa.JSON),
    sa.Column("idempotency_key", sa.String(255), unique=True),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires", sa.DateTime),
    # Added after the first releases (the old column adder put them in place):
    sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("owner_key", sa.String(64)),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_progress", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("webhook_decile", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_jobs_id", "id", unique=True),
    sa.Index("ix_jobs_status", "status"),
    sa.Index("ix_jobs_expires_at", "expires_at"),
    sa.Index("ix_jobs_owner_key", "owner_key"),
)
sa.Table(
    "webhook_events",
    META,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("body", sa.Text),
    sa.Column("state", sa.String(12), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.DateTime, nullable=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires", sa.DateTime),
    sa.Column("last_error", sa.Text),
    sa.Column("delivered_at", sa.DateTime),
    sa.Index("ix_webhook_events_job_id", "job_id"),
    sa.Index("ix_webhook_events_state", "state"),
    sa.Index("ix_webhook_events_next_attempt_at", "next_attempt_at"),
)
sa.Table(
    "workers",
    META,
    sa.Column("identity", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    sa.Column("seen_at", sa.DateTime, nullable=False),
    sa.Index("ix_workers_seen_at", "seen_at"),
)


def upgrade() -> None:
    bind = op.get_bind()
    for table in META.sorted_tables:
        inspector = sa.inspect(bind)
        if not inspector.has_table(table.name):
            table.create(bind)
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                op.add_column(table.name, column._copy())
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                columns = [c.name for c in index.columns]
                op.create_index(index.name, table.name, columns, unique=index.unique)


def downgrade() -> None:
    for table in reversed(META.sorted_tables):
        op.drop_table(table.name)
