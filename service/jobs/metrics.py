"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

Two sources:

* The job store, read at each scrape, so every API replica reports the same
  cluster-wide figures: ``vqe_jobs{status}``, ``vqe_queue_depth`` (queued
  jobs), ``vqe_frames_enhanced_total`` (frames of succeeded jobs),
  ``vqe_running_fps`` (summed speed of running jobs), ``vqe_workers{kind}``
  (job threads of the runners that sent a heartbeat lately: ``executor`` for
  the API's in-process threads, ``worker`` for ``vqe worker`` processes) and
  ``vqe_webhook_events{state}``.
* This process: ``vqe_http_request_duration_seconds{method,route,status}``
  (route templates, not raw paths) and, for the jobs this process ran,
  ``vqe_job_seconds``, ``vqe_job_fps`` and ``vqe_frame_stages`` (frames by the
  number of enhancement stages run on them). ``vqe worker`` serves its own on
  ``VQE_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.jobs.counts import JobCounts
from service.jobs.database import utcnow
from service.jobs.status import JobStatus
from service.jobs.workers import WorkerRegistry

log = logging.getLogger("vqe.metrics")
disable_created_metrics()  # no `_created` series: they double the output for nothing here

HEARTBEAT_SECONDS = 15.0  # a runner's heartbeat period; silent for 3 periods = gone
MAX_STAGES = 16
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOB_SECONDS = Histogram(
    "vqe_job_seconds",
    "Run time of the jobs this process finished.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=None,
)
JOB_FPS = Histogram(
    "vqe_job_fps",
    "Enhancement speed (frames/s) of the jobs this process ran.",
    buckets=(0.5, 1, 2, 5, 10, 25, 50, 100, 250),
    registry=None,
)


class _Stages(Collector):
    """Frames by number of stages run, accumulated over this process's jobs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = [0] * (MAX_STAGES + 1)  # index = stages
        self.total = 0

    def add(self, histogram: Mapping[str, int]) -> None:
        with self.lock:
            for key, n in histogram.items():
                if str(key).isdigit():
                    self.counts[min(MAX_STAGES, int(key))] += int(n)
                    self.total += int(key) * int(n)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            counts, total = list(self.counts), self.total
        buckets, running = [], 0
        for stages in range(1, MAX_STAGES + 1):
            running += counts[stages] + (counts[0] if stages == 1 else 0)
            buckets.append((str(float(stages)), running))
        buckets.append(("+Inf", running))
        yield HistogramMetricFamily(
            "vqe_frame_stages",
            "Enhanced frames by stages run on them.",
            buckets=buckets,
            sum_value=total,
        )


STAGES = _Stages()


def record_job(stats: Mapping[str, Any]) -> None:
    """Account a job this process finished (its stored stats)."""
    if stats.get("seconds"):
        JOB_SECONDS.observe(float(stats["seconds"]))
    if stats.get("fps"):
        JOB_FPS.observe(float(stats["fps"]))
    STAGES.add(stats.get("stages_histogram") or {})


class StoreCollector(Collector):
    """Cluster-wide figures read from the job store at each scrape."""

    def __init__(self, counts: JobCounts, workers: WorkerRegistry) -> None:
        self.counts = counts
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vqe_store_up", "1 when the job store answered this scrape.")
        try:
            counts = self.counts.counts()
            since = utcnow() - timedelta(seconds=3 * HEARTBEAT_SECONDS)
            workers = self.workers.live(since)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB did
            log.warning("metrics: job store unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("vqe_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts["jobs"].get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "vqe_queue_depth",
            "Jobs waiting for a worker.",
            value=counts["jobs"].get(JobStatus.queued.value, 0),
        )
        yield CounterMetricFamily(
            "vqe_frames_enhanced", "Frames of succeeded jobs.", value=counts["frames"]
        )
        yield GaugeMetricFamily(
            "vqe_running_fps", "Summed frames/s of running jobs.", value=counts["fps"]
        )
        threads = GaugeMetricFamily("vqe_workers", "Job threads of live runners.", labels=["kind"])
        for kind in ("executor", "worker"):
            threads.add_metric([kind], workers.get(kind, 0))
        yield threads
        hooks = GaugeMetricFamily(
            "vqe_webhook_events", "Webhook deliveries by state.", labels=["state"]
        )
        for state in ("pending", "delivered", "failed"):
            hooks.add_metric([state], counts["webhooks"].get(state, 0))
        yield hooks


def registry_for(
    counts: JobCounts, workers: WorkerRegistry, extra: tuple[Collector, ...] = ()
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in (StoreCollector(counts, workers), JOB_SECONDS, JOB_FPS, STAGES, *extra):
        registry.register(collector)
    return registry


class LatencyMiddleware:
    """ASGI middleware: request duration by method, route template and status."""

    def __init__(self, app: Any, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.histogram.labels(scope.get("method", "GET"), route, str(status)).observe(
                time.perf_counter() - start
            )


def install(app: FastAPI, counts: JobCounts, workers: WorkerRegistry) -> None:
    """``GET /metrics`` and the request-latency middleware."""
    latency = Histogram(
        "vqe_http_request_duration_seconds",
        "HTTP request duration.",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=None,
    )
    registry = registry_for(counts, workers, (latency,))
    app.add_middleware(LatencyMiddleware, histogram=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class Heartbeat:
    """Tells the store this runner is alive (for ``vqe_workers``) every few seconds."""

    def __init__(
        self,
        workers: WorkerRegistry,
        identity: str,
        kind: str,
        threads: int,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.workers = workers
        self.identity, self.kind, self.threads = identity, kind, threads
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqe-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self.workers.forget(self.identity)
        except Exception:  # noqa: BLE001 - the row just ages out
            log.debug("cannot remove worker row", exc_info=True)

    def _loop(self) -> None:
        while True:
            try:
                self.workers.beat(self.identity, self.kind, self.threads)
            except Exception:  # noqa: BLE001 - try again next period
                log.warning("heartbeat failed", exc_info=True)
            if self._stop.wait(self.interval):
                return


def serve_worker_metrics(port: int, counts: JobCounts, workers: WorkerRegistry) -> None:
    """``vqe worker``: serve this process's /metrics on ``port`` (a daemon thread)."""
    from prometheus_client import start_http_server

    start_http_server(port, registry=registry_for(counts, workers))
