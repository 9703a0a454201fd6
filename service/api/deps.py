"""What every route shares: the app's :class:`Service`, the job lookup and the one result check.

Routes get the service from ``request.app.state.service``; nothing here imports
a route module.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Protocol

from fastapi.responses import JSONResponse

from enhancer.pipeline import Pipeline
from service.api import auth
from service.api.presenters import API_PREFIX, render_job
from service.api.schemas import ErrorResponse
from service.config import Settings
from service.errors import ApiError
from service.jobs import metrics
from service.jobs.executor import Context, InProcessExecutor
from service.jobs.status import JobStatus
from service.jobs.storage import is_job_id
from service.jobs.store import JobRow, NewJob, utcnow
from service.jobs.webhooks import WebhookDispatcher

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


# -- the job backend: in-process threads or Dramatiq ---------------------------------


class Backend(Protocol):
    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def ready(self) -> bool: ...
    def stop(self) -> None: ...


class _RedisBackend:
    """The API's side of the Redis queue: it sends job ids, and its reconciler re-sends
    those Redis lost (or never got, while it was down)."""

    def __init__(self, settings: Settings, ctx: Context) -> None:
        from service.jobs.queue_redis import Reconciler, RedisQueue

        self.store = ctx.store
        self.queue = RedisQueue(settings)
        self.reconciler = Reconciler(ctx.store, self.queue, settings)

    def start(self) -> None:
        self.reconciler.start()

    def submit(self, job_id: str) -> None:
        self.queue.submit(job_id)
        self.store.mark_sent(job_id)

    def ready(self) -> bool:
        return self.queue.ping()

    def stop(self) -> None:
        self.reconciler.stop()
        self.queue.close()


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
    """State shared by the handlers of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = Context.from_settings(settings)
        self.store = self.ctx.store
        self.storage = self.ctx.storage
        self.backend: Backend = (
            _RedisBackend(settings, self.ctx)
            if settings.uses_redis
            else InProcessExecutor(self.ctx)
        )
        self.sync = _SyncPipelines(settings.sync_concurrency, settings.device)
        self.webhooks = WebhookDispatcher(self.store, settings, self.ctx.policy, render_job)
        self.heartbeat = (
            metrics.Heartbeat(
                self.store, self.backend.runner.identity, "executor", self.backend.threads
            )
            if isinstance(self.backend, InProcessExecutor)
            else None
        )
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="vqe-sweeper", daemon=True)

    def start(self) -> None:
        self.backend.start()
        self._sweeper.start()
        self.webhooks.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    def stop(self) -> None:
        self._stop.set()
        self.backend.stop()
        self.webhooks.stop()  # after the executor: the events of requeued jobs are out
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.store.close()

    def sweep(self) -> list[str]:
        """Delete the files of jobs past their retention; returns their ids."""
        ids = self.store.expire_due()
        for job_id in ids:
            self.storage.remove_job(job_id)
        self.storage.sweep_tmp()
        return ids

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("sweep failed")

    def job_or_404(self, job_id: str) -> JobRow:
        row = self.store.get(job_id) if is_job_id(job_id) else None
        if row is None or not auth.may_see(row.owner_key):
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return row

    def submit(self, new: NewJob) -> tuple[JobRow, bool]:
        row, created = self.store.create(new)
        if not created:
            if new.id != row.id:
                self.storage.remove_job(new.id)
            return row, False
        self.enqueue(row.id)
        return row, True

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
