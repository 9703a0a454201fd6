"""The webhook outbox: the deliveries a job change makes, and their sending state.

A job that ends (or passes a tenth of its frames, with ``webhook_progress``) gets a
:class:`~service.jobs.tables.WebhookEvent` row in the same transaction as the change
(:func:`add_event`, :func:`progress_event`, called by the job and batch repositories);
:class:`WebhookOutbox` is what :class:`service.jobs.webhooks.WebhookDispatcher` reads
and updates: due events leased to one sender, the body fixed at the first attempt,
each attempt recorded.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.jobs.database import Database, utcnow
from service.jobs.tables import JobRow, WebhookEvent


class WebhookOutbox:
    """Reads and writes of webhook deliveries."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, owner: str, lease: float, limit: int = 20) -> list[WebhookEvent]:
        """Due deliveries, each leased to ``owner`` so no other process sends it meanwhile."""
        now = utcnow()
        with self.db.write() as s:
            ids = list(
                s.scalars(
                    select(WebhookEvent.id)
                    .where(
                        WebhookEvent.state == "pending",
                        WebhookEvent.next_attempt_at <= now,
                        or_(WebhookEvent.lease_expires.is_(None), WebhookEvent.lease_expires < now),
                    )
                    .order_by(WebhookEvent.created_at)
                    .limit(limit)
                )
            )
            if not ids:
                return []
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id.in_(ids))
                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease))
            )
            return list(
                s.scalars(
                    select(WebhookEvent)
                    .where(WebhookEvent.id.in_(ids))
                    .order_by(WebhookEvent.created_at)
                )
            )

    def set_body(self, event_id: str, body: str) -> str:
        """Fix the body of a delivery at its first attempt; returns the stored body."""
        with self.db.write() as s:
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, WebhookEvent.body.is_(None))
                .values(body=body)
            )
            return s.scalar(select(WebhookEvent.body).where(WebhookEvent.id == event_id)) or body

    def attempted(
        self,
        event_id: str,
        owner: str,
        *,
        delivered: bool,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """Record an attempt: delivered, to retry at ``retry_at``, or given up (neither)."""
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": WebhookEvent.attempts + 1,
            "lease_owner": None,
            "lease_expires": None,
            "last_error": error,
        }
        if delivered:
            values.update(state="delivered", delivered_at=now)
        elif retry_at is not None:
            values["next_attempt_at"] = retry_at
        else:
            values["state"] = "failed"
        with self.db.write() as s:
            s.execute(
                update(WebhookEvent)
                .where(WebhookEvent.id == event_id, WebhookEvent.lease_owner == owner)
                .values(**values)
            )

    def events(self, job_id: str) -> list[WebhookEvent]:
        with self.db.read() as s:
            query = select(WebhookEvent).where(WebhookEvent.job_id == job_id)
            return list(s.scalars(query.order_by(WebhookEvent.created_at)))


def add_event(s: Session, job_id: str, type_: str) -> None:
    """Queue a webhook delivery for ``job_id`` (in the caller's transaction), if it has one."""
    url = s.scalar(select(JobRow.webhook_url).where(JobRow.id == job_id))
    if url:
        s.add(
            WebhookEvent(
                id=f"evt_{uuid.uuid4().hex}",
                job_id=job_id,
                type=type_,
                url=url,
                created_at=utcnow(),
                next_attempt_at=utcnow(),
            )
        )


def progress_event(s: Session, job_id: str) -> None:
    """A ``job.progress`` delivery each time a job with ``webhook_progress`` passes 10 %."""
    row = s.execute(
        select(
            JobRow.webhook_progress, JobRow.webhook_decile, JobRow.frames_done, JobRow.frames_total
        ).where(JobRow.id == job_id)
    ).one_or_none()
    if row is None or not row.webhook_progress or not row.frames_total:
        return
    decile = min(9, (row.frames_done or 0) * 10 // row.frames_total)
    if decile <= row.webhook_decile:
        return
    s.execute(update(JobRow).where(JobRow.id == job_id).values(webhook_decile=decile))
    add_event(s, job_id, "job.progress")
