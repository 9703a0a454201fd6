"""`vqe inspect INPUT`: what a video's bitstream says (stream, side info, per-frame QP and types).

The default output is a readable summary; ``--json`` prints one JSON object
(``stream``, ``side_info``, ``frames``, ``errors``); ``--png DIR`` draws the
motion vectors, partition map and QP heat map of the first few frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from bitstream.reader import open_video
from bitstream.types import PARTITION_CODES, SOURCES, DecodedFrame, SequenceInfo
from service.errors import UserError

PARTITION_NAMES = {code: name for name, code in PARTITION_CODES.items()}
SIDE_ITEMS = ("pict_type", "qp", "qp_map", "motion_vectors", "partitions")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="show the stream and the side information the bitstream carries",
        description="Show a video's stream info and bitstream side information.",
    )
    p.add_argument("input", help="video file or URL")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--frames", type=int, default=None, metavar="N", help="inspect only the first N frames"
    )
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="DIR",
        help="write MV / partition / QP pictures of the first frames to DIR",
    )
    p.add_argument(
        "--png-frames",
        type=int,
        default=3,
        metavar="K",
        help="how many frames --png draws (default 3)",
    )
    p.set_defaults(func=run)
    return p


def _num(value: Fraction | float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def stream_dict(info: SequenceInfo) -> dict[str, Any]:
    rc = info.rate_control
    return {
        "codec": info.codec,
        "profile": info.profile,
        "width": info.width,
        "height": info.height,
        "pix_fmt": info.pix_fmt,
        "source_pix_fmt": info.source_pix_fmt,
        "bit_depth": info.bit_depth,
        "frame_rate": _num(info.frame_rate),
        "time_base": str(info.time_base) if info.time_base else None,
        "frames": info.frames,
        "color": {
            "primaries": info.color_primaries,
            "trc": info.color_trc,
            "space": info.colorspace,
            "range": info.color_range,
        },
        "rotation": info.rotation,
        "sample_aspect_ratio": str(info.sample_aspect_ratio) if info.sample_aspect_ratio else None,
        "encoder": info.encoder,
        "rate_control": {"mode": rc.mode, "crf": rc.crf, "qp": rc.qp, "bitrate": rc.bitrate},
    }


def frame_dict(frame: DecodedFrame) -> dict[str, Any]:
    side = frame.side
    parts: dict[str, int] = {}
    if side.partition is not None:
        counts = np.bincount(side.partition.ravel(), minlength=len(PARTITION_CODES))
        parts = {
            PARTITION_NAMES[c]: int(n) for c, n in enumerate(counts) if n and c in PARTITION_NAMES
        }
    return {
        "index": side.index,
        "pts": side.pts,
        "pict_type": side.pict_type,
        "qp": _num(side.qp, 2),
        "mv_count": side.mv_count,
        # null where the codec does not say which blocks are intra (e.g. HEVC P/B).
        "intra_fraction": (
            round(side.intra_fraction, 4)
            if side.intra is not None or side.pict_type == "I"
            else None
        ),
        "partitions": parts,
    }


def _best_source(seen: Counter[str]) -> str:
    """The most informative provenance seen on any frame (bitstream > header > ...)."""
    for source in SOURCES:
        if seen[source]:
            return source
    return "none"


def inspect(
    source: str, frames: int | None = None, png: Path | None = None, png_frames: int = 3
) -> dict[str, Any]:
    """Read ``source`` and return the report that ``--json`` prints."""
    records: list[dict[str, Any]] = []
    sources: dict[str, Counter[str]] = {k: Counter() for k in SIDE_ITEMS}
    with open_video(source) as reader:
        for frame in reader:
            if frames is not None and frame.index >= frames:
                break
            records.append(frame_dict(frame))
            for item in SIDE_ITEMS:
                sources[item][frame.side.sources.get(item, "none")] += 1
            if png is not None and frame.index < png_frames:
                from bitstream.visualize import save_frame_pngs

                save_frame_pngs(frame, png)
        info, errors = reader.info, list(reader.errors)
    return {
        "input": str(source),
        "stream": stream_dict(info),
        "side_info": {
            k: _best_source(sources[k])
            for k in ("motion_vectors", "qp_map", "partitions", "qp", "pict_type")
        },
        "frames": records,
        "errors": errors,
    }


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values)
    return f"mean {arr.mean():5.2f}  min {arr.min():5.2f}  max {arr.max():5.2f}"


def format_summary(report: dict[str, Any]) -> str:
    s, frames = report["stream"], report["frames"]
    rc = s["rate_control"]
    rc_text = rc["mode"] or "unknown"
    for key in ("crf", "qp", "bitrate"):
        if rc[key] is not None:
            rc_text += f" {key}={rc[key]:g}"
    rows = [
        ("input", report["input"]),
        ("codec", f"{s['codec']} ({s['profile'] or 'unknown profile'})"),
        (
            "size",
            f"{s['width']}x{s['height']}  {s['pix_fmt']}"
            + (
                f" (decoded {s['source_pix_fmt']})"
                if s["source_pix_fmt"] not in (None, s["pix_fmt"])
                else ""
            ),
        ),
        ("frame rate", f"{s['frame_rate']} fps" if s["frame_rate"] else "unknown"),
        ("frames", f"{len(frames)} read" + (f" of {s['frames']}" if s["frames"] else "")),
        (
            "colour",
            "primaries {primaries} trc {trc} space {space} range {range}".format(**s["color"]),
        ),
        ("rotation", f"{s['rotation']:g} deg"),
        ("encoder", s["encoder"] or "unknown"),
        ("rate control", rc_text),
    ]
    lines = [f"  {k:<13}{v}" for k, v in rows]
    lines.append("side information:")
    lines += [f"  {k:<15}{v}" for k, v in report["side_info"].items()]
    lines.append("pictures:")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for f in frames:
        by_type.setdefault(f["pict_type"], []).append(f)
    for ptype in sorted(by_type):
        group = by_type[ptype]
        qps = [f["qp"] for f in group if f["qp"] is not None]
        mvs = sum(f["mv_count"] for f in group) / len(group)
        lines.append(f"  {ptype}: {len(group):5d}  QP {_stats(qps)}  MVs/frame {mvs:7.1f}")
    if report["errors"]:
        lines.append(f"errors ({len(report['errors'])}):")
        lines += [f"  {e}" for e in report["errors"][:10]]
    return "stream:\n" + "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.frames is not None and args.frames <= 0:
        raise UserError("--frames must be a positive number")
    report = inspect(args.input, frames=args.frames, png=args.png, png_frames=args.png_frames)
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_summary(report))
    return 0
