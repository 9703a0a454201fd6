"""``vqe worker``: run jobs from the Redis queue (Dramatiq) until stopped.

Each process loads the model once (on the GPU when there is one) and keeps
it between jobs. SIGTERM/SIGINT: within ``VQE_SHUTDOWN_GRACE`` seconds the
worker lets a job that will be done in time finish, stops any other and puts it
back in the queue for another worker, and exits; a worker killed outright
(SIGKILL) loses nothing either: its job is redelivered once its heartbeat lapses
(see ``service.jobs.queue_redis``). Each worker also runs the queue's
reconciler (jobs Redis lost are sent again).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "worker",
        help="run enhancement jobs from the Redis queue (needs VQE_QUEUE_URL)",
        description="Consume jobs from VQE_QUEUE_URL (Redis) and run them. The job store "
        "(VQE_DATABASE_URL) and storage (VQE_STORAGE_DIR) must be the ones the API uses.",
    )
    p.add_argument("--queue-url", default=None, help="redis://host:port/db (VQE_QUEUE_URL)")
    p.add_argument("--data-dir", default=None, help="as for `vqe serve` (VQE_DATA_DIR)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="jobs run at once by this process (VQE_WORKERS; default 1)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def run(args: argparse.Namespace) -> int:
    from dramatiq import Worker

    from service.api.presenters import render_job  # no web framework: only the job's JSON
    from service.config import cli_settings
    from service.errors import UserError
    from service.jobs.executor import Context, JobRunner
    from service.jobs.metrics import Heartbeat, serve_worker_metrics
    from service.jobs.queue_redis import QUEUE_NAME, Reconciler, RedisQueue
    from service.jobs.webhooks import WebhookDispatcher

    settings = cli_settings(
        args.log_level,
        data_dir=args.data_dir,
        workers=args.threads,
        queue_url=args.queue_url or None,
    )
    if not settings.uses_redis:
        raise UserError("set VQE_QUEUE_URL (or --queue-url) to a redis:// URL")
    stop = threading.Event()
    ctx = Context.from_settings(settings)
    runner = JobRunner(ctx, shutdown=stop, finish_within=settings.shutdown_grace)
    webhooks = WebhookDispatcher(ctx.store, settings, ctx.policy, render_job)
    heartbeat = Heartbeat(ctx.store, runner.identity, "worker", settings.workers)
    queue = RedisQueue(settings, runner)
    reconciler = Reconciler(ctx.store, queue, settings)
    worker = Worker(queue.broker, queues=[QUEUE_NAME], worker_threads=settings.workers)
    # Fetch no more jobs than there are threads: a prefetched job would wait here
    # while another worker sits idle.
    worker.queue_prefetch = settings.workers

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("vqe.worker").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log = logging.getLogger("vqe.worker")
    log.info("worker %s: %d thread(s) on %s", runner.identity, settings.workers, QUEUE_NAME)
    queue.broker.emit_after("process_boot")  # starts the time-limit watcher, as dramatiq's CLI
    worker.start()
    webhooks.start()
    heartbeat.start()
    reconciler.start()
    if settings.metrics_port:
        serve_worker_metrics(settings.metrics_port, ctx.store)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        # The runner lets a job that ends in time finish, or stops it and queues it again;
        # then Dramatiq acks its message (and gives back the prefetched ones).
        stopping = time.monotonic()
        reconciler.stop()
        worker.stop(timeout=int(settings.shutdown_grace * 1000))
        webhooks.stop()
        heartbeat.stop()
        queue.close()
        log.info("worker %s: stopped in %.1f s", runner.identity, time.monotonic() - stopping)
    return 0
