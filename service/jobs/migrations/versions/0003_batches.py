"""Batches (issue 15): the ``batches`` table and ``jobs.batch_id``.

Only adds (a new table, a nullable column and its index): processes of the
previous version go on working on the upgraded schema.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("job_count", sa.Integer, nullable=False),
        sa.Column("owner_key", sa.String(64)),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("webhook_url", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
    )
    op.create_index("ix_batches_id", "batches", ["id"], unique=True)
    op.create_index("ix_batches_owner_key", "batches", ["owner_key"])
    op.add_column("jobs", sa.Column("batch_id", sa.String(32), nullable=True))
    op.create_index("ix_jobs_batch_id", "jobs", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("batch_id")
    op.drop_table("batches")
