"""``vqe enhance INPUT OUTPUT``: enhance a video's pixels and keep everything else.

A progress line (frames, fps, ETA) is drawn on stderr when stderr is a
terminal; otherwise the command is quiet except for warnings. ``--json``
prints a summary object on stdout. Bad input, options or output exit 2 with
one line on stderr (see ``service.cli``); option values are checked by
:class:`enhancer.options.EnhanceOptions`, as in the API.

Many videos (``vqe enhance a.mp4 b.mkv -o OUTDIR``, or ``vqe enhance INDIR OUTDIR``)
run with one model load: see :mod:`service.cli.batch`.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from bitstream.errors import UserError
from bitstream.writer import CODECS, CRF_RANGE, PRESETS, STDOUT, STDOUT_FORMATS
from enhancer.options import QUALITIES, SIDE_INFO_MODES, parse_options
from enhancer.pipeline import Pipeline
from service.cli.batch import run_batch as _run_batch
from service.cli.progress import ProgressLine

__all__ = ["ProgressLine", "add_parser", "run"]


def _device(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, not {value!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "enhance",
        help="enhance a video (pixels only; audio, subtitles, timestamps kept)",
        usage=(
            "%(prog)s [options] INPUT OUTPUT\n"
            "       %(prog)s [options] INPUT... -o OUTDIR\n"
            "       %(prog)s [options] INDIR OUTDIR"
        ),
        description=(
            "Enhance INPUT into OUTPUT (.mp4, .mkv, .mov, or .y4m for the raw frames; - "
            "writes Matroska to stdout, or YUV4MPEG2 with --format y4m). "
            "Only the picture changes: other streams are copied, timestamps, colour "
            "tags and rotation are kept. Several videos (files, or the videos in folders) "
            "go into OUTDIR/<their names> with one model load; outputs that exist are "
            "skipped (--overwrite: done again)."
        ),
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="INPUT",
        help="a video file or stream URL, then OUTPUT (a file, or - for stdout); "
        "with -o, every argument is an input (a file or a folder); INDIR OUTDIR: a folder in, "
        "a folder out",
    )
    p.add_argument(
        "-o",
        "--output-dir",
        default=None,
        metavar="OUTDIR",
        help="enhance every INPUT (files, or the videos in folders) into OUTDIR/<its name>, "
        "with one model load",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="several videos: enhance again the ones whose output exists (default: skip them)",
    )
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
        metavar="|".join(QUALITIES),
        help="balanced (default): the calibrated CRF that keeps most of the gain; compact: the "
        "smallest file that still gains; high: x265 Main10 (10-bit) at its calibrated CRF, "
        "more of the gain in up to 3x the input's size; archive: lossless FFV1, all of the "
        "gain. Where re-encoding would lose the gain, balanced/compact/high copy the input as "
        "it is",
    )
    p.add_argument("--preset", default="medium", help="x264/x265 preset: " + ", ".join(PRESETS))
    p.add_argument(
        "--format",
        default="mkv",
        choices=sorted(STDOUT_FORMATS),
        help="what OUTPUT - writes: mkv (Matroska, default) or y4m (YUV4MPEG2: the enhanced "
        "frames, the --codec ffv1 frames, for an encoder that reads --y4m; no audio)",
    )
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
        help="use the bitstream's QP/motion vectors/CRF, or work from the pixels alone (blind)",
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


OPTION_ARGS = ("codec", "quality", "crf", "preset", "stages", "side_info", "max_frames")


def run(args: argparse.Namespace) -> int:
    paths: list[str] = args.paths
    if args.output_dir is not None:
        return run_batch(args, paths, args.output_dir)
    if len(paths) == 2 and Path(paths[0]).is_dir():
        return run_batch(args, paths[:1], paths[1])
    if len(paths) != 2:
        raise UserError(
            "give INPUT OUTPUT, or several inputs with -o OUTDIR"
            if len(paths) > 2
            else "missing OUTPUT (or -o OUTDIR)"
        )
    args.input, args.output = paths
    if args.json and args.output == STDOUT:
        raise UserError("--json prints to stdout, which OUTPUT - already uses")
    if args.format != "mkv" and args.output != STDOUT:
        raise UserError("--format is for OUTPUT -; a file's extension (.y4m) gives its format")
    options = parse_options({name: getattr(args, name) for name in OPTION_ARGS})
    pipeline = Pipeline(device=args.device, tile=args.tile)
    bar = ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    # SIGTERM unwinds like Ctrl-C, so the partial output is removed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = pipeline.run(
            args.input, args.output, options, progress=bar, stdout_format=args.format
        )
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


def run_batch(args: argparse.Namespace, inputs: list[str], output_dir: str) -> int:
    options = parse_options({name: getattr(args, name) for name in OPTION_ARGS})
    return _run_batch(inputs, output_dir, options, args)
