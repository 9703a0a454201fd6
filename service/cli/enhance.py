"""``vqe enhance INPUT OUTPUT``: enhance a video's pixels and keep everything else.

A progress line (frames, fps, ETA) is drawn on stderr when stderr is a
terminal; otherwise the command is quiet except for warnings. ``--json``
prints a summary object on stdout. Bad input, options or output exit 2 with
one line on stderr (see ``service.cli``); option values are checked by
:class:`enhancer.options.EnhanceOptions`, as in the API.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from dataclasses import asdict
from typing import TextIO

from bitstream.errors import UserError
from bitstream.writer import CODECS, CRF_RANGE, PRESETS, STDOUT
from enhancer.options import SIDE_INFO_MODES, parse_options
from enhancer.pipeline import Pipeline, Progress

REDRAW_SECONDS = 0.2


def _device(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, not {value!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "enhance",
        help="enhance a video (pixels only; audio, subtitles, timestamps kept)",
        description=(
            "Enhance INPUT into OUTPUT (.mp4, .mkv, .mov; - writes Matroska to stdout). "
            "Only the picture changes: other streams are copied, timestamps, colour "
            "tags and rotation are kept."
        ),
    )
    p.add_argument("input", help="video file or stream URL")
    p.add_argument("output", help="output file (.mp4, .mkv, .mov) or - for stdout")
    # Option values are checked by enhancer.options.EnhanceOptions (one line, exit 2).
    p.add_argument(
        "--codec",
        default="auto",
        metavar="|".join(CODECS),
        help="output encoder (auto: the input's family; ffv1 is lossless)",
    )
    p.add_argument(
        "--crf",
        default=None,
        help=f"output CRF {CRF_RANGE[0]}..{CRF_RANGE[1]}; wins over --quality (default: the "
        "weights' calibrated output rate for the input's CRF/QP)",
    )
    p.add_argument(
        "--quality",
        default="balanced",
        metavar="archive|balanced|compact",
        help="balanced (default): the calibrated CRF that keeps most of the gain; compact: the "
        "smallest file that still gains; archive: lossless FFV1, all of the gain. Where "
        "re-encoding would lose the gain, balanced/compact copy the input as it is",
    )
    p.add_argument("--preset", default="medium", help="x264/x265 preset: " + ", ".join(PRESETS))
    p.add_argument(
        "--stages",
        default="auto",
        help="model stages: auto (per frame, from the compression level) or 0..S "
        "(S from the weights)",
    )
    p.add_argument(
        "--side-info",
        default="auto",
        metavar="|".join(SIDE_INFO_MODES),
        help="use the bitstream's QP/motion vectors, or estimate blind",
    )
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile edge in half-resolution pixels for large frames "
        "(default: automatic above 960x540; 0: never tile)",
    )
    p.add_argument(
        "--max-frames",
        default=None,
        help="stop after this many frames (other streams are cut to match)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


class ProgressLine:
    """Redraws one status line on a terminal: phase, frames, fps, ETA."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        final = progress.phase == "encoding"
        if not final and now - self._last < REDRAW_SECONDS:
            return
        self._last = now
        self.stream.write("\r" + self.render(progress) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    @staticmethod
    def render(p: Progress) -> str:
        if p.phase == "probing":
            return "probing the input..."
        if p.frames_total:
            done = min(p.frames_done / p.frames_total, 1.0)
            bar = "#" * int(done * 20)
            count = f"[{bar:<20}] {p.frames_done}/{p.frames_total}"
        else:
            count = f"{p.frames_done}"
        eta = "" if p.eta_seconds is None else f"  ETA {_clock(p.eta_seconds)}"
        return f"{p.phase:9s} {count} frames  {p.fps:.1f} fps{eta}"

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if args.json and args.output == STDOUT:
        raise UserError("--json prints to stdout, which OUTPUT - already uses")
    fields = ("codec", "quality", "crf", "preset", "stages", "side_info", "max_frames")
    options = parse_options({name: getattr(args, name) for name in fields})
    pipeline = Pipeline(device=args.device, tile=args.tile)
    bar = ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    # SIGTERM unwinds like Ctrl-C, so the partial output is removed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = pipeline.run(args.input, args.output, options, progress=bar)
    except OSError as exc:  # disk full, permission denied...: the user's to fix
        raise UserError(f"{exc.strerror or exc}: {exc.filename or args.output}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    for warning in result.warnings:
        print(f"vqe enhance: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(result)))
    elif bar is not None:
        print(
            f"{result.frames} frames in {result.seconds:.1f} s ({result.fps:.1f} fps), "
            f"{result.codec} crf {result.crf} ({result.quality}, expected "
            f"{result.expected_gain_db} dB, {result.gops_copied}/{result.gops} GOPs copied, "
            f"size x{result.size_ratio}) -> {result.output}",
            file=sys.stderr,
        )
    return 0
