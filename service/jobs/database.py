"""The job database: the engine, its sessions, and what every repository's queries share.

:class:`Database` opens the SQLAlchemy engine at ``VQE_DATABASE_URL`` (SQLite by
default, PostgreSQL for many nodes), checks its schema with Alembic
(:mod:`service.jobs.migrations`; an older one is upgraded) and hands out
transactions: :meth:`Database.write` (one transaction that may write; on SQLite it
takes the write lock up front) and :meth:`Database.read` (read-only, no lock). The
repositories (:mod:`service.jobs.store` for jobs, :mod:`service.jobs.batches`,
:mod:`service.jobs.outbox`, :mod:`service.jobs.workers`, :mod:`service.jobs.counts`)
each take the one ``Database`` of their process; the tables are in
:mod:`service.jobs.tables`. Also here: the timezone-aware UTC column type, list cursors
and the owner filter, shared by the job and batch lists.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import DateTime, Select, TypeDecorator, create_engine, event, or_, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

Row = TypeVar("Row")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below open transactions, and wait on locks.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Take the write lock up front: a deferred transaction that reads and then
            # writes fails at once (SQLITE_BUSY) when another process wrote meanwhile.
            # Read-only sessions (:meth:`Database.read`) need no lock: WAL gives them a
            # snapshot while writers go on.
            read_only = conn.get_execution_options().get("vqe_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """The engine of one job database and its transactions, shared by the repositories."""

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        """Open the database at ``url``; its schema is checked and (``upgrade``) brought up
        to date (see :func:`service.jobs.migrations.ensure_schema`)."""
        from service.jobs.migrations import ensure_schema

        self.url = url
        self.engine = make_engine(url)
        try:
            ensure_schema(self.engine, upgrade=upgrade)
        except BaseException:
            self.engine.dispose()
            raise
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(
            self.engine.execution_options(vqe_read_only=True), expire_on_commit=False
        )

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction that may write (committed at the end, rolled back on error)."""
        with self._writes.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads (no write lock on SQLite)."""
        with self._reads.begin() as session:
            yield session

    def ping(self) -> None:
        with self.write() as s:
            s.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    def create_once(
        self, key: str | None, lookup: Callable[[str], Row | None], add: Callable[[Session], Row]
    ) -> tuple[Row, bool]:
        """Insert what ``add`` adds to the session, unless the idempotency ``key`` was used
        already: then the row ``lookup`` finds for it. Returns ``(row, created)``."""
        if key:
            existing = lookup(key)
            if existing is not None:
                return existing, False
        try:
            with self.write() as s:
                row = add(s)
        except IntegrityError:
            # Lost a race with a request carrying the same key.
            existing = lookup(key or "")
            if existing is None:
                raise
            return existing, False
        return row, True


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number in a cursor; ``ValueError`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("malformed cursor") from None
    if not raw.startswith("s") or not raw[1:].isdigit():
        raise ValueError("malformed cursor")
    return int(raw[1:])


def page(
    db: Database,
    query: Select[tuple[Row]],
    table: Any,
    limit: int,
    cursor: str | None,
    owner: str | None,
    ownerless: bool,
) -> tuple[list[Row], str | None]:
    """A page of ``query`` on ``table`` (one with ``seq`` and ``owner_key`` columns), newest
    first, and the cursor of the next page (or None). ``owner``: only the rows of that
    API key id (and, with ``ownerless``, those made while keys were off)."""
    query = query.order_by(table.seq.desc()).limit(limit + 1)
    if owner is not None:
        mine = table.owner_key == owner
        query = query.where(or_(mine, table.owner_key.is_(None)) if ownerless else mine)
    if cursor:
        query = query.where(table.seq < decode_cursor(cursor))
    with db.read() as s:
        rows = list(s.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].seq) if more and rows else None)  # type: ignore[attr-defined]
