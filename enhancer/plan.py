"""Everything decided before frames flow, as data: the :class:`SourcePlan` (what the
source is and how compressed, its GOP cuts and which GOPs the model leaves untouched)
and the writer's :class:`~bitstream.writer.OutputPlan` (codec, pixel format, CRF,
copied GOPs), with the output-rate choice they were made from.

The order is FFmpeg's: the output is negotiated first (``OutputPlan.negotiate``, before
the model loads, so bad output options fail fast); the source is then planned with the
engine's ``plan_stages`` (a decode pass without the model, only where GOPs may be
copied); the rate table picks the CRF; the writer takes the result and decides nothing
again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from bitstream.errors import UserError
from bitstream.reader import is_url, open_video
from bitstream.splice import GopScan, scan_gops
from bitstream.types import SequenceInfo
from bitstream.writer import OutputPlan, input_level, muxer_codecs
from enhancer.options import EnhanceOptions
from enhancer.output_rate import OutputRate, RateChoice, choose_rate
from enhancer.paths import Source
from enhancer.protocols import Calibrated, FrameEngine, PlansStages

__all__ = ["RunPlan", "SourcePlan", "plan_run", "plan_source", "plan_output", "probe"]


@dataclass(frozen=True)
class SourcePlan:
    """What the pipeline learns of the source before frames flow."""

    path: str  # what every pass opens: the spool, or the source as given
    info: SequenceInfo  # the video stream: codec, size, pixel format, rate, the encoder's SEI
    live: bool  # a URL read in one pass: no GOP scan, no planning decode, no peek
    level: float | None  # how compressed, on the x264 CRF scale (None: nothing tells)
    scan: GopScan | None = None  # the GOP cuts, where GOPs may be copied
    untouched: tuple[bool, ...] | None = None  # per GOP: every frame gets 0 stages
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunPlan:
    source: SourcePlan
    output: OutputPlan  # what the writer takes
    rate: RateChoice  # where the CRF came from and the gain it expects


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


def plan_run(
    path: str,
    info: SequenceInfo,
    options: EnhanceOptions,
    engine: FrameEngine,
    output: OutputPlan,
) -> RunPlan:
    """The source plan, then the output plan (``output``, negotiated) with its rate."""
    meta = engine.meta if isinstance(engine, Calibrated) else None
    qp_offset = OutputRate.from_meta(meta).qp_offset
    source = plan_source(path, info, options, engine, output, qp_offset)
    final, choice = plan_output(source, output, options, meta)
    return RunPlan(source, final, choice)


def plan_source(
    path: str,
    info: SequenceInfo,
    options: EnhanceOptions,
    engine: FrameEngine,
    output: OutputPlan,
    qp_offset: float,
) -> SourcePlan:
    """How compressed the source is, and which of its GOPs the model leaves untouched.

    The GOPs come from the packets (bitstream.splice), and only where they could be
    copied into ``output``; whether a GOP is untouched comes from the engine's
    ``plan_stages`` on each frame's side info. A GOP counts as untouched only when every
    frame of it gets 0 stages for sure (None: unknown until the pixels are seen). The
    level: the encoder's SEI, else the planning pass's mean QP (less ``qp_offset``), else
    the first frame's QP.
    """
    fixed = isinstance(options.stages, int) and options.stages > 0
    live = is_url(path)  # a URL still: live, read once, no planning pass
    copyable = (
        not live
        and not output.lossless
        and options.max_frames is None
        and not fixed
        and info.codec in muxer_codecs(output.format)
    )
    scan, untouched, mean_qp, notes = None, None, None, []
    if copyable and isinstance(engine, PlansStages):
        scan = scan_gops(path, info.stream_index)
        if scan.copyable is not None:
            notes.append(f"no GOP can be copied: {scan.copyable}")
            scan = None
        else:
            untouched, mean_qp = _untouched_gops(path, info, options, scan, engine)
    level = input_level(info, mean_qp=mean_qp, qp_offset=qp_offset)
    if level is None and not live:
        level = _first_frame_level(path, info)
    return SourcePlan(path, info, live, level, scan, untouched, tuple(notes))


def plan_output(
    source: SourcePlan, output: OutputPlan, options: EnhanceOptions, meta: dict[str, Any] | None
) -> tuple[OutputPlan, RateChoice]:
    """The CRF from the rate table (or ``options.crf``) and the GOPs to copy."""
    level, scan = source.level, source.scan
    choice = choose_rate(meta, level, options.quality, output.codec, options.crf)
    notes = list(source.notes)
    copy = list(source.untouched) if source.untouched is not None else None
    if scan is not None and choice.copy and options.stages == "auto":
        copy = [True] * len(scan.segments)  # re-encoding would lose more than it gains
        notes.append(
            f"the output rate table says re-encoding at input level {level:.1f} loses the "
            "gain: the video is passed through (use --crf or --quality archive to force it)"
            if level is not None
            else "the video is passed through"
        )
    if scan is not None and copy is not None and any(copy):
        problem = output.splice_problem(scan, copy, source.info)
        if problem:
            notes.append(f"untouched GOPs are re-encoded: {problem}")
            copy = None
    plan = output.with_crf(None if output.lossless else choice.crf).with_notes(notes)
    if scan is not None and copy is not None and any(copy):
        plan = plan.with_copy(scan, copy)
    return plan, choice


def _first_frame_level(path: str, info: SequenceInfo) -> float | None:
    """The input's level from its first frame's QP (when neither SEI nor a planning pass told)."""
    with contextlib.suppress(UserError, StopIteration), open_video(path) as peek:
        first = next(iter(peek))
        return input_level(info, first.side.qp, first.side.pict_type)
    return None


def _untouched_gops(
    path: str, info: SequenceInfo, options: EnhanceOptions, scan: GopScan, engine: PlansStages
) -> tuple[tuple[bool, ...], float | None]:
    """Per segment: will every frame get 0 stages? And the mean frame QP (for the level).

    Where the stream states its CRF (the level needs no mean QP), the first frame that
    will be enhanced settles its segment, and the rest of that segment is demuxed, not
    decoded: a video that is enhanced throughout costs one decoded frame per GOP here,
    not a second decode. Segments that may be copied are decoded to their end.
    """
    copy = [True] * len(scan.segments)
    qp_sum, qp_n = 0.0, 0
    skip = info.sequence_qp is not None
    with open_video(path, side_info=options.side_info != "blind") as planner:
        for frame in planner:
            side = frame.side
            if side.qp is not None:
                qp_sum, qp_n = qp_sum + float(side.qp), qp_n + 1
            if copy[k := scan.segment_of(frame.pts)]:
                copy[k] = engine.plan_stages(side, info, options.stages, options.side_info) == 0
                if not copy[k] and skip:
                    if k + 1 >= len(scan.segments):
                        break  # the last segment is settled
                    planner.skip_until(scan.segments[k + 1].start_pts)
            if not any(copy) and info.sequence_qp is not None:
                break  # nothing left to learn
    return tuple(copy), (qp_sum / qp_n if qp_n else None)
