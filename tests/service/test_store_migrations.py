"""The job store's schema under Alembic, on SQLite and on a real PostgreSQL server.

``data/schema_17c8c87.<dialect>.sql`` is the previous schema: what ``create_all``
made at commit 17c8c87, before migrations. The databases patched in place by the
old column adder had every column but not the ``ix_jobs_owner_key`` index; the
``no_owner_index`` cases start from that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.jobs import migrations
from service.jobs.database import Database
from service.jobs.migrations import SchemaError
from service.jobs.status import JobStatus
from service.jobs.store import Claim, JobStore
from service.jobs.tables import Base

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
OLD_JOB = "0123456789abcdef0123456789abcdef"


def _differences(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _load_previous_schema(url: str, owner_index: bool) -> None:
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    script = (DATA / f"schema_17c8c87.{dialect}.sql").read_text()
    statements = [s.strip() for s in script.split(";") if s.strip()]
    statements = [
        "\n".join(line for line in s.splitlines() if not line.startswith("--")) for s in statements
    ]
    if not owner_index:
        statements = [s for s in statements if "ix_jobs_owner_key" not in s]
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.execute(
                text(
                    "INSERT INTO jobs (id, status, frames_done, attempts, created_at, updated_at,"
                    " expired, deleted, cancel_requested, source_kind, input_ready, result_ext,"
                    " options) VALUES (:id, 'queued', 0, 0, :t, :t, false, false, false,"
                    " 'upload', true, '.mp4', '{\"stages\": 1}')"
                ),
                {"id": OLD_JOB, "t": "2026-11-23 20:24:00"},
            )
    finally:
        engine.dispose()


def test_a_new_database_gets_the_models_schema(database_url: str):
    Database(database_url).close()
    assert _differences(database_url) == []
    engine = create_engine(database_url)
    with engine.connect() as conn:
        assert migrations.current(conn) == (migrations.head(),)
    engine.dispose()


@pytest.mark.parametrize("owner_index", [True, False], ids=["create_all", "no_owner_index"])
def test_the_previous_schema_is_upgraded_in_place(database_url: str, owner_index: bool):
    _load_previous_schema(database_url, owner_index)
    assert _differences(database_url) != []  # no queue_sent_at, maybe no owner index
    db = Database(database_url)
    store = JobStore(db)
    try:
        assert _differences(database_url) == []
        indexes = {ix["name"] for ix in inspect(db.engine).get_indexes("jobs")}
        assert "ix_jobs_owner_key" in indexes
        old = store.get(OLD_JOB)  # the old row survived, and works with the new code
        assert old is not None and old.status == "queued" and old.queue_sent_at is None
        assert old.options == {"stages": 1} and old.revision == 0
        assert store.resend_candidates(quiet=0, lease_grace=0) == [OLD_JOB]
        assert store.claim(OLD_JOB, "w", 30) is Claim.claimed
        assert store.finish(OLD_JOB, "w", JobStatus.succeeded)
    finally:
        db.close()
    Database(database_url).close()  # a second start finds nothing to do


def test_a_newer_unknown_schema_is_refused(database_url: str, tmp_path: Path):
    Database(database_url).close()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="9999_from_the_future.*does not know"):
        Database(database_url)
    done = _vqe("db", "upgrade", url=database_url, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "newer vqe" in lines[0], done.stderr


def test_without_auto_upgrade_an_old_schema_needs_vqe_db_upgrade(database_url: str, tmp_path: Path):
    _load_previous_schema(database_url, owner_index=False)
    with pytest.raises(SchemaError, match="vqe db upgrade"):
        Database(database_url, upgrade=False)
    done = _vqe("db", "upgrade", url=database_url, tmp_path=tmp_path)
    head = migrations.head()
    assert done.returncode == 0 and f"to {head}" in done.stdout, done.stderr
    Database(database_url, upgrade=False).close()
    assert _differences(database_url) == []
    current = _vqe("db", "current", url=database_url, tmp_path=tmp_path)
    assert f"revision {head} (this vqe: {head})" in current.stdout, current.stderr


def _vqe(*args: str, url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VQE_DATABASE_URL": url, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
