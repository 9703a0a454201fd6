"""The `vqe` command line: a thin dispatcher; each subcommand lives in its own module.

Every subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
Library errors (any ``bitstream.errors.VqeError``)
become a one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "inspect": "service.cli.inspect",
    "enhance": "service.cli.enhance",
    "train": "enhancer.training.train",
    "serve": "service.cli.serve",
    "worker": "service.cli.worker",
    "db": "service.cli.db",
}


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The parser; with ``only``, import just that subcommand (keeps `vqe inspect` torch-free)."""
    parser = argparse.ArgumentParser(
        prog="vqe", description="Codec-aware video quality enhancement."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules: dict[str, object] = {}
    chosen = {only: SUBCOMMANDS[only]} if only in SUBCOMMANDS else SUBCOMMANDS
    for name, modname in chosen.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # optional extras (e.g. the service) not installed
            # Skip a subcommand whose optional extra (e.g. fastapi) is not installed.
            if exc.name and exc.name.split(".")[0] in ("service", "enhancer", "bitstream"):
                if exc.name == modname:
                    continue
                raise
            continue
        mod.add_parser(sub)  # type: ignore[attr-defined]
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from bitstream.errors import VqeError, first_line

    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser, modules = build_parser(first)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)  # type: ignore[attr-defined]
    except VqeError as exc:
        print(f"vqe {args.command}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
