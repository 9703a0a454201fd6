"""The job store: one SQLAlchemy table, SQLite by default, PostgreSQL for many nodes.

A job is *claimed* by a worker with a lease (owner id + expiry) that the
worker renews while it reports progress. A second delivery of the same job
(Dramatiq redelivers a dead worker's messages) can take it over only once the
lease has lapsed, so a job never runs twice at once and a killed worker's job
is finished by another. Every state change is one conditional ``UPDATE``,
which makes the transitions safe between processes without row locks.

Every update of a job bumps its ``revision`` (the id of ``/events`` messages).
A job that ends (or makes progress, when asked) with a ``webhook_url`` gets a
:class:`WebhookEvent` row in the same transaction: an outbox that whichever
process runs :class:`service.webhooks.WebhookDispatcher` delivers. The
``workers`` table holds the heartbeats of live job runners (for metrics); the
``batches`` table the batches of ``POST /v1/batches``, whose jobs point at them
(``jobs.batch_id``; see :mod:`service.jobs.batches`).

The store is the source of truth for the queue: ``queue_sent_at`` records when a
job was last handed to the broker, and :meth:`JobStore.take_for_resend` lets the
reconciler (``service.jobs.queue_redis.Reconciler``) re-send, once across all
processes, the jobs the broker lost. The schema is versioned with Alembic
(:mod:`service.jobs.migrations`); opening a store checks it and upgrades an
older one.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    delete,
    event,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service.jobs.status import JobPhase, JobStatus

FINISHED = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.canceled.value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


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


class Claim(StrEnum):
    """Outcome of :meth:`JobStore.claim`."""

    claimed = "claimed"  # the caller now runs the job
    finished = "finished"  # nothing to do: done, canceled or deleted
    held = "held"  # another worker holds a live lease
    missing = "missing"  # no such job


@dataclass(frozen=True)
class NewJob:
    """What the API knows about a job when it is submitted."""

    id: str
    source_kind: str
    options: dict[str, Any]
    source_filename: str | None = None
    source_url: str | None = None
    source_bytes: int | None = None
    input_ready: bool = True
    result_ext: str = ".mp4"
    idempotency_key: str | None = None
    frames_total: int | None = None
    owner_key: str | None = None
    webhook_url: str | None = None
    webhook_progress: bool = False
    batch_id: str | None = None
    # (code, message): the input was refused at submit; the job is stored as failed
    # (a batch keeps the other inputs going), with ``expires_at`` like any failed job.
    error: tuple[str, str] | None = None
    expires_at: datetime | None = None


def new_job_row(new: NewJob) -> JobRow:
    """The row of a job being submitted: queued, or failed when ``new.error`` says so."""
    now = utcnow()
    failed = new.error is not None
    return JobRow(
        id=new.id,
        status=(JobStatus.failed if failed else JobStatus.queued).value,
        source_kind=new.source_kind,
        source_filename=new.source_filename,
        source_url=new.source_url,
        source_bytes=new.source_bytes,
        input_ready=new.input_ready and not failed,
        result_ext=new.result_ext,
        options=new.options,
        idempotency_key=new.idempotency_key,
        frames_total=new.frames_total,
        owner_key=new.owner_key,
        webhook_url=new.webhook_url,
        webhook_progress=new.webhook_progress,
        batch_id=new.batch_id,
        error_code=new.error[0] if failed else None,
        error_message=new.error[1] if failed else None,
        finished_at=now if failed else None,
        expires_at=new.expires_at if failed else None,
        revision=0,
        created_at=now,
        updated_at=now,
    )


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number in a cursor; ``ValueError`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("malformed cursor") from None
    if not raw.startswith("s") or not raw[1:].isdigit():
        raise ValueError("malformed cursor")
    return int(raw[1:])


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below open transactions, and wait on locks.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock up front: a deferred transaction that reads and then
            # writes fails at once (SQLITE_BUSY) when another process wrote meanwhile.
            # Read-only sessions (:meth:`JobStore._read`) need no lock: WAL gives them a
            # snapshot while writers go on.
            read_only = conn.get_execution_options().get("vqe_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    """All reads and state transitions of jobs."""

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        """Open the store at ``url``; its schema is checked and (``upgrade``) brought up to
        date (see :func:`service.jobs.migrations.ensure_schema`)."""
        from service.jobs.migrations import ensure_schema

        self.url = url
        self.engine = make_engine(url)
        try:
            ensure_schema(self.engine, upgrade=upgrade)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(
            self.engine.execution_options(vqe_read_only=True), expire_on_commit=False
        )

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A session that only reads (no write lock on SQLite)."""
        with self._reads.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._session() as s:
            s.execute(text("SELECT 1"))

    # -- create and read -----------------------------------------------------

    def create(self, new: NewJob) -> tuple[JobRow, bool]:
        """Insert a queued job; with an idempotency key already used, return that job.

        Returns ``(job, created)``.
        """
        if new.idempotency_key:
            existing = self.get_by_idempotency_key(new.idempotency_key)
            if existing is not None:
                return existing, False
        row = new_job_row(new)
        try:
            with self._session() as s:
                s.add(row)
        except IntegrityError:
            # Lost a race with a request carrying the same key.
            existing = self.get_by_idempotency_key(new.idempotency_key or "")
            if existing is None:
                raise
            return existing, False
        return row, True

    def get(self, job_id: str) -> JobRow | None:
        with self._read() as s:
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def get_by_idempotency_key(self, key: str) -> JobRow | None:
        with self._read() as s:
            return s.scalar(select(JobRow).where(JobRow.idempotency_key == key))

    def list(
        self,
        status: JobStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: str | None = None,
        ownerless: bool = False,
    ) -> tuple[list[JobRow], str | None]:
        """Newest first; returns the page and the cursor of the next one (or None).
        ``owner``: only the jobs of that API key id (and, with ``ownerless``, the jobs
        made while keys were off)."""
        query = select(JobRow).order_by(JobRow.seq.desc()).limit(limit + 1)
        if owner is not None and ownerless:
            query = query.where(or_(JobRow.owner_key == owner, JobRow.owner_key.is_(None)))
        elif owner is not None:
            query = query.where(JobRow.owner_key == owner)
        if status is not None:
            query = query.where(JobRow.status == status.value)
        if cursor:
            query = query.where(JobRow.seq < decode_cursor(cursor))
        with self._read() as s:
            rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1].seq) if more and rows else None)

    def ids_with_status(self, *statuses: JobStatus) -> list[str]:
        with self._read() as s:
            query = select(JobRow.id).where(JobRow.status.in_([x.value for x in statuses]))
            return list(s.scalars(query.order_by(JobRow.seq)))

    # -- the queue: what the broker should hold ------------------------------

    def mark_sent(self, job_id: str) -> None:
        """The job was handed to the broker just now."""
        with self._session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(queue_sent_at=utcnow(), revision=JobRow.revision)  # no /events message
            )

    def resend_candidates(self, quiet: float, lease_grace: float) -> list[str]:
        """Jobs the broker should hold a message for, oldest first: queued ones not sent
        (or re-sent) for ``quiet`` seconds, and running ones whose lease lapsed more than
        ``lease_grace`` seconds ago (a worker died and its message may be gone too)."""
        now = utcnow()
        quiet_since = now - timedelta(seconds=quiet)
        not_recent = or_(JobRow.queue_sent_at.is_(None), JobRow.queue_sent_at < quiet_since)
        queued = (JobRow.status == JobStatus.queued.value) & (JobRow.updated_at < quiet_since)
        lapsed = (JobRow.status == JobStatus.running.value) & (
            JobRow.lease_expires < now - timedelta(seconds=lease_grace)
        )
        with self._read() as s:
            query = select(JobRow.id).where(
                or_(queued, lapsed),
                not_recent,
                JobRow.deleted.is_(False),
                JobRow.cancel_requested.is_(False),
            )
            return list(s.scalars(query.order_by(JobRow.seq)))

    def take_for_resend(self, job_id: str, quiet: float) -> bool:
        """Mark ``job_id`` as re-sent now, unless another process did so in the last
        ``quiet`` seconds or it no longer needs a message; True: the caller sends it."""
        now = utcnow()
        with self._session() as s:
            result = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.status.in_([JobStatus.queued.value, JobStatus.running.value]),
                    or_(
                        JobRow.queue_sent_at.is_(None),
                        JobRow.queue_sent_at < now - timedelta(seconds=quiet),
                    ),
                )
                .values(queue_sent_at=now, revision=JobRow.revision)
            )
            return result.rowcount == 1

    # -- the worker's side ---------------------------------------------------

    def claim(self, job_id: str, owner: str, lease: float) -> Claim:
        """Start (or take over) a job: queued, or running with a lapsed lease."""
        now = utcnow()
        with self._session() as s:
            result = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.cancel_requested.is_(False),
                    JobRow.deleted.is_(False),
                    or_(
                        JobRow.status == JobStatus.queued.value,
                        (JobRow.status == JobStatus.running.value)
                        & or_(
                            JobRow.lease_expires.is_(None),
                            JobRow.lease_expires < now,
                            JobRow.lease_owner == owner,
                        ),
                    ),
                )
                .values(
                    status=JobStatus.running.value,
                    phase=JobPhase.probing.value,
                    lease_owner=owner,
                    lease_expires=now + timedelta(seconds=lease),
                    attempts=JobRow.attempts + 1,
                    started_at=now,
                    updated_at=now,
                    frames_done=0,
                    fps=None,
                    eta_seconds=None,
                    error_code=None,
                    error_message=None,
                )
            )
            if result.rowcount == 1:
                return Claim.claimed
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
        if row is None:
            return Claim.missing
        if row.status == JobStatus.running.value and not row.cancel_requested:
            return Claim.held
        if row.status == JobStatus.running.value:
            # Canceled while its worker died: nobody else will close it.
            self.finish(job_id, None, JobStatus.canceled)
        return Claim.finished

    def lease_expiry(self, job_id: str) -> datetime | None:
        row = self.get(job_id)
        return None if row is None else row.lease_expires

    def report(
        self,
        job_id: str,
        owner: str,
        lease: float,
        **progress: Any,
    ) -> bool:
        """Renew the lease and store progress; False when the worker must stop
        (the job was canceled, deleted, or taken over by another worker)."""
        now = utcnow()
        with self._session() as s:
            result = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.lease_owner == owner,
                    JobRow.status == JobStatus.running.value,
                    JobRow.cancel_requested.is_(False),
                )
                .values(lease_expires=now + timedelta(seconds=lease), updated_at=now, **progress)
            )
            if result.rowcount != 1:
                return False
            _progress_event(s, job_id)
            return True

    def finish(
        self,
        job_id: str,
        owner: str | None,
        status: JobStatus,
        *,
        error: tuple[str, str] | None = None,
        stats: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> bool:
        """Close a running job (only by its lease owner, when ``owner`` is given)."""
        now = utcnow()
        query = update(JobRow).where(JobRow.id == job_id, JobRow.status.not_in(FINISHED))
        if owner is not None:
            query = query.where(JobRow.lease_owner == owner)
        values: dict[str, Any] = {
            "status": status.value,
            "finished_at": now,
            "updated_at": now,
            "lease_owner": None,
            "lease_expires": None,
            "eta_seconds": None,
            "expires_at": expires_at,
        }
        if error is not None:
            values["error_code"], values["error_message"] = error
        if stats is not None:
            values["stats"] = stats
            if "frames" in stats:
                values["frames_done"] = stats["frames"]
        if status is JobStatus.succeeded:
            values["phase"] = None
            values["input_ready"] = False
        with self._session() as s:
            if s.execute(query.values(**values)).rowcount != 1:
                return False
            _add_event(s, job_id, f"job.{status.value}")
            return True

    def requeue(self, job_id: str, owner: str | None, error: tuple[str, str] | None = None) -> bool:
        """Give a running job back to the queue (shutdown, or a retry after a transient error)."""
        query = update(JobRow).where(JobRow.id == job_id, JobRow.status == JobStatus.running.value)
        if owner is not None:
            query = query.where(JobRow.lease_owner == owner)
        values: dict[str, Any] = {
            "status": JobStatus.queued.value,
            "phase": None,
            "lease_owner": None,
            "lease_expires": None,
            "updated_at": utcnow(),
        }
        if error is not None:
            values["error_code"], values["error_message"] = error
        with self._session() as s:
            return s.execute(query.values(**values)).rowcount == 1

    def set_input_ready(self, job_id: str, source_bytes: int | None) -> None:
        with self._session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(input_ready=True, source_bytes=source_bytes)
            )

    def requeue_all_running(self) -> list[str]:
        """After a restart of the embedded server: its running jobs go back to the queue
        (those canceled while it was down end as canceled). Returns the requeued ids."""
        running = JobRow.status == JobStatus.running.value
        live = JobRow.cancel_requested.is_(False)
        with self._session() as s:
            ids = list(s.scalars(select(JobRow.id).where(running, live)))
            dropped = list(s.scalars(select(JobRow.id).where(running, ~live)))
            s.execute(
                update(JobRow)
                .where(running, live)
                .values(
                    status=JobStatus.queued.value, phase=None, lease_owner=None, lease_expires=None
                )
            )
            now = utcnow()
            s.execute(
                update(JobRow)
                .where(running, JobRow.cancel_requested.is_(True))
                .values(
                    status=JobStatus.canceled.value,
                    finished_at=now,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires=None,
                )
            )
            for job_id in dropped:
                _add_event(s, job_id, "job.canceled")
        return ids

    # -- the API's side ------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Cancel: a queued job ends at once, a running one when its worker notices."""
        now = utcnow()
        with self._session() as s:
            canceled = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.queued.value)
                .values(
                    status=JobStatus.canceled.value,
                    finished_at=now,
                    updated_at=now,
                    cancel_requested=True,
                )
            ).rowcount
            if canceled == 1:
                _add_event(s, job_id, "job.canceled")
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.running.value)
                .values(cancel_requested=True, updated_at=now)
            )
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def mark_deleted(self, job_id: str) -> JobRow | None:
        with self._session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(FINISHED))
                .values(deleted=True, updated_at=utcnow())
            )
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def expire_due(self, now: datetime | None = None) -> list[str]:
        """Mark finished jobs past their retention as expired; returns their ids."""
        now = now or utcnow()
        with self._session() as s:
            ids = list(
                s.scalars(
                    select(JobRow.id).where(
                        JobRow.expires_at.is_not(None),
                        JobRow.expires_at <= now,
                        JobRow.expired.is_(False),
                    )
                )
            )
            if ids:
                s.execute(update(JobRow).where(JobRow.id.in_(ids)).values(expired=True))
        return ids

    # -- webhook outbox ------------------------------------------------------

    def claim_webhooks(self, owner: str, lease: float, limit: int = 20) -> list[WebhookEvent]:
        """Due deliveries, each leased to ``owner`` so no other process sends it meanwhile."""
        now = utcnow()
        with self._session() as s:
            ids = list(
                s.scalars(
                    select(WebhookEvent.id)
                    .where(
                        WebhookEvent.state == "pending",
                        WebhookEvent.next_attempt_at <= now,
                        or_(WebhookEvent.lease_expires.is_(None), WebhookEvent.lease_expires < now),
                    )
                    .order_by(WebhookEvent.created_at)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(ids))
                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease))
            )
            return list(
                s.scalars(
                    select(WebhookEvent)
                    .where(WebhookEvent.id.in_(ids))
                    .order_by(WebhookEvent.created_at)
                )
            )

    def set_webhook_body(self, event_id: str, body: str) -> str:
        """Fix the body of a delivery at its first attempt; returns the stored body."""
        with self._session() as s:
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, WebhookEvent.body.is_(None))
                .values(body=body)
            )
            return s.scalar(select(WebhookEvent.body).where(WebhookEvent.id == event_id)) or body

    def webhook_attempted(
        self,
        event_id: str,
        owner: str,
        *,
        delivered: bool,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """Record an attempt: delivered, to retry at ``retry_at``, or given up (neither)."""
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": WebhookEvent.attempts + 1,
            "lease_owner": None,
            "lease_expires": None,
            "last_error": error,
        }
        if delivered:
            values.update(state="delivered", delivered_at=now)
        elif retry_at is not None:
            values["next_attempt_at"] = retry_at
        else:
            values["state"] = "failed"
        with self._session() as s:
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, WebhookEvent.lease_owner == owner)
                .values(**values)
            )

    def webhook_events(self, job_id: str) -> list[WebhookEvent]:
        with self._read() as s:
            query = select(WebhookEvent).where(WebhookEvent.job_id == job_id)
            return list(s.scalars(query.order_by(WebhookEvent.created_at)))

    # -- workers and counts (metrics) ----------------------------------------

    def beat(self, identity: str, kind: str, threads: int) -> None:
        """Record that the runner ``identity`` is alive."""
        with self._session() as s:
            row = s.get(WorkerRow, identity)
            if row is None:
                s.add(WorkerRow(identity=identity, kind=kind, threads=threads, seen_at=utcnow()))
            else:
                row.seen_at, row.threads = utcnow(), threads

    def forget_worker(self, identity: str) -> None:
        with self._session() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.identity == identity))

    def live_workers(self, since: datetime) -> dict[str, int]:
        """Worker threads per kind among the runners seen since ``since``."""
        with self._read() as s:
            rows = s.execute(
                select(WorkerRow.kind, func.sum(WorkerRow.threads))
                .where(WorkerRow.seen_at >= since)
                .group_by(WorkerRow.kind)
            )
            return {kind: int(n or 0) for kind, n in rows}

    def counts(self) -> dict[str, Any]:
        """Jobs per status, frames of succeeded jobs, summed fps of running jobs, webhooks."""
        with self._read() as s:
            by_status = dict(
                s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
            )
            frames = s.scalar(
                select(func.coalesce(func.sum(JobRow.frames_done), 0)).where(
                    JobRow.status == JobStatus.succeeded.value
                )
            )
            fps = s.scalar(
                select(func.coalesce(func.sum(JobRow.fps), 0.0)).where(
                    JobRow.status == JobStatus.running.value
                )
            )
            hooks = dict(
                s.execute(
                    select(WebhookEvent.state, func.count()).group_by(WebhookEvent.state)
                ).all()
            )
        return {
            "jobs": {k: int(v) for k, v in by_status.items()},
            "frames": int(frames or 0),
            "fps": float(fps or 0.0),
            "webhooks": {k: int(v) for k, v in hooks.items()},
        }


def _add_event(s: Session, job_id: str, type_: str) -> None:
    """Queue a webhook delivery for ``job_id`` (in the caller's transaction), if it has one."""
    url = s.scalar(select(JobRow.webhook_url).where(JobRow.id == job_id))
    if url:
        s.add(
            WebhookEvent(
                id=f"evt_{uuid.uuid4().hex}",
                job_id=job_id,
                type=type_,
                url=url,
                created_at=utcnow(),
                next_attempt_at=utcnow(),
            )
        )


def _progress_event(s: Session, job_id: str) -> None:
    """A ``job.progress`` delivery each time a job with ``webhook_progress`` passes 10 %."""
    row = s.execute(
        select(
            JobRow.webhook_progress, JobRow.webhook_decile, JobRow.frames_done, JobRow.frames_total
        ).where(JobRow.id == job_id)
    ).one_or_none()
    if row is None or not row.webhook_progress or not row.frames_total:
        return
    decile = min(9, (row.frames_done or 0) * 10 // row.frames_total)
    if decile <= row.webhook_decile:
        return
    s.execute(update(JobRow).where(JobRow.id == job_id).values(webhook_decile=decile))
    _add_event(s, job_id, "job.progress")
