"""Service settings: read once from ``VQE_*`` environment variables, with embedded defaults.

With no environment at all, ``vqe serve`` runs self-contained under one data
directory: a SQLite job store (``<data>/jobs.db``), a local storage directory
(``<data>/storage``) and an in-process executor. Setting ``VQE_QUEUE_URL`` to
a ``redis://`` URL switches to Dramatiq workers (``vqe worker``);
``VQE_DATABASE_URL`` and ``VQE_STORAGE_DIR`` then point every node at the same
database and shared volume.

Every variable is listed in :data:`ENV_VARS` with its meaning; sizes are bytes,
durations seconds unless the name says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import UserError

DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.local/share/vqe"))

ENV_VARS: dict[str, str] = {
    "VQE_HOST": "address `vqe serve` listens on (default 127.0.0.1)",
    "VQE_PORT": "port of `vqe serve` (default 8000)",
    "VQE_DATA_DIR": "base directory for the embedded defaults (database and storage)",
    "VQE_DATABASE_URL": "SQLAlchemy URL of the job store (default sqlite:///<data>/jobs.db)",
    "VQE_STORAGE_DIR": "directory for inputs and results; a shared volume for many nodes",
    "VQE_QUEUE_URL": "redis://host:port/db to run jobs on Dramatiq workers (default: in-process)",
    "VQE_WORKERS": "in-process executor threads, or threads per `vqe worker` process (default 1)",
    "VQE_DEVICE": "auto | cpu | cuda[:N] for the model",
    "VQE_MAX_UPLOAD_BYTES": "largest upload or downloaded source for a job (default 4 GiB)",
    "VQE_SYNC_MAX_BYTES": "largest upload POST /v1/enhance accepts (default 64 MiB)",
    "VQE_SYNC_MAX_SECONDS": "longest video POST /v1/enhance accepts (default 30 s)",
    "VQE_SYNC_MAX_FRAMES": "most frames POST /v1/enhance accepts (default 900)",
    "VQE_SYNC_CONCURRENCY": "synchronous enhancements run at once by the API (default 1)",
    "VQE_MAX_WIDTH": "widest accepted video in pixels (default 7680)",
    "VQE_MAX_HEIGHT": "tallest accepted video in pixels (default 4320)",
    "VQE_MAX_DURATION": "longest accepted video in seconds (default 14400)",
    "VQE_MAX_FRAMES": "most frames accepted (default 864000)",
    "VQE_RETENTION": "seconds a finished job's result is kept (default 86400)",
    "VQE_URL_ALLOWLIST": "comma list of hosts, IPs or CIDRs (optionally :port) exempt from "
    "the private-address check on source URLs",
    "VQE_URL_TIMEOUT": "seconds a source URL may stay silent (default 20); a whole "
    "download may take 30 times that",
    "VQE_JOB_TIME_LIMIT": "seconds one job may run before it fails (default 21600)",
    "VQE_JOB_MAX_RETRIES": "retries of a job after a transient failure (default 3)",
    "VQE_JOB_MIN_BACKOFF_MS": "first retry delay in ms, doubling each time (default 15000)",
    "VQE_JOB_MAX_BACKOFF_MS": "longest retry delay in ms (default 600000)",
    "VQE_JOB_LEASE": "seconds a worker's claim on a running job lasts unless renewed (default 60)",
    "VQE_QUEUE_HEARTBEAT_MS": "Dramatiq: silence after which a worker is dead and its jobs "
    "are redelivered (default 60000)",
    "VQE_QUEUE_MAINTENANCE_CHANCE": "Dramatiq: per-million chance a queue command runs "
    "dead-worker recovery (default 10000)",
    "VQE_SWEEP_INTERVAL": "seconds between sweeps for expired results (default 60)",
    "VQE_API_KEYS": "comma list of API keys; when set every /v1 route needs "
    "`Authorization: Bearer <key>` and each key sees only its own jobs (default: open)",
    "VQE_WEBHOOK_SECRET": "HMAC-SHA256 key signing webhook deliveries; jobs may carry a "
    "`webhook_url` only when it is set",
    "VQE_WEBHOOK_TIMEOUT": "seconds one webhook delivery attempt may take (default 10)",
    "VQE_WEBHOOK_MIN_BACKOFF": "seconds before the first webhook retry, doubling (default 5)",
    "VQE_WEBHOOK_MAX_BACKOFF": "longest delay between webhook retries in seconds (default 600)",
    "VQE_WEBHOOK_MAX_AGE": "seconds after which an undelivered webhook is given up (default 86400)",
    "VQE_EVENTS_POLL": "seconds between job-store reads of a /events stream (default 0.5)",
    "VQE_LOG_FORMAT": "json (default: one JSON object per line) or text",
    "VQE_METRICS_PORT": "`vqe worker` only: serve Prometheus /metrics on this port (default off)",
    "VQE_TEST_FRAME_DELAY": "TEST ONLY: seconds to sleep per enhanced frame, so tests can "
    "interrupt a job mid-way (default 0)",
}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Limits:
    """What the service accepts as input."""

    max_upload_bytes: int = 4 << 30
    sync_max_bytes: int = 64 << 20
    sync_max_seconds: float = 30.0
    sync_max_frames: int = 900
    max_width: int = 7680
    max_height: int = 4320
    max_duration: float = 4 * 3600.0
    max_frames: int = 864_000


@dataclass(frozen=True)
class Settings:
    """Everything the API, executors and workers need to know; immutable once built."""

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str = ""
    storage_dir: Path = DEFAULT_DATA_DIR / "storage"
    queue_url: str | None = None
    workers: int = 1
    device: str = "auto"
    limits: Limits = field(default_factory=Limits)
    sync_concurrency: int = 1
    retention: float = 86400.0
    url_allowlist: tuple[str, ...] = ()
    url_timeout: float = 20.0
    job_time_limit: float = 6 * 3600.0
    job_max_retries: int = 3
    job_min_backoff_ms: int = 15_000
    job_max_backoff_ms: int = 600_000
    job_lease: float = 60.0
    queue_heartbeat_ms: int = 60_000
    queue_maintenance_chance: int = 10_000
    sweep_interval: float = 60.0
    test_frame_delay: float = 0.0
    api_keys: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_timeout: float = 10.0
    webhook_min_backoff: float = 5.0
    webhook_max_backoff: float = 600.0
    webhook_max_age: float = 86400.0
    events_poll: float = 0.5
    log_format: str = "json"
    metrics_port: int | None = None

    @property
    def uses_redis(self) -> bool:
        return bool(self.queue_url)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, data_dir: str | Path | None = None
    ) -> Settings:
        """Settings from ``env`` (default ``os.environ``); ``data_dir`` overrides
        ``VQE_DATA_DIR`` (database and storage follow it unless set explicitly)."""
        return load_settings(os.environ if env is None else env, data_dir)


def load_settings(env: Mapping[str, str], data_dir: str | Path | None = None) -> Settings:
    """Build :class:`Settings` from ``env``; ``data_dir`` overrides ``VQE_DATA_DIR``."""
    unknown = sorted(k for k in env if k.startswith("VQE_") and k not in ENV_VARS)
    if unknown:
        # A typo in a variable name would silently fall back to a default: say so.
        logging.getLogger("vqe.service").warning("unknown settings ignored: %s", ", ".join(unknown))
    root = Path(data_dir or env.get("VQE_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    storage = Path(env.get("VQE_STORAGE_DIR") or root / "storage").expanduser().resolve()
    database = env.get("VQE_DATABASE_URL") or f"sqlite:///{root / 'jobs.db'}"
    queue_url = env.get("VQE_QUEUE_URL", "").strip() or None
    if queue_url and not queue_url.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"VQE_QUEUE_URL must be a redis:// URL, not {queue_url!r}")
    d = Limits()
    limits = Limits(
        max_upload_bytes=_int(env, "VQE_MAX_UPLOAD_BYTES", d.max_upload_bytes),
        sync_max_bytes=_int(env, "VQE_SYNC_MAX_BYTES", d.sync_max_bytes),
        sync_max_seconds=_float(env, "VQE_SYNC_MAX_SECONDS", d.sync_max_seconds),
        sync_max_frames=_int(env, "VQE_SYNC_MAX_FRAMES", d.sync_max_frames),
        max_width=_int(env, "VQE_MAX_WIDTH", d.max_width),
        max_height=_int(env, "VQE_MAX_HEIGHT", d.max_height),
        max_duration=_float(env, "VQE_MAX_DURATION", d.max_duration),
        max_frames=_int(env, "VQE_MAX_FRAMES", d.max_frames),
    )
    s = Settings()
    allow = tuple(x.strip() for x in env.get("VQE_URL_ALLOWLIST", "").split(",") if x.strip())
    return Settings(
        data_dir=root,
        database_url=database,
        storage_dir=storage,
        queue_url=queue_url,
        workers=max(1, _int(env, "VQE_WORKERS", s.workers)),
        device=env.get("VQE_DEVICE", s.device).strip() or "auto",
        limits=limits,
        sync_concurrency=max(1, _int(env, "VQE_SYNC_CONCURRENCY", s.sync_concurrency)),
        retention=_float(env, "VQE_RETENTION", s.retention),
        url_allowlist=allow,
        url_timeout=_float(env, "VQE_URL_TIMEOUT", s.url_timeout),
        job_time_limit=_float(env, "VQE_JOB_TIME_LIMIT", s.job_time_limit),
        job_max_retries=max(0, _int(env, "VQE_JOB_MAX_RETRIES", s.job_max_retries)),
        job_min_backoff_ms=_int(env, "VQE_JOB_MIN_BACKOFF_MS", s.job_min_backoff_ms),
        job_max_backoff_ms=_int(env, "VQE_JOB_MAX_BACKOFF_MS", s.job_max_backoff_ms),
        job_lease=_float(env, "VQE_JOB_LEASE", s.job_lease),
        queue_heartbeat_ms=_int(env, "VQE_QUEUE_HEARTBEAT_MS", s.queue_heartbeat_ms),
        queue_maintenance_chance=_int(
            env, "VQE_QUEUE_MAINTENANCE_CHANCE", s.queue_maintenance_chance
        ),
        sweep_interval=_float(env, "VQE_SWEEP_INTERVAL", s.sweep_interval),
        test_frame_delay=_float(env, "VQE_TEST_FRAME_DELAY", s.test_frame_delay),
        api_keys=tuple(k.strip() for k in env.get("VQE_API_KEYS", "").split(",") if k.strip()),
        webhook_secret=env.get("VQE_WEBHOOK_SECRET", "").strip(),
        webhook_timeout=_float(env, "VQE_WEBHOOK_TIMEOUT", s.webhook_timeout),
        webhook_min_backoff=_float(env, "VQE_WEBHOOK_MIN_BACKOFF", s.webhook_min_backoff),
        webhook_max_backoff=_float(env, "VQE_WEBHOOK_MAX_BACKOFF", s.webhook_max_backoff),
        webhook_max_age=_float(env, "VQE_WEBHOOK_MAX_AGE", s.webhook_max_age),
        events_poll=max(0.05, _float(env, "VQE_EVENTS_POLL", s.events_poll)),
        log_format=_log_format(env),
        metrics_port=_int(env, "VQE_METRICS_PORT", 0) or None,
    )


def _log_format(env: Mapping[str, str]) -> str:
    value = env.get("VQE_LOG_FORMAT", "").strip().lower() or "json"
    if value not in ("json", "text"):
        raise UserError(f"VQE_LOG_FORMAT must be json or text, not {value!r}")
    return value


def cli_settings(data_dir: str | None, workers: int | None, flag: str, log_level: str) -> Settings:
    """Settings of a `vqe serve`/`vqe worker` process: ``workers`` (from ``flag``) overrides
    ``VQE_WORKERS``; logging is set up in the configured format."""
    from service.logs import setup as setup_logs

    if workers is not None:
        if workers < 1:
            raise UserError(f"{flag} must be at least 1")
        os.environ["VQE_WORKERS"] = str(workers)
    settings = Settings.from_env(data_dir=data_dir)
    setup_logs(log_level, settings.log_format)
    return settings
