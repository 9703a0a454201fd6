"""``vqe db``: the job database's schema (Alembic migrations, ``service.jobs.migrations``).

``vqe db upgrade`` brings the database of ``VQE_DATABASE_URL`` (or the SQLite file
under ``--data-dir``) to this version's schema; run it once before starting new
API and worker processes on several hosts (with ``VQE_DB_AUTO_UPGRADE=false``
they refuse an older schema instead of upgrading it). ``vqe db current`` prints
the database's revision and this version's.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "db",
        help="upgrade or show the job database schema",
        description="Upgrade (`vqe db upgrade`) or show (`vqe db current`) the schema of the "
        "job database at VQE_DATABASE_URL (default: SQLite under --data-dir).",
    )
    p.add_argument("action", choices=["upgrade", "current"])
    p.add_argument("--data-dir", default=None, help="as for `vqe serve` (VQE_DATA_DIR)")
    p.add_argument(
        "--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def run(args: argparse.Namespace) -> int:
    from service.config import cli_settings
    from service.jobs import migrations
    from service.jobs.database import make_engine

    settings = cli_settings(args.log_level, data_dir=args.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    where = settings.database_url.split("@")[-1]
    engine = make_engine(settings.database_url)
    try:
        if args.action == "current":
            with engine.connect() as conn:
                now = migrations.current(conn)
            print(f"{where}: revision {', '.join(now) or 'none'} (this vqe: {migrations.head()})")
            return 0
        before, after = migrations.ensure_schema(engine)
    finally:
        engine.dispose()
    if before == (after,):
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from revision {', '.join(before) or 'none'} to {after}")
    return 0
