"""Batch jobs: the store (SQLAlchemy), file storage, executors (in-process and the
Dramatiq/Redis queue), the job runner, webhooks and metrics. Imports no HTTP framework
except in ``metrics`` (Prometheus' exposition)."""
