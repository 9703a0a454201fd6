"""The streaming enhance pipeline: reader -> engine -> writer (the library behind ``enhance``).

Three stages run at once, with bounded queues between them, so memory does
not grow with the video's length::

    decode thread --(QUEUE_FRAMES)--> engine (calling thread) --(QUEUE_FRAMES)--> encode thread

* The decode thread owns the :class:`~bitstream.reader.VideoReader`; the
  encode thread owns the :class:`~bitstream.writer.VideoWriter`; the model
  runs in the calling thread (progress callbacks come from it too).
* An error in any stage stops the others and is raised once, from
  :meth:`Pipeline.run`; setting the ``cancel`` event raises :class:`Cancelled`.
* The output is written to a hidden temporary name next to OUTPUT and renamed
  over it only when complete: a failed or cancelled run never leaves a partial
  file and never clobbers an existing OUTPUT. ``-`` streams Matroska to stdout.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bitstream.errors import UserError
from bitstream.reader import open_video
from bitstream.types import DecodedFrame, SequenceInfo
from bitstream.writer import STDOUT, VideoWriter, output_format
from enhancer.options import SIDE_INFO_MODES, EnhanceOptions, parse_options

__all__ = [
    "Cancelled",
    "EnhanceOptions",
    "EnhanceResult",
    "Pipeline",
    "Progress",
    "SIDE_INFO_MODES",
    "probe",
]

QUEUE_FRAMES = 8  # frames in flight between two stages (each way)
POLL_SECONDS = 0.1  # how often a blocked stage looks at the stop/cancel flags
PHASES = ("probing", "enhancing", "encoding")

Source = str | Path | IO[bytes]


class Cancelled(Exception):
    """The run was cancelled through its ``cancel`` event."""


@dataclass
class Progress:
    phase: str  # "probing" | "enhancing" | "encoding"
    frames_done: int
    frames_total: int | None
    fps: float
    eta_seconds: float | None


@dataclass
class EnhanceResult:
    frames: int
    seconds: float
    fps: float
    stages_histogram: dict[int, int]
    mean_qp: float | None
    side_info: dict[str, str]  # item -> its most frequent source; "engine": the model's path
    output: str
    codec: str = ""
    crf: float | None = None
    warnings: list[str] = field(default_factory=list)
    # One record per enhanced frame: index, pict_type, qp, stages, side_info (the web page).
    frame_log: list[dict[str, Any]] = field(default_factory=list)


def probe(source: Source) -> SequenceInfo:
    """Sequence info of ``source`` (decodes the first frame); raises UnsupportedInput.

    A seekable file object is rewound afterwards, so it can be passed to ``run``.
    """
    start = source.tell() if hasattr(source, "seek") and hasattr(source, "tell") else None
    try:
        with open_video(source) as reader:
            return reader.info
    finally:
        if start is not None:
            source.seek(start)  # type: ignore[union-attr]


# ------------------------------------------------------------------ plumbing


class _Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


_END = object()  # end-of-stream marker on the queues


class _Run:
    """Shared state of one run: the first error, the stop flag, the user's cancel."""

    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, _Stop):
                self.error = exc
        self.stop.set()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.fail(Cancelled("cancelled"))
        if self.stop.is_set():
            raise _Stop

    def put(self, q: queue.Queue, item: object) -> None:
        while True:
            self.check()
            try:
                q.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> Any:
        while True:
            self.check()
            try:
                return q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def drain(self, q: queue.Queue) -> Iterator[Any]:
        """Items of ``q`` up to the end marker."""
        while (item := self.get(q)) is not _END:
            yield item

    def thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                self.fail(exc)

        worker = threading.Thread(target=body, name=f"vqe-{name}", daemon=True)
        worker.start()
        return worker

    def join(self, worker: threading.Thread) -> None:
        """Wait for ``worker``, still honouring cancel while it runs."""
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if self.cancel is not None and self.cancel.is_set():
                self.fail(Cancelled("cancelled"))


class _Stats:
    """Per-frame reports folded into the result."""

    def __init__(self) -> None:
        self.frames = 0
        self.stages: Counter[int] = Counter()
        self.qp_sum = 0.0
        self.qp_count = 0
        self.sources: dict[str, Counter[str]] = {}
        self.log: list[dict[str, Any]] = []

    def add(self, frame: DecodedFrame, report: Any) -> None:
        self.frames += 1
        self.stages[int(report.stages)] += 1
        if report.qp is not None:
            self.qp_sum += float(report.qp)
            self.qp_count += 1
        self.log.append(
            {
                "index": int(frame.index),
                "pict_type": frame.side.pict_type,
                "qp": None if report.qp is None else round(float(report.qp), 2),
                "stages": int(report.stages),
                "side_info": str(report.side_info),
            }
        )
        items = dict(frame.side.sources)
        items["engine"] = str(report.side_info)
        for key, value in items.items():
            self.sources.setdefault(key, Counter())[value] += 1

    @property
    def mean_qp(self) -> float | None:
        return round(self.qp_sum / self.qp_count, 2) if self.qp_count else None

    def side_info(self) -> dict[str, str]:
        return {key: counts.most_common(1)[0][0] for key, counts in self.sources.items()}


def _temporary_name(output: Path) -> Path:
    return output.with_name(f".{output.name}.{secrets.token_hex(4)}.part")


def _check_output(source: Source, output: str | Path) -> Path | None:
    """The final output path (None for stdout), after checks that need no decoding."""
    output_format(output)  # raises UnsupportedOutput for an unknown extension
    if str(output) == STDOUT:
        return None
    path = Path(output)
    if path.is_dir():
        raise UserError(f"output is a directory: {path}")
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    if isinstance(source, str | Path) and path.exists():
        with contextlib.suppress(OSError):
            if path.samefile(source):
                raise UserError("OUTPUT must not be the INPUT file")
    return path


# ------------------------------------------------------------------ pipeline


class Pipeline:
    """Runs enhance jobs; keeps one engine so a worker loads the model once.

    ``engine``: an object with ``process(frames, info)`` (see
    ``enhancer.engine.Engine``); when None one is created from the first
    run's options and recreated only when stages/side_info change.
    ``device`` and ``tile`` say where and how the engine runs (tile edge at half
    resolution; None: automatic, 0: never).
    """

    def __init__(self, engine: Any = None, device: str = "auto", tile: int | None = None) -> None:
        if tile is not None and tile != 0 and tile < 32:
            raise UserError("tile must be 0 (never tile) or at least 32 pixels")
        self.device = device
        self.tile = tile
        self._engine = engine
        self._engine_key: tuple[Any, ...] | None = None
        self._fixed = engine is not None

    def engine(self, options: EnhanceOptions) -> Any:
        """The engine for ``options`` (created on first use, then cached)."""
        if self._fixed:
            return self._engine
        key = (options.stages, options.side_info)
        if self._engine is None or key != self._engine_key:
            from enhancer.engine import Engine

            self._engine = None  # free the old model before loading the new one
            try:
                self._engine = Engine(
                    device=self.device,
                    stages=options.stages,
                    side_info=options.side_info,
                    tile=self.tile,
                )
            except (ValueError, RuntimeError, OSError) as exc:  # stage count, no CUDA, weights
                raise UserError(f"cannot set up the model: {exc}") from None
            self._engine_key = key
        return self._engine

    def run(
        self,
        source: Source,
        output: str | Path,
        options: EnhanceOptions | Mapping[str, Any] | None = None,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> EnhanceResult:
        """Enhance ``source`` into ``output``; see the module docstring for the guarantees."""
        if not isinstance(options, EnhanceOptions):
            options = parse_options(dict(options or {}))
        final = _check_output(source, output)
        with _spooled(source) as path:
            return self._run(path, output, final, options, progress, cancel)

    def _run(
        self,
        source: str,
        output: str | Path,
        final: Path | None,
        options: EnhanceOptions,
        progress: Callable[[Progress], None] | None,
        cancel: threading.Event | None,
    ) -> EnhanceResult:
        started = time.monotonic()
        notify = progress or (lambda _p: None)
        notify(Progress("probing", 0, None, 0.0, None))
        run = _Run(cancel)
        reader = open_video(source, side_info=options.side_info != "blind")
        temp = _temporary_name(final) if final is not None else None
        writer: VideoWriter | None = None
        finished = False
        try:
            info = reader.info
            writer = VideoWriter(  # before the engine: bad output options fail fast
                temp if temp is not None else STDOUT,
                info,
                codec=options.codec,
                crf=options.crf,
                preset=options.preset,
                source=source,
                format=output_format(output),
            )
            engine = self.engine(options)
            stats = self._stream(reader, writer, engine, info, options, notify, run, started)
            if temp is not None and final is not None:
                os.replace(temp, final)
            finished = True
        finally:
            reader.close()  # idempotent; normally already closed by the decode thread
            if not finished:
                if writer is not None:
                    writer.abort()
                if temp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        temp.unlink()
        seconds = time.monotonic() - started
        return EnhanceResult(
            frames=stats.frames,
            seconds=round(seconds, 3),
            fps=round(stats.frames / seconds, 2) if seconds > 0 else 0.0,
            stages_histogram=dict(sorted(stats.stages.items())),
            mean_qp=stats.mean_qp,
            side_info=stats.side_info(),
            output=str(output),
            codec=writer.codec,
            crf=writer.crf,
            warnings=list(writer.warnings),
            frame_log=stats.log,
        )

    @staticmethod
    def _stream(
        reader: Any,
        writer: VideoWriter,
        engine: Any,
        info: SequenceInfo,
        options: EnhanceOptions,
        notify: Callable[[Progress], None],
        run: _Run,
        started: float,
    ) -> _Stats:
        decoded: queue.Queue = queue.Queue(QUEUE_FRAMES)
        enhanced: queue.Queue = queue.Queue(QUEUE_FRAMES)
        limit = options.max_frames
        truncated = threading.Event()

        def decode() -> None:
            try:
                for i, frame in enumerate(reader):
                    if limit is not None and i >= limit:
                        truncated.set()
                        break
                    run.put(decoded, frame)
                run.put(decoded, _END)
            finally:
                reader.close()

        def encode() -> None:
            for frame in run.drain(enhanced):
                writer.write(frame)
            writer.close(truncated=truncated.is_set())

        total = info.frames if limit is None else min(info.frames or limit, limit)
        stats = _Stats()
        workers = [run.thread("decode", decode), run.thread("encode", encode)]
        try:
            for frame, report in engine.process(run.drain(decoded), info):
                stats.add(frame, report)
                run.put(enhanced, frame)
                notify(_progress("enhancing", stats.frames, total, started))
            run.put(enhanced, _END)
            notify(_progress("encoding", stats.frames, total, started))
            for worker in workers:
                run.join(worker)
            run.check()
        except BaseException as exc:
            run.fail(exc)
            for worker in workers:
                worker.join()
            raise run.error or exc from None
        if stats.frames == 0:
            raise UserError("no frame was enhanced")
        return stats


def _progress(phase: str, done: int, total: int | None, started: float) -> Progress:
    elapsed = time.monotonic() - started
    fps = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / fps if total and fps > 0 and total >= done else None
    return Progress(phase, done, total, round(fps, 2), None if eta is None else round(eta, 1))


@contextlib.contextmanager
def _spooled(source: Source) -> Iterator[str]:
    """A path or URL for ``source``; a file object is copied to a temporary file first.

    The writer opens the source a second time to copy its other streams,
    which a one-pass file object (an upload, a pipe) cannot give.
    """
    if isinstance(source, str | Path):
        yield str(source)
        return
    with tempfile.NamedTemporaryFile(prefix="vqe-input-", suffix=".bin") as spool:
        shutil.copyfileobj(source, spool, length=1 << 20)
        spool.flush()
        yield spool.name
