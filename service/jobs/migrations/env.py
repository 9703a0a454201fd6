"""Alembic's environment: always run on the connection :func:`ensure_schema` hands over
(inside its transaction and lock); no ``alembic.ini``, no URL of its own."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `vqe db upgrade` (service.jobs.migrations)")
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
