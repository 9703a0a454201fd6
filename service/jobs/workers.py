"""Worker heartbeats: which job runners are alive, and with how many threads.

Every job runner (the API's in-process executor, each ``vqe worker`` process) writes
its row in ``workers`` every few seconds (:class:`service.jobs.metrics.Heartbeat`) and
removes it when it stops; ``vqe_workers{kind}`` sums the threads of the rows seen
lately.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select

from service.jobs.database import Database, utcnow
from service.jobs.tables import WorkerRow


class WorkerRegistry:
    """Reads and writes of the ``workers`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def beat(self, identity: str, kind: str, threads: int) -> None:
        """Record that the runner ``identity`` is alive."""
        with self.db.write() as s:
            row = s.get(WorkerRow, identity)
            if row is None:
                s.add(WorkerRow(identity=identity, kind=kind, threads=threads, seen_at=utcnow()))
            else:
                row.seen_at, row.threads = utcnow(), threads

    def forget(self, identity: str) -> None:
        with self.db.write() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.identity == identity))

    def live(self, since: datetime) -> dict[str, int]:
        """Worker threads per kind among the runners seen since ``since``."""
        with self.db.read() as s:
            rows = s.execute(
                select(WorkerRow.kind, func.sum(WorkerRow.threads))
                .where(WorkerRow.seen_at >= since)
                .group_by(WorkerRow.kind)
            )
            return {kind: int(n or 0) for kind, n in rows}
