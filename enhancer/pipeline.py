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
from bitstream.reader import is_url, open_video
from bitstream.source import fetch_once, is_spoolable, suffix_of
from bitstream.splice import GopScan, scan_gops
from bitstream.types import DecodedFrame, SequenceInfo
from bitstream.writer import (
    LOSSLESS,
    STDOUT,
    VideoWriter,
    choose_codec,
    input_level,
    muxer_codecs,
    output_format,
    output_pix_fmt,
    splice_problem,
)
from enhancer.options import SIDE_INFO_MODES, EnhanceOptions, parse_options
from enhancer.output_rate import RateChoice, choose_rate

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
    # The output rate (issue 11): the quality asked for, where the CRF came from
    # (calibrated | default | explicit | lossless), the gain the table expects after
    # re-encoding (dB of PSNR-Y over the input; 0 for a pass-through), sizes, GOPs copied.
    quality: str = "balanced"
    rate_source: str = ""
    expected_gain_db: float | None = None
    size_ratio: float | None = None
    gops: int = 0
    gops_copied: int = 0
    passthrough: bool = False  # nothing was re-encoded: the video packets are the input's
    device: str = ""  # where the model ran (cpu, cuda:0); "" for an engine without one
    precision: str = ""  # bf16, fp16 or fp32

    def output_report(self) -> dict[str, Any]:
        """The output-rate fields, as the CLI's --json, the job stats and the web page show them."""
        return {
            "quality": self.quality,
            "output_crf": self.crf,
            "rate_source": self.rate_source,
            "expected_gain_db": self.expected_gain_db,
            "size_ratio": self.size_ratio,
            "gops": self.gops,
            "gops_copied": self.gops_copied,
            "passthrough": self.passthrough,
            "device": self.device,
            "precision": self.precision,
        }


@dataclass
class _Render:
    """How the output is made: the rate choice and which GOPs are copied."""

    choice: RateChoice
    scan: GopScan | None = None
    copy: list[bool] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def copy_all(self) -> bool:
        return bool(self.copy) and all(self.copy)  # type: ignore[arg-type]


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
        self.mismatch = 0  # enhanced frames in GOPs copied as untouched

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


def _first_frame_level(source: str, info: SequenceInfo) -> float | None:
    """The input's level from its first frame's QP (when neither SEI nor a planning pass told)."""
    with contextlib.suppress(UserError, StopIteration), open_video(source) as peek:
        first = next(iter(peek))
        return input_level(info, first.side.qp, first.side.pict_type)
    return None


def _size_ratio(source: str, final: Path | None) -> float | None:
    with contextlib.suppress(OSError, TypeError, ValueError):
        if final is not None and Path(source).is_file():
            return round(final.stat().st_size / Path(source).stat().st_size, 3)
    return None


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
    """Runs enhance jobs with one engine: the model loads once, whatever each job's options.

    ``engine``: an object with ``process(frames, info, stages=, side_info=)`` (see
    ``enhancer.engine.Engine``); when None one is loaded on first use, with ``device``
    and ``tile`` (tile edge at half resolution; None: automatic, 0: never).
    """

    def __init__(self, engine: Any = None, device: str = "auto", tile: int | None = None) -> None:
        if tile is not None and tile != 0 and tile < 32:
            raise UserError("tile must be 0 (never tile) or at least 32 pixels")
        self.device = device
        self.tile = tile
        self._engine = engine

    @property
    def engine(self) -> Any:
        """The engine (the model is loaded on first use)."""
        if self._engine is None:
            from enhancer.engine import Engine

            try:
                self._engine = Engine(device=self.device, tile=self.tile)
            except (ValueError, RuntimeError, OSError) as exc:  # no CUDA, weights
                raise UserError(f"cannot set up the model: {exc}") from None
        return self._engine

    def load(self, options: EnhanceOptions | None = None) -> Any:
        """The engine, loaded, with ``options`` checked against it (UserError if not)."""
        engine = self.engine
        if options is None:
            return engine
        check = getattr(engine, "check", None)
        if check is not None:
            try:
                check(options.stages, options.side_info)
            except ValueError as exc:  # e.g. more stages than these weights have
                raise UserError(f"cannot set up the model: {exc}") from None
        return engine

    def run(
        self,
        source: Source,
        output: str | Path,
        options: EnhanceOptions | Mapping[str, Any] | None = None,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        stdout_format: str = "mkv",
    ) -> EnhanceResult:
        """Enhance ``source`` into ``output``; see the module docstring for the guarantees.

        ``output`` ``-`` is stdout, in Matroska or, with ``stdout_format="y4m"``,
        YUV4MPEG2 (as a ``.y4m`` file is): the enhanced frames, no other stream.
        """
        if not isinstance(options, EnhanceOptions):
            options = parse_options(dict(options or {}))
        final = _check_output(source, output)
        fmt = output_format(output, stdout_format)
        with _spooled(source) as path:
            return self._run(path, output, final, options, progress, cancel, fmt)

    def _run(
        self,
        source: str,
        output: str | Path,
        final: Path | None,
        options: EnhanceOptions,
        progress: Callable[[Progress], None] | None,
        cancel: threading.Event | None,
        fmt: str,
    ) -> EnhanceResult:
        started = time.monotonic()
        notify = progress or (lambda _p: None)
        notify(Progress("probing", 0, None, 0.0, None))
        run = _Run(cancel)
        reader = open_video(source, side_info=options.side_info != "blind")
        temp = _temporary_name(final) if final is not None else None
        writer: VideoWriter | None = None
        finished = False
        stats = _Stats()
        try:
            info = reader.info
            codec, _ = choose_codec(options.output_codec, info, fmt)  # bad output options fail fast
            engine = self.load(options)
            render = self._plan(source, info, options, engine, codec, fmt)
            copy = render.copy if render.copy and any(render.copy) else None
            writer = VideoWriter(
                temp if temp is not None else STDOUT,
                info,
                codec=options.output_codec,
                crf=None if codec in LOSSLESS else render.choice.crf,
                preset=options.preset,
                source=source,
                format=fmt,
                splice=render.scan if copy else None,
                copy=copy,
            )
            writer.warnings.extend(render.notes)
            if render.copy_all:  # nothing to enhance: a remux, the engine never runs
                reader.close()
                writer.copy_video()
                writer.close()
                stats.frames = writer.frames
                stats.stages[0] = writer.frames
            else:
                stats = self._stream(
                    reader, writer, engine, info, options, notify, run, started, render
                )
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
        choice = render.choice
        encoded = 1.0
        if render.copy_all:
            encoded = 0.0
        elif copy and writer.gops:
            encoded = 1 - writer.gops_copied / writer.gops
        gain = None if choice.expected_gain is None else round(choice.expected_gain * encoded, 4)
        return EnhanceResult(
            frames=stats.frames,
            seconds=round(seconds, 3),
            fps=round(stats.frames / seconds, 2) if seconds > 0 else 0.0,
            stages_histogram=dict(sorted(stats.stages.items())),
            mean_qp=stats.mean_qp,
            side_info=stats.side_info(),
            output=str(output),
            codec="copy" if render.copy_all else writer.codec,
            crf=None if render.copy_all else writer.crf,
            warnings=list(writer.warnings),
            frame_log=stats.log,
            quality=options.quality,
            rate_source="copy" if render.copy_all else choice.source,
            expected_gain_db=0.0 if render.copy_all else gain,
            size_ratio=_size_ratio(source, final),
            gops=writer.gops,
            gops_copied=writer.gops_copied,
            passthrough=render.copy_all,
            device=str(getattr(engine, "device", "")),
            precision=str(getattr(engine, "precision", "")),
        )

    def _plan(
        self,
        source: str,
        info: SequenceInfo,
        options: EnhanceOptions,
        engine: Any,
        codec: str,
        fmt: str,
    ) -> _Render:
        """Choose the output rate and the GOPs to copy, before the model runs.

        The GOPs come from the packets (bitstream.splice); whether a GOP is
        untouched comes from the engine's ``plan_stages`` on each frame's side
        info (a decode pass without the model). A GOP is copied only when every
        frame of it gets 0 stages for sure (None: unknown until the pixels are seen).
        """
        meta = getattr(engine, "meta", None)
        fixed = isinstance(options.stages, int) and options.stages > 0
        live = is_url(source)  # a URL still: live, read once, no planning pass
        copyable = (
            not live
            and codec not in LOSSLESS
            and options.max_frames is None
            and not fixed
            and info.codec in muxer_codecs(fmt)
        )
        scan, copy, mean_qp, notes = None, None, None, []
        plan = getattr(engine, "plan_stages", None)
        if copyable and plan is not None:
            scan = scan_gops(source, info.stream_index)
            if scan.copyable is not None:
                notes.append(f"no GOP can be copied: {scan.copyable}")
                scan = None
        if scan is not None:
            copy, mean_qp = self._untouched_gops(source, info, options, scan, plan)
        level = input_level(info, None)
        if level is None and mean_qp is not None:
            from enhancer.output_rate import OutputRate

            level = OutputRate.from_meta(meta).level_from_qp(mean_qp)
        if level is None and not live:
            level = _first_frame_level(source, info)
        choice = choose_rate(meta, level, options.quality, codec, options.crf)
        auto = options.stages == "auto"
        if scan is not None and choice.copy and auto:
            copy = [True] * len(scan.segments)  # re-encoding would lose more than it gains
            notes.append(
                f"the output rate table says re-encoding at input level {level:.1f} loses the "
                "gain: the video is passed through (use --crf or --quality archive to force it)"
                if level is not None
                else "the video is passed through"
            )
        if scan is not None and copy is not None and any(copy):
            problem = splice_problem(scan, copy, codec, output_pix_fmt(info, codec), info)
            if problem:
                notes.append(f"untouched GOPs are re-encoded: {problem}")
                copy = None
        return _Render(choice, scan, copy, notes)

    @staticmethod
    def _untouched_gops(
        source: str, info: SequenceInfo, options: EnhanceOptions, scan: GopScan, plan: Any
    ) -> tuple[list[bool] | None, float | None]:
        """Per segment: will every frame get 0 stages? And the mean frame QP (for the level).

        Where the stream states its CRF (the level needs no mean QP), the first frame that
        will be enhanced settles its segment, and the rest of that segment is demuxed, not
        decoded: a video that is enhanced throughout costs one decoded frame per GOP here,
        not a second decode. Segments that may be copied are decoded to their end.
        """
        copy = [plan is not None] * len(scan.segments)
        qp_sum, qp_n = 0.0, 0
        skip = plan is not None and info.sequence_qp is not None
        with open_video(source, side_info=options.side_info != "blind") as planner:
            for frame in planner:
                side = frame.side
                if side.qp is not None:
                    qp_sum, qp_n = qp_sum + float(side.qp), qp_n + 1
                if plan is not None and copy[k := scan.segment_of(frame.pts)]:
                    copy[k] = plan(side, info, options.stages, options.side_info) == 0
                    if not copy[k] and skip:
                        if k + 1 >= len(scan.segments):
                            break  # the last segment is settled
                        planner.skip_until(scan.segments[k + 1].start_pts)
                if not any(copy) and info.sequence_qp is not None:
                    break  # nothing left to learn
        return copy, (qp_sum / qp_n if qp_n else None)

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
        render: _Render | None = None,
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
            copied = render.copy if render is not None and render.copy else None
            scan = render.scan if render is not None else None
            frames = run.drain(decoded)
            for frame, report in engine.process(frames, info, options.stages, options.side_info):
                stats.add(frame, report)
                if copied and scan and report.stages and copied[scan.segment_of(frame.pts)]:
                    stats.mismatch += 1
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
        if stats.mismatch:
            writer.warnings.append(
                f"{stats.mismatch} frame(s) were enhanced in GOPs that plan_stages said were "
                "untouched; those GOPs were copied as they were"
            )
        return stats


def _progress(phase: str, done: int, total: int | None, started: float) -> Progress:
    elapsed = time.monotonic() - started
    fps = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / fps if total and fps > 0 and total >= done else None
    return Progress(phase, done, total, round(fps, 2), None if eta is None else round(eta, 1))


@contextlib.contextmanager
def _spooled(source: Source) -> Iterator[str]:
    """A path or URL for ``source`` that every pass of the run can open.

    The writer opens the source again to copy its other streams, and the GOP plan
    scans it: a one-pass file object (an upload, a pipe) is copied to a temporary
    file first, and so is an HTTP(S) file, in one request (bitstream.source). A live
    URL is passed on as it is, and the run reads it in one pass (see ``_plan``).
    """
    if isinstance(source, str | Path) and not is_spoolable(source):
        yield str(source)
        return
    suffix = suffix_of(source) if isinstance(source, str) else ".bin"
    with tempfile.NamedTemporaryFile(prefix="vqe-input-", suffix=suffix) as spool:
        if isinstance(source, str):
            if not fetch_once(source, spool):
                yield source  # live: nothing was copied
                return
        else:
            shutil.copyfileobj(source, spool, length=1 << 20)
            spool.flush()
        yield spool.name
