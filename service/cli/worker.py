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
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.jobs.executor import Observer


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


def run(args: argparse.Namespace, observer: Observer | None = None) -> int:
    """``observer``: told each progress report of the jobs this worker runs."""
    from service.api.presenters import render_job  # no web framework: only the job's JSON
    from service.config import cli_settings
    from service.errors import UserError
    from service.jobs.queue_redis import QUEUE_NAME
    from service.jobs.runtime import Runtime

    settings = cli_settings(
        args.log_level,
        data_dir=args.data_dir,
        workers=args.threads,
        queue_url=args.queue_url or None,
    )
    if not settings.uses_redis:
        raise UserError("set VQE_QUEUE_URL (or --queue-url) to a redis:// URL")
    runtime = Runtime.worker(settings, render_job, observer)
    log = logging.getLogger("vqe.worker")

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        runtime.shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    assert runtime.runner is not None
    identity = runtime.runner.identity
    log.info("worker %s: %d thread(s) on %s", identity, settings.workers, QUEUE_NAME)
    runtime.start()
    try:
        while not runtime.shutdown.wait(1.0):
            pass
    finally:
        stopping = time.monotonic()
        runtime.stop()
        log.info("worker %s: stopped in %.1f s", identity, time.monotonic() - stopping)
    return 0
