"""Batches in the job store, on SQLite and on a real PostgreSQL server: one transaction
for the batch and its jobs (refused inputs stored as failed, with their webhook event),
idempotency, owner-filtered cursor pages, and the status derived from the jobs."""

from __future__ import annotations

import pytest

from service.jobs.batches import BatchStore, NewBatch, batch_status, status_counts
from service.jobs.database import Database
from service.jobs.outbox import WebhookOutbox
from service.jobs.status import BatchStatus, JobStatus
from service.jobs.storage import new_job_id
from service.jobs.store import JobStore, NewJob


def _jobs(batch_id: str, n: int, refused: set[int] = frozenset()) -> list[NewJob]:
    return [
        NewJob(
            id=new_job_id(),
            source_kind="upload",
            options={"stages": 1},
            source_filename=f"v{i}.mp4",
            batch_id=batch_id,
            owner_key="k1",
            webhook_url="http://hooks.example/h",
            error=("unsupported_input", "not a video") if i in refused else None,
        )
        for i in range(n)
    ]


def test_batch_and_jobs_in_one_transaction(database_url: str):
    db = Database(database_url)
    store, batches, outbox = JobStore(db), BatchStore(db), WebhookOutbox(db)
    try:
        new = NewBatch(id=new_job_id(), options={"stages": 1}, owner_key="k1", idempotency_key="i1")
        jobs = _jobs(new.id, 3, refused={1})
        row, created = batches.create(new, jobs)
        assert created and row.job_count == 3
        stored = batches.jobs([new.id])[new.id]
        assert [j.id for j in stored] == [j.id for j in jobs]  # submission order
        assert [j.status for j in stored] == ["queued", "failed", "queued"]
        failed = stored[1]
        assert (failed.error_code, failed.error_message) == ("unsupported_input", "not a video")
        assert failed.finished_at is not None and not failed.input_ready
        assert [e.type for e in outbox.events(failed.id)] == ["job.failed"]
        assert outbox.events(stored[0].id) == []
        assert batch_status(status_counts(stored)) is BatchStatus.running

        again, created = batches.create(
            NewBatch(id=new_job_id(), options={}, idempotency_key="i1"), []
        )
        assert not created and again.id == new.id

        for job in (stored[0], stored[2]):
            assert store.claim(job.id, "w", 30).value == "claimed"
            assert store.finish(job.id, "w", JobStatus.succeeded)
        assert batch_status(status_counts(batches.jobs([new.id])[new.id])) is BatchStatus.partial

        other = NewBatch(id=new_job_id(), options={}, owner_key="k2")
        batches.create(other, _jobs(other.id, 1))
        mine, cursor = batches.list(limit=10, owner="k1")
        assert [b.id for b in mine] == [new.id] and cursor is None
        page, cursor = batches.list(limit=1)
        assert [b.id for b in page] == [other.id] and cursor is not None
        rest, cursor = batches.list(limit=1, cursor=cursor)
        assert [b.id for b in rest] == [new.id] and cursor is None
        batches.mark_cancel(new.id)
        assert batches.get(new.id).cancel_requested
    finally:
        db.close()


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["queued", "queued"], "queued"),
        (["queued", "running"], "running"),
        (["queued", "failed"], "running"),
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed"], "partial"),
        (["succeeded", "canceled"], "partial"),
        (["failed", "canceled"], "failed"),
        (["canceled", "canceled"], "canceled"),
    ],
)
def test_batch_status_from_the_jobs(statuses: list[str], expected: str):
    counts = {s.value: 0 for s in JobStatus}
    for status in statuses:
        counts[status] += 1
    assert batch_status(counts) == expected
