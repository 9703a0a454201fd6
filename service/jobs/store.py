"""The jobs repository: every read and state transition of a job.

A job is *claimed* by a worker with a lease (owner id + expiry) that the
worker renews while it reports progress. A second delivery of the same job
(Dramatiq redelivers a dead worker's messages) can take it over only once the
lease has lapsed, so a job never runs twice at once and a killed worker's job
is finished by another. Every state change is one conditional ``UPDATE``,
which makes the transitions safe between processes without row locks.

Every update of a job bumps its ``revision`` (the id of ``/events`` messages).
A job that ends (or makes progress, when asked) with a ``webhook_url`` gets its
webhook event in the same transaction (:mod:`service.jobs.outbox`).

The job table is the source of truth for the queue: ``queue_sent_at`` records when a
job was last handed to the broker, and :meth:`JobStore.take_for_resend` lets the
reconciler (``service.jobs.queue_redis.Reconciler``) re-send, once across all
processes, the jobs the broker lost. The database and its sessions are
:class:`service.jobs.database.Database`; the table is
:class:`service.jobs.tables.JobRow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.jobs.database import Database, page, utcnow
from service.jobs.outbox import add_event, progress_event
from service.jobs.status import JobPhase, JobStatus
from service.jobs.tables import JobRow

FINISHED = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.canceled.value)


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


class JobStore:
    """All reads and state transitions of jobs, on one :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- create and read -----------------------------------------------------

    def create(self, new: NewJob) -> tuple[JobRow, bool]:
        """Insert a queued job; with an idempotency key already used, return that job.

        Returns ``(job, created)``.
        """

        def add(s: Session) -> JobRow:
            row = new_job_row(new)
            s.add(row)
            return row

        return self.db.create_once(new.idempotency_key, self.get_by_idempotency_key, add)

    def get(self, job_id: str) -> JobRow | None:
        with self.db.read() as s:
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def get_by_idempotency_key(self, key: str) -> JobRow | None:
        with self.db.read() as s:
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
        query = select(JobRow)
        if status is not None:
            query = query.where(JobRow.status == status.value)
        return page(self.db, query, JobRow, limit, cursor, owner, ownerless)

    def ids_with_status(self, *statuses: JobStatus) -> list[str]:
        with self.db.read() as s:
            query = select(JobRow.id).where(JobRow.status.in_([x.value for x in statuses]))
            return list(s.scalars(query.order_by(JobRow.seq)))

    # -- the queue: what the broker should hold ------------------------------

    def mark_sent(self, job_id: str) -> None:
        """The job was handed to the broker just now."""
        with self.db.write() as s:
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
        with self.db.read() as s:
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
        with self.db.write() as s:
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
        with self.db.write() as s:
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
        with self.db.write() as s:
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
            progress_event(s, job_id)
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
        with self.db.write() as s:
            if s.execute(query.values(**values)).rowcount != 1:
                return False
            add_event(s, job_id, f"job.{status.value}")
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
        with self.db.write() as s:
            return s.execute(query.values(**values)).rowcount == 1

    def set_input_ready(self, job_id: str, source_bytes: int | None) -> None:
        with self.db.write() as s:
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
        with self.db.write() as s:
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
                add_event(s, job_id, "job.canceled")
        return ids

    # -- the API's side ------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRow | None:
        """Cancel: a queued job ends at once, a running one when its worker notices."""
        now = utcnow()
        with self.db.write() as s:
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
                add_event(s, job_id, "job.canceled")
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.running.value)
                .values(cancel_requested=True, updated_at=now)
            )
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def mark_deleted(self, job_id: str) -> JobRow | None:
        with self.db.write() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(FINISHED))
                .values(deleted=True, updated_at=utcnow())
            )
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def expire_due(self, now: datetime | None = None) -> list[str]:
        """Mark finished jobs past their retention as expired; returns their ids."""
        now = now or utcnow()
        with self.db.write() as s:
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
