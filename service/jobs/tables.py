"""The tables of the job database (SQLAlchemy ORM models).

``jobs`` (one row per job: its state, lease, progress, options and outcome),
``batches`` (the groups of ``POST /v1/batches``; their jobs point at them with
``jobs.batch_id``), ``webhook_events`` (the webhook outbox) and ``workers`` (the
heartbeats of live job runners). The queries live in the repositories
(:mod:`service.jobs.store`, :mod:`service.jobs.batches`, :mod:`service.jobs.outbox`,
:mod:`service.jobs.workers`, :mod:`service.jobs.counts`). A change here needs a new
revision in ``service/jobs/migrations/versions/``:
``tests/service/test_store_migrations.py`` checks that the migrated schema equals these
models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String, Text, false, literal_column
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.jobs.database import UTCDateTime, utcnow
from service.jobs.status import JobStatus


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One job; see :class:`service.models.Job` for the meaning of the fields."""

    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.queued.value)
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    frames_done: Mapped[int] = mapped_column(Integer, default=0)
    frames_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    fps: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    expired: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    source_kind: Mapped[str] = mapped_column(String(8))
    source_filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    source_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input_ready: Mapped[bool] = mapped_column(Boolean, default=True)
    result_ext: Mapped[str] = mapped_column(String(8), default=".mp4")
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Bumped by every UPDATE: the id of the job's /events messages.
    revision: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", onupdate=literal_column("revision") + 1
    )
    owner_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_progress: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    webhook_decile: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Last hand-over to the broker (submit or reconciler); None: never sent (queue was down).
    queue_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The batch the job was submitted in (POST /v1/batches), if any.
    batch_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


class WebhookEvent(Base):
    """One webhook delivery: created with the job change it reports, sent until a 2xx."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evt_<hex>: the dedupe key
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    body: Mapped[str | None] = mapped_column(Text, nullable=True)  # fixed at the first attempt
    state: Mapped[str] = mapped_column(String(12), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WorkerRow(Base):
    """A live job runner (executor or `vqe worker` process) and its thread count."""

    __tablename__ = "workers"

    identity: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    threads: Mapped[int] = mapped_column(Integer, default=1)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class BatchRow(Base):
    """A batch: several jobs submitted together (``POST /v1/batches``) with shared options.

    Its status and progress are not stored: they are read from its jobs
    (``jobs.batch_id``), which run and end one by one like any other job."""

    __tablename__ = "batches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    owner_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
