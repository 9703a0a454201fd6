"""The job store's schema, versioned with Alembic (``vqe db upgrade``).

:func:`ensure_schema` runs at every opening of a :class:`service.jobs.database.Database`:
under a lock (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL) it reads
the database's revision, refuses one this version of vqe does not know (a newer
schema, written by a newer release), and upgrades an older one (or, with
``upgrade=False``, refuses it and names the command). Databases made before
migrations (``create_all``, no ``alembic_version`` table) are upgraded by the
baseline revision, which only adds what they lack.

A schema change is a new file in ``versions/`` (``down_revision`` = the previous
head), and the matching change of the models in ``service/jobs/tables.py``;
``tests/service/test_store_migrations.py`` checks that the migrated schema equals
the models on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from service.errors import OperatorError

HERE = Path(__file__).resolve().parent
PG_LOCK_ID = 0x76_71_65_01  # pg_advisory_xact_lock key of schema upgrades ("vqe" 1)


class SchemaError(OperatorError):
    """The database's schema is one this process cannot run on."""

    code = "database_schema"


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    rev = script().get_current_head()
    assert rev is not None
    return rev


def current(connection: Connection) -> tuple[str, ...]:
    """The revision(s) stamped in the database; () for none (empty or pre-migration)."""
    return tuple(MigrationContext.configure(connection).get_current_heads())


def _lock(connection: Connection) -> None:
    """Serialise upgrades between processes (SQLite: the engine's BEGIN IMMEDIATE does)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK_ID})")


def ensure_schema(engine: Engine, *, upgrade: bool = True) -> tuple[tuple[str, ...], str]:
    """Check the schema and bring it to the head revision.

    Returns ``(revision before, revision now)``. Raises :class:`SchemaError` for a
    revision this code does not know (a newer vqe wrote it: this one must not touch
    it), or, with ``upgrade=False``, for an older one."""
    scripts = script()
    target = head()
    with engine.begin() as conn:
        _lock(conn)
        before = current(conn)
        unknown = [rev for rev in before if _get_revision(scripts, rev) is None]
        if unknown:
            raise SchemaError(
                f"the job database has schema revision {', '.join(unknown)}, which this "
                f"version of vqe does not know (its newest is {target}): it was upgraded by a "
                "newer vqe; run that version, or restore a backup"
            )
        if before == (target,):
            return before, target
        if not upgrade:
            raise SchemaError(
                f"the job database has schema revision {', '.join(before) or 'none'}, not "
                f"{target}: run `vqe db upgrade` first"
            )
        command.upgrade(_config(conn), "head")
    return before, target


def _get_revision(scripts: ScriptDirectory, rev: str) -> object | None:
    try:
        return scripts.get_revision(rev)
    except Exception:  # noqa: BLE001 - alembic raises for unknown revisions
        return None
