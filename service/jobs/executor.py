"""Running jobs: the job runner shared by every executor, and the in-process executor.

:class:`JobRunner` runs one job end to end: claim it with a lease, fetch a
stream source if the API could not (HLS/RTMP/RTSP), run the
:class:`~service.pipeline.Pipeline`, and record the outcome. While it runs, a
watcher thread renews the lease, writes progress, and stops the pipeline when
the job is canceled, passes its time limit, or the process shuts down.

:class:`InProcessExecutor` is the embedded default of ``vqe serve``: worker
threads (default 1) in the API process. On start it puts every job left
queued or running by the previous process back in line, so jobs survive a
restart. ``service.jobs.queue_redis`` runs the same :class:`JobRunner` in Dramatiq
workers instead. Both are built by the composition root, :mod:`service.jobs.runtime`,
which may give the runner an :data:`Observer` of the jobs' progress.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from enum import StrEnum
from typing import Any

from enhancer.options import parse_options
from enhancer.pipeline import Cancelled, EnhanceResult, Pipeline, Progress
from service import logs
from service.config import Settings
from service.errors import VqeError, error_info, first_line, operator_fault, public_message
from service.ingest.fetch import HTTPFetcher, ingest_stream
from service.jobs import metrics
from service.jobs.context import Context
from service.jobs.database import utcnow
from service.jobs.status import JobStatus
from service.jobs.store import Claim
from service.jobs.tables import JobRow

log = logging.getLogger("vqe.jobs")

WATCH_INTERVAL = 1.0  # seconds between lease renewals / progress writes


Observer = Callable[[Progress], None]
"""Told every progress report of a running job (in the pipeline's thread)."""


def error_of(exc: BaseException) -> tuple[str, str]:
    """(code, message) stored with a job's failure (from :func:`service.errors.error_info`)."""
    _status, code, message = error_info(exc)
    return code, message


def result_stats(result: EnhanceResult, output_bytes: int | None) -> dict[str, Any]:
    return {
        "frames": result.frames,
        "seconds": result.seconds,
        "fps": result.fps,
        "mean_qp": result.mean_qp,
        "stages_histogram": {str(k): int(v) for k, v in result.stages_histogram.items()},
        "side_info": dict(result.side_info),
        "output_bytes": output_bytes,
        "warnings": list(getattr(result, "warnings", []) or []),
        **(result.output_report() if hasattr(result, "output_report") else {}),
    }


class PipelineCache:
    """One :class:`Pipeline` per thread, created on first use: the model loads once per
    worker thread (once per process with the default single thread) and stays on the
    device between jobs."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._local = threading.local()

    def get(self) -> Pipeline:
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            pipeline = self._local.pipeline = Pipeline(device=self.device)
        return pipeline


class Outcome(StrEnum):
    done = "done"  # finished (any status), or nothing to do
    retry = "retry"  # transient failure; the job is queued again and should be retried
    requeued = "requeued"  # interrupted by shutdown; the job is queued again
    held = "held"  # another worker holds it


class _Watch:
    """Renews the lease, stores progress, and sets ``cancel`` when the job must stop."""

    def __init__(self, runner: JobRunner, job_id: str, owner: str) -> None:
        self.runner = runner
        self.job_id = job_id
        self.owner = owner
        self.cancel = threading.Event()
        self.reason: str | None = None  # canceled | lost | time_limit | shutdown
        self.latest: Progress | None = None
        self.started = time.monotonic()
        self.shutdown_seen: float | None = None
        self._finishing = False  # logged that the job may finish despite the shutdown
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"vqe-watch-{job_id[:8]}", daemon=True
        )

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def progress(self, p: Progress) -> None:
        self.latest = p
        if self.runner.observer is not None:
            self.runner.observer(p)

    def phase(self, phase: str) -> None:
        self.latest = Progress(phase, 0, None, 0.0, None)

    def _stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel.set()

    def _loop(self) -> None:
        with logs.job_context(self.job_id):
            self._watch()

    def _watch(self) -> None:
        settings = self.runner.settings
        jobs = self.runner.jobs
        while not self._done.wait(min(WATCH_INTERVAL, settings.job_lease / 3)):
            fields: dict[str, Any] = {}
            p = self.latest
            if p is not None:
                fields = {
                    "phase": p.phase,
                    "frames_done": p.frames_done,
                    "fps": p.fps,
                    "eta_seconds": p.eta_seconds,
                }
                if p.frames_total:
                    fields["frames_total"] = p.frames_total
            try:
                alive = jobs.report(self.job_id, self.owner, settings.job_lease, **fields)
            except Exception:  # noqa: BLE001 - a database hiccup: try again next tick
                log.warning("job %s: progress update failed", self.job_id, exc_info=True)
                continue
            if not alive:
                row = jobs.get(self.job_id)
                self._stop("canceled" if row is None or row.cancel_requested else "lost")
            elif time.monotonic() - self.started > settings.job_time_limit:
                self._stop("time_limit")
            elif self.runner.shutdown.is_set() and not self._finishes_in_time():
                self._stop("shutdown")

    def _finishes_in_time(self) -> bool:
        """During a shutdown: will the job end within the runner's ``finish_within``
        seconds (leaving time to hand it back if the estimate was wrong)?"""
        now = time.monotonic()
        if self.shutdown_seen is None:
            self.shutdown_seen = now
        grace = self.runner.finish_within
        margin = min(5.0, grace / 3)
        p = self.latest
        if grace <= 0 or p is None:
            return False
        # "encoding" is the encoder's flush after the last frame: the job is at its end, and
        # handing it back there would throw away a finished run.
        eta = 0.0 if p.phase == "encoding" else p.eta_seconds
        if p.phase not in ("enhancing", "encoding") or eta is None:
            return False
        keep = now - self.shutdown_seen + eta + 2 * WATCH_INTERVAL <= grace - margin
        if keep and not self._finishing:
            self._finishing = True
            log.info(
                "job %s: shutting down; letting it finish (ETA %.1f s)", self.job_id, p.eta_seconds
            )
        return keep


class JobRunner:
    """Runs jobs by id; one per worker process (or per executor), any number of threads."""

    def __init__(
        self,
        ctx: Context,
        shutdown: threading.Event | None = None,
        finish_within: float = 0.0,
        observer: Observer | None = None,
    ) -> None:
        """``finish_within``: once ``shutdown`` is set, a job whose ETA fits in these seconds
        runs to its end; any other is stopped and handed back to the queue at once.
        ``observer``: told each progress report of the jobs this runner runs."""
        self.ctx = ctx
        self.finish_within = finish_within
        self.observer = observer
        self.settings = ctx.settings
        self.jobs = ctx.jobs
        self.storage = ctx.storage
        self.shutdown = shutdown or threading.Event()
        self.pipelines = PipelineCache(self.settings.device)
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def run(self, job_id: str, *, final_attempt: bool = True) -> Outcome:
        """Run ``job_id`` if it needs running. ``final_attempt``: a transient failure
        fails the job instead of asking for a retry."""
        with logs.job_context(job_id):
            return self._run(job_id, final_attempt)

    def _run(self, job_id: str, final_attempt: bool) -> Outcome:
        owner = f"{self.identity}:{threading.get_ident()}"
        claim = self._claim(job_id, owner)
        if claim is Claim.held:
            return Outcome.held
        if claim is not Claim.claimed:
            return Outcome.done
        row = self.jobs.get(job_id)
        assert row is not None
        log.info("job %s: started by %s (attempt %d)", job_id, owner, row.attempts)
        with _Watch(self, job_id, owner) as watch:
            try:
                result = self._execute(row, watch)
            except (Cancelled, _Interrupted):
                return self._interrupted(job_id, owner, watch.reason)
            except VqeError as exc:
                if watch.reason is not None:
                    return self._interrupted(job_id, owner, watch.reason)
                self._fail(job_id, owner, error_of(exc))
                return Outcome.done
            except Exception as exc:  # noqa: BLE001 - anything else may be transient
                if watch.reason is not None:
                    return self._interrupted(job_id, owner, watch.reason)
                log.exception("job %s: attempt %d failed", job_id, row.attempts)
                fault = operator_fault(exc)  # disk full, database down: the operator's to fix
                code, message = (
                    (fault[1], fault[2])
                    if fault is not None
                    else (
                        "internal_error",
                        public_message(f"{type(exc).__name__}: {first_line(exc)}"),
                    )
                )
                if final_attempt:
                    self._fail(job_id, owner, (code, message))
                    return Outcome.done
                self.jobs.requeue(job_id, owner, error=("retrying", message))
                return Outcome.retry
        path = self.storage.find_result(job_id)
        size = path.stat().st_size if path is not None else None
        try:  # the web page's per-frame plot; the job does not depend on it
            self.storage.write_frames(job_id, result.frame_log)
        except OSError:
            log.warning("job %s: cannot store the per-frame log", job_id, exc_info=True)
        expires = utcnow() + timedelta(seconds=self.settings.retention)
        stats = result_stats(result, size)
        if self.jobs.finish(job_id, owner, JobStatus.succeeded, stats=stats, expires_at=expires):
            metrics.record_job(stats)
            log.info("job %s: succeeded (%d frames, %.2f fps)", job_id, result.frames, result.fps)
        # The input stays next to the result (before/after previews) until retention or
        # DELETE removes the job's folder.
        return Outcome.done

    def _claim(self, job_id: str, owner: str) -> Claim:
        """Claim the job; when a (possibly dead) worker holds it, wait for its lease to lapse
        up to two lease periods."""
        deadline = time.monotonic() + 2 * self.settings.job_lease + 1
        while True:
            claim = self.jobs.claim(job_id, owner, self.settings.job_lease)
            if claim is not Claim.held or time.monotonic() > deadline:
                return claim
            if self.shutdown.wait(min(1.0, self.settings.job_lease / 4)):
                return Claim.held

    def _execute(self, row: JobRow, watch: _Watch) -> EnhanceResult:
        job_id = row.id
        source = self.storage.input_path(job_id)
        if not row.input_ready:
            watch.phase("probing")
            self._ingest(row, watch)
        if watch.cancel.is_set():
            raise _Interrupted
        output = self.storage.result_path(job_id, row.result_ext)
        pipeline = self.pipelines.get()
        return pipeline.run(
            source,
            output,
            parse_options(row.options),
            progress=watch.progress,
            cancel=watch.cancel,
        )

    def _ingest(self, row: JobRow, watch: _Watch) -> None:
        """Copy a stream source (HLS, RTMP, RTSP) to the job's input file."""
        assert row.source_url is not None
        checked = self.ctx.policy.check(row.source_url)
        if checked.kind == "http":  # an HLS playlist behind a plain http(s) URL
            checked = replace(checked, kind="hls")
        dest = self.storage.input_path(row.id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.storage.tmp_path(".mkv")
        fetcher = HTTPFetcher(self.ctx.policy, self.settings.url_timeout)
        try:
            ingest_stream(checked, fetcher, tmp, self.settings.limits, watch.cancel)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        self.jobs.set_input_ready(row.id, dest.stat().st_size)

    def _fail(self, job_id: str, owner: str, error: tuple[str, str]) -> None:
        log.info("job %s: failed: %s", job_id, error[1])
        expires = utcnow() + timedelta(seconds=self.settings.retention)
        self.jobs.finish(job_id, owner, JobStatus.failed, error=error, expires_at=expires)
        self.storage.remove_job(job_id)

    def _interrupted(self, job_id: str, owner: str, reason: str | None) -> Outcome:
        if reason == "shutdown":
            self.jobs.requeue(job_id, owner)
            log.info("job %s: interrupted by shutdown; queued again", job_id)
            return Outcome.requeued
        if reason == "time_limit":
            limit = self.settings.job_time_limit
            self._fail(job_id, owner, ("time_limit", f"the job ran longer than {limit:g} s"))
            return Outcome.done
        if reason == "lost":
            log.warning("job %s: lease lost to another worker; stopping", job_id)
            return Outcome.done
        self.jobs.finish(job_id, None, JobStatus.canceled)
        self.storage.remove_job(job_id)
        log.info("job %s: canceled", job_id)
        return Outcome.done


class _Interrupted(Exception):
    """The watcher stopped the job before the pipeline started."""


def backoff_seconds(settings: Settings, retries: int) -> float:
    """Delay before retry number ``retries + 1``: min_backoff doubling up to max_backoff."""
    delay = settings.job_min_backoff_ms * (2**retries)
    return min(delay, settings.job_max_backoff_ms) / 1000.0


class InProcessExecutor:
    """Worker threads inside the API process (the embedded default)."""

    def __init__(self, runner: JobRunner, threads: int | None = None) -> None:
        self.runner = runner
        self.ctx = runner.ctx
        self.threads = threads or self.ctx.settings.workers
        self.shutdown = runner.shutdown
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._retries: dict[str, int] = {}
        self._timers: list[threading.Timer] = []

    def start(self) -> None:
        """Resume what the previous process left, then start the worker threads."""
        resumed = self.ctx.jobs.requeue_all_running()
        for job_id in self.ctx.jobs.ids_with_status(JobStatus.queued):
            self._queue.put(job_id)
        if resumed:
            log.info("resuming %d interrupted job(s)", len(resumed))
        for i in range(self.threads):
            worker = threading.Thread(target=self._loop, name=f"vqe-executor-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt running jobs (they are queued again for the next start) and stop."""
        self.shutdown.set()
        for timer in self._timers:
            timer.cancel()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def ready(self) -> bool:
        return bool(self._workers) and all(w.is_alive() for w in self._workers)

    def _loop(self) -> None:
        while not self.shutdown.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            retries = self._retries.get(job_id, 0)
            try:
                outcome = self.runner.run(
                    job_id, final_attempt=retries >= self.ctx.settings.job_max_retries
                )
            except Exception:  # noqa: BLE001 - keep the thread alive whatever happens
                log.exception("job %s: runner crashed", job_id)
                continue
            if outcome is Outcome.retry:
                self._retries[job_id] = retries + 1
                self._later(backoff_seconds(self.ctx.settings, retries), job_id)
            elif outcome is Outcome.held:  # another executor on the same database has it
                self._later(self.ctx.settings.job_lease, job_id)
            else:
                self._retries.pop(job_id, None)

    def _later(self, delay: float, job_id: str) -> None:
        timer = threading.Timer(delay, self.submit, (job_id,))
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
