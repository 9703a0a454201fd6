"""``vqe serve``: the HTTP API on uvicorn, with embedded defaults.

With no configuration it keeps everything under one data directory (SQLite
job store, local storage) and runs jobs on in-process worker threads; queued
and running jobs resume when the server comes back. ``VQE_*`` environment
variables (see ``service.config``) select Redis workers, PostgreSQL and a
shared storage volume instead.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.jobs.executor import Observer

GRACEFUL_SHUTDOWN_SECONDS = 30


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (OpenAPI at /docs)",
        description="Run the HTTP API on uvicorn. Jobs are kept under --data-dir "
        "(SQLite + local files) unless VQE_DATABASE_URL / VQE_STORAGE_DIR say otherwise; "
        "with VQE_QUEUE_URL=redis://... jobs run on `vqe worker` processes.",
    )
    p.add_argument(
        "--host",
        default=None,
        help="address to listen on (VQE_HOST; default 127.0.0.1; 0.0.0.0 for all)",
    )
    p.add_argument("--port", type=int, default=None, help="port (VQE_PORT; default 8000)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory for the job database and storage (VQE_DATA_DIR; "
        "default ~/.local/share/vqe)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="in-process job threads (VQE_WORKERS; default 1); ignored with VQE_QUEUE_URL",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def run(args: argparse.Namespace, observer: Observer | None = None) -> int:
    """``observer``: told each progress report of the jobs the in-process executor runs."""
    import uvicorn

    from service.api.app import create_app
    from service.config import cli_settings

    settings = cli_settings(
        args.log_level, data_dir=args.data_dir, workers=args.workers, host=args.host, port=args.port
    )
    app = create_app(settings, observer)
    mode = (
        f"queue {settings.queue_url}"
        if settings.uses_redis
        else (f"{settings.workers} in-process worker thread(s)")
    )
    logging.getLogger("vqe.api").info(
        "data in %s (database %s), jobs on %s",
        settings.storage_dir,
        settings.database_url.split("@")[-1],
        mode,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)
    # Long-lived responses (event streams) end when a shutdown starts, so that uvicorn's
    # graceful wait is not spent on them; running jobs are then handed back to the queue.
    app.state.stopping = lambda: server.should_exit
    server.run()
    return 0
