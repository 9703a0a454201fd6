"""Job and batch rows as the API shows them (``Job``, ``Batch``); used by the routes, the
event stream and the webhook sender. Imports no web framework."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from enhancer.options import EnhanceOptions
from service.api.schemas import (
    Batch,
    BatchJob,
    BatchLinks,
    Job,
    JobLinks,
    JobPhase,
    JobSource,
    JobStats,
    JobStatus,
)
from service.jobs.batches import batch_status, status_counts
from service.jobs.database import utcnow
from service.jobs.tables import BatchRow, JobRow

API_PREFIX = "/v1"


def job_model(row: JobRow) -> Job:
    status = JobStatus(row.status)
    progress = None
    if status is JobStatus.succeeded:
        progress = 1.0
    elif row.frames_total:
        progress = round(min(1.0, row.frames_done / row.frames_total), 4)
    expired = row.expired or (
        status.finished and row.expires_at is not None and row.expires_at <= utcnow()
    )
    base = f"{API_PREFIX}/jobs/{row.id}"
    stats = None
    if row.stats:
        stats = JobStats.model_validate(
            {k: v for k, v in row.stats.items() if k in JobStats.model_fields}
        )
    error = None
    if row.error_code:
        error = {"code": row.error_code, "message": row.error_message or row.error_code}
    return Job(
        id=row.id,
        status=status,
        phase=JobPhase(row.phase) if row.phase and status is JobStatus.running else None,
        progress=progress,
        frames_done=row.frames_done or 0,
        frames_total=row.frames_total,
        fps=row.fps,
        eta_seconds=row.eta_seconds,
        error=error,
        attempts=row.attempts or 0,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
        expired=expired,
        deleted=row.deleted,
        cancel_requested=row.cancel_requested,
        source=JobSource(
            kind=row.source_kind,
            filename=row.source_filename,  # type: ignore[arg-type]
            url=_redacted(row.source_url),
            bytes=row.source_bytes,
        ),
        options=EnhanceOptions.model_validate(row.options),
        stats=stats,
        webhook_url=_redacted(row.webhook_url),
        batch_id=row.batch_id,
        links=JobLinks(self=base, result=f"{base}/result", cancel=base),
    )


def batch_model(batch: BatchRow, jobs: list[JobRow]) -> Batch:
    """A batch and, in short, each of its jobs; status and progress come from the jobs."""
    models = [job_model(row) for row in jobs]
    counts = status_counts(jobs)
    done = sum(1.0 if m.status.finished else (m.progress or 0.0) for m in models)
    base = f"{API_PREFIX}/batches/{batch.id}"
    return Batch(
        id=batch.id,
        status=batch_status(counts),
        progress=round(done / len(models), 4) if models else 1.0,
        counts=counts,
        created_at=batch.created_at,
        cancel_requested=batch.cancel_requested,
        options=EnhanceOptions.model_validate(batch.options),
        jobs=[
            BatchJob.model_validate(m.model_dump(include=set(BatchJob.model_fields)))
            for m in models
        ],
        links=BatchLinks(self=base, cancel=base),
    )


def _redacted(url: str | None) -> str | None:
    """``url`` without a password in it (``user:***@host``), for display."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def render_job(row: JobRow) -> dict[str, Any]:
    """The job as JSON (the body of ``GET /v1/jobs/{id}``, of events and of webhooks)."""
    return job_model(row).model_dump(mode="json")
