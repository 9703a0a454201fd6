"""Cluster-wide counts for ``/metrics``: jobs per status, frames, running speed, webhooks.

Read from the job database at each scrape (:class:`service.jobs.metrics.StoreCollector`),
so every API replica and worker reports the same figures.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from service.jobs.database import Database
from service.jobs.status import JobStatus
from service.jobs.tables import JobRow, WebhookEvent


class JobCounts:
    """The aggregate reads behind the store's metrics."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def counts(self) -> dict[str, Any]:
        """Jobs per status, frames of succeeded jobs, summed fps of running jobs, webhooks."""
        with self.db.read() as s:
            by_status = dict(
                s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
            )
            frames = s.scalar(
                select(func.coalesce(func.sum(JobRow.frames_done), 0)).where(
                    JobRow.status == JobStatus.succeeded.value
                )
            )
            fps = s.scalar(
                select(func.coalesce(func.sum(JobRow.fps), 0.0)).where(
                    JobRow.status == JobStatus.running.value
                )
            )
            hooks = dict(
                s.execute(
                    select(WebhookEvent.state, func.count()).group_by(WebhookEvent.state)
                ).all()
            )
        return {
            "jobs": {k: int(v) for k, v in by_status.items()},
            "frames": int(frames or 0),
            "fps": float(fps or 0.0),
            "webhooks": {k: int(v) for k, v in hooks.items()},
        }
