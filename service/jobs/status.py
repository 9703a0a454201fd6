"""A job's status and phase: the store's vocabulary, shown as-is by the API."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["JobPhase", "JobStatus"]


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
