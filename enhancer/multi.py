"""Many videos, one model load: ``enhance_many(inputs, output_dir, options)``.

    from enhancer import enhance_many
    batch = enhance_many(["a.mp4", "clips/"], "out/", {"stages": "auto"})
    for item in batch.items:
        print(item.input, item.status, item.error)

``inputs`` are files and folders (a folder stands for the videos directly in it,
by extension, sorted by name). Each output is ``output_dir/<the input's file
name>``; an input whose extension is not a container the writer makes (``.avi``,
``.ts``, ``.264``...) is written as ``<its stem>.mkv``. The folder is created if
needed. The videos run one after another through one
:class:`~enhancer.pipeline.Pipeline`, so the model loads once.

* An output that already exists is skipped unless ``overwrite``: an interrupted
  batch resumes where it stopped. The pipeline writes each output under a hidden
  temporary name and renames it when complete, so a file that exists is a whole one.
* A video that fails (corrupt, not a video...) is recorded with its one-line
  error; the others still run. A model that cannot be set up stops the batch
  (every video would fail the same way).
* Problems with the request itself (no input, a missing path, two inputs with the
  same output name, the output folder being an input's folder) raise
  :class:`~bitstream.errors.UserError` before anything runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bitstream.errors import UserError, VqeError, first_line
from bitstream.writer import CONTAINER_FORMATS, STDOUT
from enhancer.options import EnhanceOptions, parse_options
from enhancer.pipeline import Cancelled, EnhanceResult, Pipeline, Progress

__all__ = [
    "VIDEO_EXTENSIONS",
    "BatchItem",
    "BatchProgress",
    "BatchResult",
    "enhance_many",
    "output_name",
    "plan_outputs",
]

#: Extensions a folder's videos are recognised by.
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".mov", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".flv", ".mpg",
     ".mpeg", ".3gp", ".ivf", ".y4m", ".nut", ".264", ".h264", ".265", ".hevc"}
)  # fmt: skip
FALLBACK_EXTENSION = ".mkv"

Status = Literal["done", "skipped", "failed"]


@dataclass
class BatchItem:
    """One video of a batch and what became of it."""

    input: str
    output: str
    status: Status | None = None  # None: not reached (the batch was stopped)
    result: EnhanceResult | None = None  # when done
    error: str | None = None  # one line, when failed
    output_bytes: int | None = None  # of the output (done or skipped)


@dataclass
class BatchResult:
    items: list[BatchItem]
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def failed(self) -> list[BatchItem]:
        return [item for item in self.items if item.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class BatchProgress:
    """Where a batch stands: the current video (``index`` of ``total``) and its progress."""

    index: int  # 0-based
    total: int
    item: BatchItem
    progress: Progress | None = None  # None: the video's status just changed
    finished: list[BatchItem] = field(default_factory=list)


def output_name(source: Path) -> str:
    """The output's file name for ``source``: the same name, or ``<stem>.mkv`` for an
    extension the writer does not make."""
    if source.suffix.lower() in CONTAINER_FORMATS:
        return source.name
    return source.stem + FALLBACK_EXTENSION


def _videos_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS
    )


def plan_outputs(inputs: Iterable[str | Path], output_dir: str | Path) -> list[BatchItem]:
    """The (input, output) pairs of a batch, after the checks that need no decoding."""
    if str(output_dir) == STDOUT:
        raise UserError("several videos need an output folder, not - (stdout)")
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"the output folder is a file: {out_dir}")
    sources: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = _videos_in(path)
            if not found:
                raise UserError(f"no video files in {path} (by extension)")
            sources += found
        elif path.is_file():
            sources.append(path)
        else:
            raise UserError(f"no such file or folder: {path}")
    if not sources:
        raise UserError("no input videos")
    items: list[BatchItem] = []
    seen: dict[Path, Path] = {}
    for source in sources:
        target = out_dir / output_name(source)
        key = Path(target.resolve() if target.parent.exists() else target.absolute())
        if source.resolve().parent == key.parent:
            raise UserError(f"the output folder must not be the folder of the input {source}")
        if key in seen:
            raise UserError(f"{seen[key]} and {source} would both be written to {target}")
        seen[key] = source
        items.append(BatchItem(str(source), str(target)))
    return items


def enhance_many(
    inputs: Iterable[str | Path],
    output_dir: str | Path,
    options: EnhanceOptions | Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    device: str = "auto",
    tile: int | None = None,
    pipeline: Pipeline | None = None,
    progress: Callable[[BatchProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> BatchResult:
    """Enhance every video of ``inputs`` into ``output_dir`` with one model load.

    ``progress`` is called when a video starts or ends (``progress=None`` in the
    report) and with each of its progress reports. Setting ``cancel`` stops the
    batch (:class:`enhancer.pipeline.Cancelled`; the finished outputs stay).
    Returns every video's status; it does not raise for a video that failed.
    """
    if not isinstance(options, EnhanceOptions):
        options = parse_options(dict(options or {}))
    items = plan_outputs(inputs, output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    pipeline = pipeline or Pipeline(device=device, tile=tile)
    notify = progress or (lambda _p: None)
    started = time.monotonic()
    done: list[BatchItem] = []
    for index, item in enumerate(items):
        target = Path(item.output)
        if target.exists() and not overwrite:
            item.status = "skipped"
            item.output_bytes = target.stat().st_size
        else:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            notify(BatchProgress(index, len(items), item, None, done))
            pipeline.load(options)  # load the model once, here, so a failure stops the batch
            _run_one(pipeline, item, options, cancel, index, len(items), done, notify)
        done.append(item)
        notify(BatchProgress(index, len(items), item, None, done))
    return BatchResult(items, round(time.monotonic() - started, 3))


def _run_one(
    pipeline: Pipeline,
    item: BatchItem,
    options: EnhanceOptions,
    cancel: threading.Event | None,
    index: int,
    total: int,
    done: list[BatchItem],
    notify: Callable[[BatchProgress], None],
) -> None:
    def report(p: Progress) -> None:
        notify(BatchProgress(index, total, item, p, done))

    try:
        item.result = pipeline.run(item.input, item.output, options, report, cancel)
    except Cancelled:
        raise
    except VqeError as exc:
        item.status, item.error = "failed", first_line(exc, exc.code)
        return
    except OSError as exc:  # disk full, permission denied: this file's, maybe all of them
        item.status, item.error = "failed", f"{exc.strerror or exc}: {exc.filename or item.output}"
        return
    except Exception as exc:  # noqa: BLE001 - a bug on one video must not lose the others
        item.status, item.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        return
    item.status = "done"
    item.output_bytes = Path(item.output).stat().st_size
