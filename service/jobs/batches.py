"""Batches in the job store: several jobs submitted together, one row that groups them.

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

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from service.jobs.status import BatchStatus, JobStatus
from service.jobs.store import (
    BatchRow,
    JobRow,
    JobStore,
    NewJob,
    _add_event,
    decode_cursor,
    encode_cursor,
    new_job_row,
    utcnow,
)

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
    """Reads and writes of batches, on the job store's database."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def create(self, new: NewBatch, jobs: Sequence[NewJob]) -> tuple[BatchRow, bool]:
        """Insert the batch and its jobs at once; with an idempotency key already used,
        return that batch instead. Returns ``(batch, created)``."""
        if new.idempotency_key:
            existing = self.get_by_idempotency_key(new.idempotency_key)
            if existing is not None:
                return existing, False
        now = utcnow()
        batch = BatchRow(
            id=new.id,
            created_at=now,
            options=new.options,
            job_count=len(jobs),
            owner_key=new.owner_key,
            idempotency_key=new.idempotency_key,
            webhook_url=new.webhook_url,
            cancel_requested=False,
        )
        try:
            with self.store._session() as s:
                s.add(batch)
                for job in jobs:
                    s.add(new_job_row(job))
                s.flush()
                for job in jobs:
                    if job.error is not None:
                        _add_event(s, job.id, "job.failed")
        except IntegrityError:
            existing = self.get_by_idempotency_key(new.idempotency_key or "")
            if existing is None:
                raise
            return existing, False
        return batch, True

    def get(self, batch_id: str) -> BatchRow | None:
        with self.store._read() as s:
            return s.scalar(select(BatchRow).where(BatchRow.id == batch_id))

    def get_by_idempotency_key(self, key: str) -> BatchRow | None:
        with self.store._read() as s:
            return s.scalar(select(BatchRow).where(BatchRow.idempotency_key == key))

    def jobs(self, batch_ids: Sequence[str]) -> dict[str, list[JobRow]]:
        """The jobs of each batch, in submission order."""
        out: dict[str, list[JobRow]] = {b: [] for b in batch_ids}
        if not batch_ids:
            return out
        with self.store._read() as s:
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
        query = select(BatchRow).order_by(BatchRow.seq.desc()).limit(limit + 1)
        if owner is not None and ownerless:
            query = query.where(or_(BatchRow.owner_key == owner, BatchRow.owner_key.is_(None)))
        elif owner is not None:
            query = query.where(BatchRow.owner_key == owner)
        if cursor:
            query = query.where(BatchRow.seq < decode_cursor(cursor))
        with self.store._read() as s:
            rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1].seq) if more and rows else None)

    def mark_cancel(self, batch_id: str) -> None:
        with self.store._session() as s:
            s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(cancel_requested=True))
