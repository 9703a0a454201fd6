"""The composition root: the one place that builds a process's parts from its settings.

    settings -> Database -> repositories (jobs, batches, outbox, workers, counts),
    storage, URL policy: a Context -> the job runner -> the queue (Redis) or the
    in-process executor -> the webhook dispatcher, heartbeat, reconciler, sweeper

:func:`open_context` builds the shared record alone (what a job runner needs, as in the
tests); :meth:`Runtime.api` is what ``vqe serve`` runs besides HTTP (the
:class:`service.api.deps.Service` of the routes wraps it); :meth:`Runtime.worker` is
``vqe worker``. Nothing else constructs a database, a repository, a runner or a queue.
The webhook body is the API's JSON of a job: the caller passes its renderer
(``service.api.presenters.render_job``), so this layer needs no web framework. An
``observer`` (see :data:`service.jobs.executor.Observer`) is told each progress
report of the jobs this process runs.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal, Protocol

from service.config import Settings
from service.ingest.policy import URLPolicy
from service.jobs.batches import BatchStore
from service.jobs.context import Context
from service.jobs.counts import JobCounts
from service.jobs.database import Database
from service.jobs.executor import InProcessExecutor, JobRunner, Observer
from service.jobs.metrics import Heartbeat
from service.jobs.outbox import WebhookOutbox
from service.jobs.storage import Storage
from service.jobs.store import JobStore
from service.jobs.webhooks import Render, WebhookDispatcher
from service.jobs.workers import WorkerRegistry

if TYPE_CHECKING:
    from dramatiq import Worker

    from service.jobs.queue_redis import Reconciler, RedisQueue

log = logging.getLogger("vqe.jobs")

Role = Literal["api", "worker"]


def open_context(settings: Settings) -> Context:
    """The database (schema checked, upgraded when ``VQE_DB_AUTO_UPGRADE``), its
    repositories, the storage and the URL policy of ``settings``."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url, upgrade=settings.db_auto_upgrade)
    return Context(
        settings=settings,
        db=db,
        jobs=JobStore(db),
        batches=BatchStore(db),
        outbox=WebhookOutbox(db),
        workers=WorkerRegistry(db),
        counts=JobCounts(db),
        storage=Storage(settings.storage_dir),
        policy=URLPolicy(settings.url_allowlist),
    )


class Backend(Protocol):
    """Where the API hands its jobs: the in-process executor or the Redis queue."""

    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def ready(self) -> bool: ...
    def stop(self) -> None: ...


class _QueueBackend:
    """The API's side of the Redis queue: it sends job ids; the reconciler re-sends
    those Redis lost (or never got, while it was down)."""

    def __init__(self, queue: RedisQueue, reconciler: Reconciler) -> None:
        self.queue = queue
        self.reconciler = reconciler

    def start(self) -> None:
        self.reconciler.start()

    def submit(self, job_id: str) -> None:
        self.queue.submit(job_id)

    def ready(self) -> bool:
        return self.queue.ping()

    def stop(self) -> None:
        self.reconciler.stop()
        self.queue.close()


class _Sweeper:
    """Deletes the files of jobs past their retention, every ``VQE_SWEEP_INTERVAL``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqe-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> list[str]:
        """One pass; returns the ids of the jobs that expired."""
        ids = self.ctx.jobs.expire_due()
        for job_id in ids:
            self.ctx.storage.remove_job(job_id)
        self.ctx.storage.sweep_tmp()
        return ids

    def _loop(self) -> None:
        while not self._stop.wait(self.ctx.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("sweep failed")


class Runtime:
    """The background parts of one process (API or worker), built from its settings."""

    def __init__(
        self, settings: Settings, role: Role, render: Render, observer: Observer | None = None
    ) -> None:
        self.settings = settings
        self.role = role
        self.ctx = ctx = open_context(settings)
        self.shutdown = threading.Event()  # set: running jobs stop (or finish in time)
        queued = settings.uses_redis
        self.runner: JobRunner | None = None
        if role == "worker" or not queued:
            grace = settings.shutdown_grace if role == "worker" else 0.0
            self.runner = JobRunner(ctx, self.shutdown, finish_within=grace, observer=observer)
        self.queue: RedisQueue | None = None
        self.reconciler: Reconciler | None = None
        self.executor: InProcessExecutor | None = None
        self.backend: Backend | None = None
        self.dramatiq: Worker | None = None
        if queued:
            from service.jobs.queue_redis import Reconciler, RedisQueue

            self.queue = RedisQueue(settings, ctx.jobs, self.runner if role == "worker" else None)
            self.reconciler = Reconciler(ctx.jobs, self.queue, settings)
        if role == "api":
            if self.queue is not None and self.reconciler is not None:
                self.backend = _QueueBackend(self.queue, self.reconciler)
            else:
                assert self.runner is not None
                self.backend = self.executor = InProcessExecutor(self.runner)
        self.sweeper = _Sweeper(ctx) if role == "api" else None
        self.webhooks = WebhookDispatcher(ctx.jobs, ctx.outbox, settings, ctx.policy, render)
        self.heartbeat: Heartbeat | None = None
        if self.executor is not None or role == "worker":
            assert self.runner is not None
            kind = "executor" if role == "api" else "worker"
            threads = self.executor.threads if self.executor is not None else settings.workers
            self.heartbeat = Heartbeat(ctx.workers, self.runner.identity, kind, threads)

    @classmethod
    def api(cls, settings: Settings, render: Render, observer: Observer | None = None) -> Runtime:
        """``vqe serve``'s: in-process executor threads, or the producer side of the queue
        and its reconciler; the sweeper; webhooks."""
        return cls(settings, "api", render, observer)

    @classmethod
    def worker(
        cls, settings: Settings, render: Render, observer: Observer | None = None
    ) -> Runtime:
        """``vqe worker``'s: a Dramatiq worker running the job runner, the reconciler,
        webhooks, the heartbeat (and ``/metrics`` on ``VQE_METRICS_PORT``)."""
        return cls(settings, "worker", render, observer)

    def start(self) -> None:
        if self.backend is not None:
            self.backend.start()
        if self.queue is not None and self.role == "worker":
            self._start_worker(self.queue)
        if self.sweeper is not None:
            self.sweeper.start()
        self.webhooks.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    def _start_worker(self, queue: RedisQueue) -> None:
        from dramatiq import Worker

        from service.jobs.metrics import serve_worker_metrics
        from service.jobs.queue_redis import QUEUE_NAME

        threads = self.settings.workers
        self.dramatiq = Worker(queue.broker, queues=[QUEUE_NAME], worker_threads=threads)
        # Fetch no more jobs than there are threads: a prefetched job would wait here
        # while another worker sits idle.
        self.dramatiq.queue_prefetch = threads
        queue.broker.emit_after("process_boot")  # starts the time-limit watcher, as dramatiq's CLI
        self.dramatiq.start()
        assert self.reconciler is not None
        self.reconciler.start()
        if self.settings.metrics_port:
            serve_worker_metrics(self.settings.metrics_port, self.ctx.counts, self.ctx.workers)

    def stop(self) -> None:
        """Stop taking jobs; running ones finish in time or go back to the queue; close."""
        self.shutdown.set()
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.backend is not None:
            self.backend.stop()
        if self.dramatiq is not None:
            # The runner lets a job that ends in time finish, or stops it and queues it
            # again; then Dramatiq acks its message (and gives back the prefetched ones).
            assert self.reconciler is not None and self.queue is not None
            self.reconciler.stop()
            self.dramatiq.stop(timeout=int(self.settings.shutdown_grace * 1000))
            self.queue.close()
        self.webhooks.stop()  # after the runners: the events of requeued jobs are out
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.ctx.close()
