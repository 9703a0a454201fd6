"""Test only: ``vqe serve`` / ``vqe worker`` whose jobs are slowed, so tests can stop,
kill or cancel them mid-way.

``TEST_FRAME_DELAY=S python -m tests.slow_service serve|worker ARGS...`` runs the
subcommand with an observer (:data:`service.jobs.executor.Observer`, given through the
composition root) that sleeps ``S`` seconds per enhanced frame. It is how
:class:`tests.service_fixtures.ServiceProcess` starts a process whose environment sets
``TEST_FRAME_DELAY``; in-process tests give :func:`frame_delay` to a ``JobRunner``.
Production code never sleeps for tests.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from enhancer.pipeline import Progress

FRAME_DELAY = "TEST_FRAME_DELAY"  # not VQE_*: no setting of the service


def frame_delay(seconds: float) -> Callable[[Progress], None]:
    """An observer that sleeps ``seconds`` on each enhanced frame's progress report."""

    def observe(progress: Progress) -> None:
        if progress.phase == "enhancing":
            time.sleep(seconds)

    return observe


def main(argv: list[str]) -> int:
    from service.cli import build_parser

    parser, modules = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    observer = frame_delay(float(os.environ.get(FRAME_DELAY, "0")))
    return int(modules[args.command].run(args, observer=observer) or 0)  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
