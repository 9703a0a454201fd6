"""A job's status and phase, a batch's status: the store's vocabulary, shown as-is by the API."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BatchStatus", "JobPhase", "JobStatus"]


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class JobPhase(StrEnum):
    probing = "probing"
    enhancing = "enhancing"
    encoding = "encoding"


class BatchStatus(StrEnum):
    """A batch's status, from its jobs' statuses."""

    queued = "queued"  # no job has started
    running = "running"  # some job is queued or running, and some job has started or ended
    succeeded = "succeeded"  # every job succeeded
    partial = "partial"  # every job ended; some succeeded, some failed or were canceled
    failed = "failed"  # every job ended and none succeeded; some failed
    canceled = "canceled"  # every job was canceled

    @property
    def finished(self) -> bool:
        return self not in (BatchStatus.queued, BatchStatus.running)
