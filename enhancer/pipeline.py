"""The streaming enhance pipeline: reader -> engine -> writer (the library behind ``enhance``).

:class:`Pipeline` is the entry point; its parts live by concern:

* :mod:`enhancer.paths`: the source as a path every pass can open (a URL or a file
  object spooled once), the checked OUTPUT and its hidden temporary name;
* :mod:`enhancer.plan`: one probe of the source (``SourcePlan``) and the writer's
  ``OutputPlan``, both decided before frames flow;
* :mod:`enhancer.run`: the decode, enhance and encode stages, at once, with bounded
  queues between them (memory does not grow with the video's length);
* :mod:`enhancer.result`: per-frame statistics and the :class:`EnhanceResult`.

An error in any stage stops the others and is raised once, from :meth:`Pipeline.run`;
setting the ``cancel`` event raises :class:`Cancelled`. The output is written under a
hidden temporary name next to OUTPUT and renamed over it only when complete: a failed
or cancelled run never leaves a partial file and never clobbers an existing OUTPUT.
``-`` streams Matroska to stdout.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bitstream.errors import UnsupportedOutput, UserError
from bitstream.reader import open_video
from bitstream.writer import RAW_FORMATS, STDOUT, OutputPlan, VideoWriter, output_format
from enhancer.options import SIDE_INFO_MODES, EnhanceOptions, parse_options
from enhancer.paths import Source, check_output, size_ratio, spooled, temporary_name
from enhancer.plan import plan_run, probe
from enhancer.protocols import ChecksOptions, FrameEngine, Placed
from enhancer.result import EnhanceResult, FrameStats, shape_result
from enhancer.run import Cancelled, Progress, Run, stream_frames

__all__ = [
    "Cancelled",
    "EnhanceOptions",
    "EnhanceResult",
    "Pipeline",
    "Progress",
    "SIDE_INFO_MODES",
    "Source",
    "probe",
]


class Pipeline:
    """Runs enhance jobs with one engine: the model loads once, whatever each job's options.

    ``engine``: an object with ``process(frames, info, stages=, side_info=)`` (see
    ``enhancer.engine.Engine`` and :mod:`enhancer.protocols`); when None one is loaded on
    first use, with ``device`` and ``tile`` (tile edge at half resolution; None:
    automatic, 0: never).
    """

    def __init__(
        self, engine: FrameEngine | None = None, device: str = "auto", tile: int | None = None
    ) -> None:
        if tile is not None and tile != 0 and tile < 32:
            raise UserError("tile must be 0 (never tile) or at least 32 pixels")
        self.device = device
        self.tile = tile
        self._engine = engine

    @property
    def engine(self) -> FrameEngine:
        """The engine (the model is loaded on first use)."""
        if self._engine is None:
            from enhancer.engine import Engine

            try:
                self._engine = Engine(device=self.device, tile=self.tile)
            except (ValueError, RuntimeError, OSError) as exc:  # no CUDA, weights
                raise UserError(f"cannot set up the model: {exc}") from None
        return self._engine

    def load(self, options: EnhanceOptions | None = None) -> FrameEngine:
        """The engine, loaded, with ``options`` checked against it (UserError if not)."""
        engine = self.engine
        if options is not None and isinstance(engine, ChecksOptions):
            try:
                engine.check(options.stages, options.side_info)
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
        fmt = output_format(output, stdout_format)  # UnsupportedOutput for an unknown extension
        if fmt in RAW_FORMATS and options.quality == "high":
            raise UnsupportedOutput(
                "--quality high is an x265 Main10 encode; a y4m output holds the raw enhanced "
                "frames (all of the gain): leave --quality out"
            )
        final = check_output(source, output)
        with spooled(source) as path:
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
        run = Run(cancel)
        reader = open_video(source, side_info=options.side_info != "blind")
        temp = temporary_name(final) if final is not None else None
        writer: VideoWriter | None = None
        finished = False
        try:
            info = reader.info
            # Bad output options fail fast, before the model loads.
            negotiated = OutputPlan.negotiate(
                info, fmt, options.output_codec, options.preset, options.output_bits
            )
            engine = self.load(options)
            plan = plan_run(source, info, options, engine, negotiated)
            writer = VideoWriter(
                temp if temp is not None else STDOUT, info, plan=plan.output, source=source
            )
            if plan.output.copy_all:  # nothing to enhance: a remux, the engine never runs
                reader.close()
                writer.copy_video()
                writer.close()
                stats = FrameStats.remuxed(writer.frames)
            else:
                stats = stream_frames(reader, writer, engine, info, options, notify, run, started)
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
        placed = isinstance(engine, Placed)
        return shape_result(
            stats,
            writer,
            plan.rate,
            seconds=time.monotonic() - started,
            output=str(output),
            size_ratio=size_ratio(source, final),
            device=str(engine.device) if placed else "",
            precision=str(engine.precision) if placed else "",
        )
