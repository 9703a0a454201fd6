"""What the parts of one process share: its settings, the job database's repositories,
the file storage and the URL policy.

A :class:`Context` is a plain record: it is built in one place,
:func:`service.jobs.runtime.open_context` (the composition root), and handed to the
job runner, the queue, the webhook dispatcher, the heartbeat and the API.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.ingest.policy import URLPolicy
from service.jobs.batches import BatchStore
from service.jobs.counts import JobCounts
from service.jobs.database import Database
from service.jobs.outbox import WebhookOutbox
from service.jobs.storage import Storage
from service.jobs.store import JobStore
from service.jobs.workers import WorkerRegistry


@dataclass(frozen=True)
class Context:
    """Settings, the database and its repositories, storage and URL policy of a process."""

    settings: Settings
    db: Database
    jobs: JobStore
    batches: BatchStore
    outbox: WebhookOutbox
    workers: WorkerRegistry
    counts: JobCounts
    storage: Storage
    policy: URLPolicy

    def close(self) -> None:
        self.db.close()
