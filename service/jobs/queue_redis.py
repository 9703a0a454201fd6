"""Jobs on a real queue: Dramatiq on Redis (``VQE_QUEUE_URL=redis://...``).

The API sends one message per job (the job id) to the ``vqe-jobs`` queue;
``vqe worker`` processes consume it and run :class:`service.jobs.executor.JobRunner`.

Delivery guarantees, from Dramatiq's Redis broker:

* Acks are late: a fetched message sits in the worker's ack set until the
  actor returns. A worker that dies (SIGKILL, OOM, lost node) stops sending
  heartbeats; after ``VQE_QUEUE_HEARTBEAT_MS`` another broker's queue
  maintenance (run on a ``VQE_QUEUE_MAINTENANCE_CHANCE`` per million of queue
  commands) puts its unacked messages back in the queue, and another worker
  picks the job up. The job store's lease (``VQE_JOB_LEASE``) makes the new
  worker wait until the dead one's claim has lapsed, so a job never runs twice
  at once.
* Transient failures (anything but a bad input) are retried up to
  ``VQE_JOB_MAX_RETRIES`` times with exponential backoff from
  ``VQE_JOB_MIN_BACKOFF_MS`` to ``VQE_JOB_MAX_BACKOFF_MS``; a permanent failure
  fails the job at once.
* ``VQE_JOB_TIME_LIMIT`` is enforced by the runner (the pipeline is stopped
  and the job fails with ``time_limit``); Dramatiq's own ``time_limit`` is set
  a little later as a backstop.
* On SIGTERM a worker lets its running job finish when it will within
  ``VQE_SHUTDOWN_GRACE``, else stops it and puts it back in the queue, and exits.
* The job store, not Redis, is the source of truth: :class:`Reconciler` (in the
  API and in every worker) looks every ``VQE_QUEUE_RECONCILE_INTERVAL`` seconds
  for jobs that are queued in the store (or running with a long-lapsed lease)
  but have no message in Redis -- Redis restarted empty, a message lost, a job
  submitted while Redis was down -- and sends them again. ``jobs.queue_sent_at``
  makes one process, not all, re-send a job; a duplicate message is harmless
  anyway: the lease lets one worker run the job, the others find it held or done.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name
from dramatiq.middleware import CurrentMessage, TimeLimitExceeded

from service.config import Settings
from service.jobs.executor import JobRunner, Outcome
from service.jobs.status import JobStatus
from service.jobs.store import JobStore

log = logging.getLogger("vqe.queue")

QUEUE_NAME = "vqe-jobs"
ACTOR_NAME = "vqe_enhance_job"
NAMESPACE = "vqe"
BACKSTOP_SECONDS = 120.0  # Dramatiq's time limit = the job's + lease + this


class TransientJobError(Exception):
    """Raised from the actor so Dramatiq's Retries middleware retries the job later."""


class RedisQueue:
    """The broker, the actor, and the producer side used by the API.

    ``runner`` is given in worker processes only; the API just sends messages. Every
    message sent is recorded in ``jobs`` (``queue_sent_at``, read by the reconciler).
    """

    def __init__(self, settings: Settings, jobs: JobStore, runner: JobRunner | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.runner = runner
        client = redis.Redis.from_url(
            settings.queue_url or "", socket_connect_timeout=5, health_check_interval=30
        )
        self.broker = RedisBroker(
            client=client,
            namespace=NAMESPACE,
            heartbeat_timeout=settings.queue_heartbeat_ms,
            maintenance_chance=settings.queue_maintenance_chance,
        )
        self.broker.add_middleware(CurrentMessage())
        time_limit = settings.job_time_limit + settings.job_lease + BACKSTOP_SECONDS
        self.actor = dramatiq.actor(
            self._perform,
            broker=self.broker,
            actor_name=ACTOR_NAME,
            queue_name=QUEUE_NAME,
            max_retries=settings.job_max_retries,
            min_backoff=settings.job_min_backoff_ms,
            max_backoff=settings.job_max_backoff_ms,
            time_limit=int(time_limit * 1000),
            throws=(TimeLimitExceeded,),
        )

    # -- producer ------------------------------------------------------------

    def submit(self, job_id: str, delay_ms: int | None = None) -> None:
        self.actor.send_with_options(args=(job_id,), delay=delay_ms)
        self.jobs.mark_sent(job_id)

    def job_ids(self) -> set[str]:
        """The jobs that have a message in Redis: waiting, delayed (retries) or fetched by
        a worker and not acked yet (Dramatiq keeps those in the queue's ``.msgs`` hash)."""
        found: set[str] = set()
        for queue in (QUEUE_NAME, dq_name(QUEUE_NAME)):
            for _mid, data in self.broker.client.hscan_iter(f"{NAMESPACE}:{queue}.msgs"):
                try:
                    args = dramatiq.Message.decode(data).args
                except Exception:  # noqa: BLE001 - not one of ours
                    continue
                if args:
                    found.add(str(args[0]))
        return found

    def ping(self) -> bool:
        try:
            return bool(self.broker.client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def close(self) -> None:
        self.broker.close()

    # -- consumer ------------------------------------------------------------

    def _perform(self, job_id: str) -> None:
        if self.runner is None:
            raise RuntimeError("this process only sends jobs; run `vqe worker`")
        message: Any = CurrentMessage.get_current_message()
        retries = int(message.options.get("retries", 0)) if message is not None else 0
        final = retries >= self.settings.job_max_retries
        try:
            outcome = self.runner.run(job_id, final_attempt=final)
        except TimeLimitExceeded:
            log.error("job %s: killed by the queue's time limit", job_id)
            self.jobs.finish(
                job_id,
                None,
                JobStatus.failed,
                error=("time_limit", "the job ran past the queue's time limit"),
            )
            raise
        if outcome is Outcome.retry:
            raise TransientJobError(f"job {job_id}: transient failure, will retry")
        if outcome is Outcome.requeued:
            self.submit(job_id)  # a fresh message for another worker; this one is acked
        elif outcome is Outcome.held:
            # Another live worker holds it: look again once its lease could have lapsed.
            self.submit(job_id, delay_ms=int(self.settings.job_lease * 1000))


class Reconciler:
    """Re-sends the jobs the store says are waiting but Redis does not hold (a thread)."""

    def __init__(self, jobs: JobStore, queue: RedisQueue, settings: Settings) -> None:
        self.jobs = jobs
        self.queue = queue
        self.interval = settings.queue_reconcile_interval
        self.lease = settings.job_lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqe-reconciler", daemon=True)
        self._down = False

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def run_once(self) -> list[str]:
        """One pass; returns the ids sent again."""
        candidates = self.jobs.resend_candidates(quiet=self.interval, lease_grace=self.lease)
        if not candidates:
            return []
        held = self.queue.job_ids()
        sent = []
        for job_id in candidates:
            if job_id in held or not self.jobs.take_for_resend(job_id, quiet=self.interval):
                continue
            self.queue.actor.send(job_id)
            sent.append(job_id)
            log.warning("job %s: in the store but not in the queue; sent again", job_id)
        return sent

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
                if self._down:
                    log.info("reconciler: the queue and the job store answer again")
                self._down = False
            except Exception as exc:  # noqa: BLE001 - Redis or the database is down: next time
                if not self._down:
                    log.warning("reconciler: %s: %s (retrying)", type(exc).__name__, exc)
                self._down = True
