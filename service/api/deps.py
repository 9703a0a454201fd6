"""What every route shares: the app's :class:`Service`, the job lookup and the one result check.

Routes get the service from ``request.app.state.service``; nothing here imports
a route module.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from enhancer.pipeline import Pipeline
from service.api import auth
from service.api.presenters import API_PREFIX
from service.api.schemas import ErrorResponse
from service.errors import ApiError
from service.jobs.batches import NewBatch
from service.jobs.database import utcnow
from service.jobs.runtime import Backend, Runtime
from service.jobs.status import JobStatus
from service.jobs.storage import is_job_id
from service.jobs.store import NewJob
from service.jobs.tables import BatchRow, JobRow

__all__ = [
    "API_PREFIX",
    "ERROR_RESPONSES",
    "MEDIA_TYPES",
    "Service",
    "error_response",
]

log = logging.getLogger("vqe.api")

MEDIA_TYPES = {".mp4": "video/mp4", ".mkv": "video/x-matroska"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 410, 413, 415, 422, 503)
}


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


class _SyncPipelines:
    """Pipelines for POST /v1/enhance, one per concurrent request (``VQE_SYNC_CONCURRENCY``),
    each created on first use and kept (the model stays loaded)."""

    def __init__(self, size: int, device: str) -> None:
        self.device = device
        self._pool: queue.Queue[Pipeline | None] = queue.Queue()
        for _ in range(size):
            self._pool.put(None)

    @contextlib.contextmanager
    def borrow(self) -> Any:
        pipeline = self._pool.get() or Pipeline(device=self.device)
        try:
            yield pipeline
        finally:
            self._pool.put(pipeline)


class Service:
    """State shared by the handlers of one app: the process's :class:`Runtime` (built by
    the composition root), its repositories and storage, and the synchronous pipelines."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.ctx = runtime.ctx
        self.jobs = self.ctx.jobs
        self.batches = self.ctx.batches
        self.storage = self.ctx.storage
        assert runtime.backend is not None  # an API runtime always has one
        self.backend: Backend = runtime.backend
        self.sync = _SyncPipelines(settings.sync_concurrency, settings.device)

    def start(self) -> None:
        self.runtime.start()

    def stop(self) -> None:
        self.runtime.stop()

    def job_or_404(self, job_id: str) -> JobRow:
        row = self.jobs.get(job_id) if is_job_id(job_id) else None
        if row is None or not auth.may_see(row.owner_key):
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return row

    def submit(self, new: NewJob) -> tuple[JobRow, bool]:
        row, created = self.jobs.create(new)
        if not created:
            if new.id != row.id:
                self.storage.remove_job(new.id)
            return row, False
        self.enqueue(row.id)
        return row, True

    def submit_batch(self, new: NewBatch, jobs: Sequence[NewJob]) -> tuple[BatchRow, bool]:
        """Store the batch and its jobs and queue those not refused at submit; a replayed
        ``Idempotency-Key`` returns the first batch (the new inputs' files go)."""
        batch, created = self.batches.create(new, jobs)
        for job in jobs:
            if not created:
                self.storage.remove_job(job.id)
            elif job.error is None:
                self.enqueue(job.id)
        return batch, created

    def cancel(self, job_id: str) -> JobRow | None:
        """Cancel a job that has not finished: a queued one ends at once (and its files go),
        a running one when its worker notices. Returns the job as it is now."""
        row = self.jobs.request_cancel(job_id)
        if row is not None and JobStatus(row.status).finished:
            self.storage.remove_job(job_id)
        return row

    def enqueue(self, job_id: str) -> None:
        """Hand a stored, queued job to the backend (a down queue leaves it to the reconciler)."""
        try:
            self.backend.submit(job_id)
        except Exception as exc:  # noqa: BLE001 - the queue is down: the store keeps the job
            # It stays queued in the store; the reconciler sends it once Redis answers.
            log.warning(
                "job %s: queue unavailable (%s); kept queued, sent when it is back",
                job_id,
                type(exc).__name__,
            )

    def stored_result(self, job_id: str) -> tuple[JobRow, Path]:
        """The row and result file of a job whose files can be read; else the API's
        404 (no such job), 410 (deleted, expired) or 409 (not succeeded yet)."""
        row = self.job_or_404(job_id)
        status = JobStatus(row.status)
        if row.deleted:
            raise ApiError(410, "deleted", "the job's files were deleted")
        expired = row.expired or (
            status.finished and row.expires_at is not None and row.expires_at <= utcnow()
        )
        if expired:
            when = f"{row.expires_at:%Y-%m-%dT%H:%M:%SZ}" if row.expires_at else "its retention"
            raise ApiError(410, "expired", f"the result expired at {when}")
        if status is not JobStatus.succeeded:
            raise ApiError(409, "not_ready", f"the job is {status.value}; no result")
        path = self.storage.find_result(job_id)
        if path is None:
            raise ApiError(410, "expired", "the result is no longer stored")
        return row, path
