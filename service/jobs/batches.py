"""The batches repository: several jobs submitted together, one row that groups them.

A batch is created in one transaction with all of its jobs (:meth:`BatchStore.create`):
the inputs that were refused at submit are jobs that are already ``failed`` (with
their ``job.failed`` webhook event, as any failed job), the others are ``queued``
and run like any job. Nothing about a batch's progress is stored on the batch: its
status is read from its jobs (:func:`batch_status`), so the executors and workers
need not know about batches at all. ``Idempotency-Key`` and ownership work as for
jobs: the key is the batch's, and every job of the batch has the batch's owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.jobs.database import Database, page, utcnow
from service.jobs.outbox import add_event
from service.jobs.status import BatchStatus, JobStatus
from service.jobs.store import NewJob, new_job_row
from service.jobs.tables import BatchRow, JobRow

__all__ = ["BatchStatus", "BatchStore", "NewBatch", "batch_status", "status_counts"]


def status_counts(jobs: Iterable[JobRow]) -> dict[str, int]:
    """Jobs per status, every status present (0 when none)."""
    counts = {s.value: 0 for s in JobStatus}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


def batch_status(counts: dict[str, int]) -> BatchStatus:
    """The batch's status from :func:`status_counts` of its jobs."""
    unfinished = counts.get("queued", 0) + counts.get("running", 0)
    total = sum(counts.values())
    if unfinished:
        return BatchStatus.queued if counts.get("queued", 0) == total else BatchStatus.running
    ok, failed = counts.get("succeeded", 0), counts.get("failed", 0)
    if total and ok == total:
        return BatchStatus.succeeded
    if ok:
        return BatchStatus.partial
    return BatchStatus.failed if failed else BatchStatus.canceled


@dataclass(frozen=True)
class NewBatch:
    """What the API knows about a batch when it is submitted."""

    id: str
    options: dict[str, Any]
    owner_key: str | None = None
    idempotency_key: str | None = None
    webhook_url: str | None = None


class BatchStore:
    """Reads and writes of batches, on the :class:`Database` the jobs are in."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, new: NewBatch, jobs: Sequence[NewJob]) -> tuple[BatchRow, bool]:
        """Insert the batch and its jobs at once; with an idempotency key already used,
        return that batch instead. Returns ``(batch, created)``."""

        def add(s: Session) -> BatchRow:
            batch = BatchRow(
                id=new.id,
                created_at=utcnow(),
                options=new.options,
                job_count=len(jobs),
                owner_key=new.owner_key,
                idempotency_key=new.idempotency_key,
                webhook_url=new.webhook_url,
                cancel_requested=False,
            )
            s.add(batch)
            for job in jobs:
                s.add(new_job_row(job))
            s.flush()
            for job in jobs:
                if job.error is not None:
                    add_event(s, job.id, "job.failed")
            return batch

        return self.db.create_once(new.idempotency_key, self.get_by_idempotency_key, add)

    def get(self, batch_id: str) -> BatchRow | None:
        with self.db.read() as s:
            return s.scalar(select(BatchRow).where(BatchRow.id == batch_id))

    def get_by_idempotency_key(self, key: str) -> BatchRow | None:
        with self.db.read() as s:
            return s.scalar(select(BatchRow).where(BatchRow.idempotency_key == key))

    def jobs(self, batch_ids: Sequence[str]) -> dict[str, list[JobRow]]:
        """The jobs of each batch, in submission order."""
        out: dict[str, list[JobRow]] = {b: [] for b in batch_ids}
        if not batch_ids:
            return out
        with self.db.read() as s:
            rows = s.scalars(
                select(JobRow).where(JobRow.batch_id.in_(list(batch_ids))).order_by(JobRow.seq)
            )
            for row in rows:
                out[row.batch_id or ""].append(row)
        return out

    def list(
        self,
        limit: int = 50,
        cursor: str | None = None,
        owner: str | None = None,
        ownerless: bool = False,
    ) -> tuple[list[BatchRow], str | None]:
        """Newest first, as :meth:`JobStore.list`: the page and the next cursor (or None)."""
        return page(self.db, select(BatchRow), BatchRow, limit, cursor, owner, ownerless)

    def mark_cancel(self, batch_id: str) -> None:
        with self.db.write() as s:
            s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(cancel_requested=True))
