"""``vqe enhance`` on several videos: ``INPUT... -o OUTDIR`` or ``INDIR OUTDIR``.

The videos run one after another with one model load
(:func:`enhancer.multi.enhance_many`); each output is ``OUTDIR/<input name>``.
An output that exists is skipped unless ``--overwrite``, so running the command
again resumes an interrupted batch. On a terminal one line on stderr shows the
batch (``[2/5]``), the current file and its progress; a failed video gets its
own ``error:`` line there. At the end a table on stdout gives, per file, the
frames, fps, the expected net gain, the output size and the error (``--json``:
one JSON object instead). Exit code 0 when every video is done or skipped, 1
when any failed (the others are still done), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from enhancer.multi import BatchItem, BatchProgress, BatchResult, enhance_many
from enhancer.options import EnhanceOptions
from enhancer.pipeline import Pipeline
from service.cli.progress import ProgressLine

EXIT_FAILED = 1
COLUMNS = ("file", "result", "frames", "fps", "gain dB", "size", "error")


class BatchLine:
    """The batch's progress on a terminal, and one line per failed video (any stream)."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.line = ProgressLine(stream) if live else None

    def __call__(self, report: BatchProgress) -> None:
        item = report.item
        if report.progress is None:
            if item.status == "failed":
                error = item.error or ""
                self.note(f"vqe enhance: error: {_named(item.input, error)}")
            elif item.status == "done" and item.result is not None:
                for warning in item.result.warnings:
                    self.note(f"vqe enhance: warning: {item.input}: {warning}")
            return
        if self.line is not None:
            self.line.prefix = f"[{report.index + 1}/{report.total}] {Path(item.input).name}  "
            self.line(report.progress)

    def note(self, text: str) -> None:
        if self.line is not None:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.line is not None:
            self.line.close()


def _named(path: str, message: str) -> str:
    """``message`` about the video ``path``, naming it once."""
    return message if path in message else f"{path}: {message}"


def run_batch(
    inputs: Sequence[str], output_dir: str, options: EnhanceOptions, args: argparse.Namespace
) -> int:
    """Run the batch; print its summary. Returns the exit code."""
    pipeline = Pipeline(device=args.device, tile=args.tile)
    line = BatchLine(sys.stderr, sys.stderr.isatty())
    previous = signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C
    try:
        batch = enhance_many(
            inputs,
            output_dir,
            options,
            overwrite=args.overwrite,
            pipeline=pipeline,
            progress=line,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        line.close()
    if args.json:
        print(json.dumps(batch_json(batch)))
    else:
        print(summary_table(batch.items))
        print(
            f"{batch.count('done')} done, {batch.count('skipped')} skipped (output exists), "
            f"{batch.count('failed')} failed in {batch.seconds:.1f} s -> {output_dir}"
        )
    return 0 if batch.ok else EXIT_FAILED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _row(item: BatchItem) -> list[str]:
    result = item.result
    gain = (
        ""
        if result is None or result.expected_gain_db is None
        else f"{result.expected_gain_db:+.2f}"
    )
    return [
        Path(item.input).name,
        {"done": "done", "skipped": "skipped", "failed": "FAILED"}.get(item.status or "", "-"),
        "" if result is None else str(result.frames),
        "" if result is None else f"{result.fps:.1f}",
        gain,
        "" if item.output_bytes is None else _size(item.output_bytes),
        item.error or ("output exists" if item.status == "skipped" else ""),
    ]


def summary_table(items: Sequence[BatchItem]) -> str:
    """One row per video: file, result, frames, fps, expected net gain, size, error."""
    rows = [list(COLUMNS), *(_row(item) for item in items)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    numeric = {2, 3, 4, 5}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def batch_json(batch: BatchResult) -> dict[str, Any]:
    """The ``--json`` object: counts, seconds, and per file its status, error and summary."""
    files = []
    for item in batch.items:
        result = item.result
        files.append(
            {
                "input": item.input,
                "output": item.output,
                "status": item.status,
                "error": item.error,
                "output_bytes": item.output_bytes,
                "frames": None if result is None else result.frames,
                "fps": None if result is None else result.fps,
                "expected_gain_db": None if result is None else result.expected_gain_db,
                "summary": None
                if result is None
                else {k: v for k, v in asdict(result).items() if k != "frame_log"},
            }
        )
    counts = {s: batch.count(s) for s in ("done", "skipped", "failed")}  # type: ignore[arg-type]
    return {**counts, "seconds": batch.seconds, "files": files}
