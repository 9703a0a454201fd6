"""The job store: one SQLAlchemy table, SQLite by default, PostgreSQL for many nodes.

A job is *claimed* by a worker with a lease (owner id + expiry) that the
worker renews while it reports progress. A second delivery of the same job
(Dramatiq redelivers a dead worker's messages) can take it over only once the
lease has lapsed, so a job never runs twice at once and a killed worker's job
is finished by another. Every state change is one conditional ``UPDATE``,
which makes the transitions safe between processes without row locks.
"""

from __future__ import annotations

import base64
import binascii
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
    event,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service.models import JobPhase, JobStatus

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

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


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


def _make_engine(url: str) -> Engine:
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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    """All reads and state transitions of jobs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
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
        row = JobRow(
            id=new.id,
            status=JobStatus.queued.value,
            source_kind=new.source_kind,
            source_filename=new.source_filename,
            source_url=new.source_url,
            source_bytes=new.source_bytes,
            input_ready=new.input_ready,
            result_ext=new.result_ext,
            options=new.options,
            idempotency_key=new.idempotency_key,
            frames_total=new.frames_total,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
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
        with self._session() as s:
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def get_by_idempotency_key(self, key: str) -> JobRow | None:
        with self._session() as s:
            return s.scalar(select(JobRow).where(JobRow.idempotency_key == key))

    def list(
        self, status: JobStatus | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[JobRow], str | None]:
        """Newest first; returns the page and the cursor of the next one (or None)."""
        query = select(JobRow).order_by(JobRow.seq.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(JobRow.status == status.value)
        if cursor:
            query = query.where(JobRow.seq < decode_cursor(cursor))
        with self._session() as s:
            rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1].seq) if more and rows else None)

    def ids_with_status(self, *statuses: JobStatus) -> list[str]:
        with self._session() as s:
            query = select(JobRow.id).where(JobRow.status.in_([x.value for x in statuses]))
            return list(s.scalars(query.order_by(JobRow.seq)))

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
            return result.rowcount == 1

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
            return s.execute(query.values(**values)).rowcount == 1

    def requeue(self, job_id: str, owner: str | None, error: tuple[str, str] | None = None) -> bool:
        """Give a running job back to the queue (shutdown, or a retry after a transient error)."""
        query = update(JobRow).where(
            JobRow.id == job_id, JobRow.status == JobStatus.running.value
        )
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
            s.execute(
                update(JobRow)
                .where(running, live)
                .values(status=JobStatus.queued.value, phase=None, lease_owner=None,
                        lease_expires=None)
            )
            now = utcnow()
            s.execute(
                update(JobRow)
                .where(running, JobRow.cancel_requested.is_(True))
                .values(status=JobStatus.canceled.value, finished_at=now, updated_at=now,
                        lease_owner=None, lease_expires=None)
            )
        return ids

    # -- the API's side ------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Cancel: a queued job ends at once, a running one when its worker notices."""
        now = utcnow()
        with self._session() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.queued.value)
                .values(status=JobStatus.canceled.value, finished_at=now, updated_at=now,
                        cancel_requested=True)
            )
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
