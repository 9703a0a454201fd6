"""Issue 11's table: what a user's default ``vqe enhance`` output is worth against its input;
issue 32's: how much of the gain survives re-encoding with other encoders.

Held-out sources (never trained on), encoded here with libx264 (preset medium)
at CRF 22/27/37, enhanced with the product's settings at each of ``--qualities``
(``Pipeline.run`` with only ``quality`` set: the calibrated output rate, untouched
GOPs copied; default ``balanced``, the default, and ``high``, x265 Main10), then the
output and the input are both compared with the clean source (a 10-bit output's
luma on the 8-bit scale, see below):

    quality | input CRF | net ΔPSNR-Y output vs input | worst source | output size / input size
        | ΔVMAF

Then, per input CRF, the enhanced frames themselves (``enhancer.frames`` with
default options, the frames ``--codec ffv1`` writes; the same engine, loaded
once) are encoded with each of ``--codecs``:

    x264          libx264, yuv420p, preset medium
    x264-10bit    libx264, yuv420p10le, preset medium
    x265-main10   libx265, yuv420p10le (Main10), preset medium, no settings SEI (info=0)
    svtav1-10bit  libsvtav1, yuv420p10le, preset 8 (SVT_LOG=1 unless set: errors only)

at a walk of that encoder's CRFs: from a first guess near the input's size,
up (smaller files) until the mean size is at most 1x the input's and down
until it passes ``MAX_SIZE`` (3x), so each encoder's own CRF scale is spanned
from about 1x to 3x whatever the content. Each output is decoded and its luma
compared with the clean source: net ΔPSNR-Y is its mean PSNR-Y minus the
input's. 10-bit outputs are compared on the 8-bit scale: the 8-bit enhanced
planes go in shifted left by 2 (sample v -> 4v, exact), and the decoded
10-bit luma is divided by 4 (as float, not rounded) before ``psnr`` with peak
255 against the 8-bit clean luma; that is PSNR on the 10-bit scale with the
clean source at 4v and peak 1020, so 8- and 10-bit outputs are scored alike.
The best setting is the one with the highest mean net gain that keeps the
product's promise (every source at least ``WORST_DB`` = -0.05 dB, mean size at
most 3x the input's); where none does, the product would copy the input
(+0.00 dB, 1.00x) and the table says so. FFV1 (lossless) is the ceiling. An
encoder can also move the input towards the clean source by itself (deblocking,
SVT-AV1's temporal filter), so "input re-encoded alike" is the net ΔPSNR-Y of
the unenhanced decoded input encoded at the same setting:

    input CRF | encoder | best CRF | net ΔPSNR-Y | worst source | size | ΔVMAF
        | input re-encoded alike | CRFs tried (sizes)

VMAF comes from ``vmaf_torch`` (PyPI) when it is installed and works offline;
otherwise the column says so. An encoder that fails (e.g. an unsupported size)
is a note in its row, not a crash. Writes JSON to bench/results/output.json
(``summary`` and ``rows``: the product's output, per quality and input CRF; ``codecs``:
the re-encodes; ``--codecs`` with no name skips them).

    python bench/output.py --footage ../shared/footage [--weights W] [--rate TABLE.json]
        [--qualities balanced high] [--codecs x264 x264-10bit x265-main10 svtav1-10bit]
        [--crfs 22 27 37] [--frames 24] [--sources N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitstream.reader import open_video  # noqa: E402
from enhancer.frame_stream import frames as enhanced_frames  # noqa: E402
from enhancer.metrics import Vmaf, psnr  # noqa: E402
from enhancer.options import QUALITIES  # noqa: E402
from enhancer.output_rate import MAX_SIZE, WORST_DB  # noqa: E402
from enhancer.pipeline import Pipeline  # noqa: E402
from enhancer.training.data import EncodeSettings  # noqa: E402
from enhancer.training.data import encode_planes as encode_to_bytes  # noqa: E402
from enhancer.training.rate_calibration import (  # noqa: E402
    decode_luma,
    encode_planes,
    validation_sequences,
)

CRFS = (22, 27, 37)
QUALITY_DEFAULTS = ("balanced", "high")
FRAME_RATE = 25  # as encode_planes writes the inputs


@dataclass(frozen=True)
class OutputCodec:
    """One way to re-encode the enhanced frames, and where its CRF walk starts."""

    encoder: str
    pix_fmt: str
    scale: float  # first CRF tried: round(scale * input CRF + offset), about the input's size
    offset: float
    step: int  # CRF step of the walk
    crf_max: int
    options: dict[str, str] = field(default_factory=dict)  # besides crf (they win)

    @property
    def bits(self) -> int:
        return 10 if self.pix_fmt.endswith("10le") else 8

    def start(self, input_crf: float) -> int:
        return int(min(max(round(self.scale * input_crf + self.offset), 0), self.crf_max))

    def encoder_options(self, crf: int) -> dict[str, str]:
        if self.encoder in ("libx264", "libx265"):  # the options the training encodes use
            base = EncodeSettings(codec=self.encoder, crf=crf, preset="medium").options()
        else:
            base = {"crf": str(crf)}
        return {**base, **self.options}


# First guesses measured on two held-out sources (Kay, vtest) re-encoding the decoded input:
# x264/x265 10-bit at the input's CRF are 0.8-1.0x its size; SVT-AV1's 1x point is
# 1.1-1.6x the x264 CRF and content-dependent (the walk finds the span either way).
OUTPUT_CODECS: dict[str, OutputCodec] = {
    "x264": OutputCodec("libx264", "yuv420p", 1.0, 0.0, 2, 51),
    "x264-10bit": OutputCodec("libx264", "yuv420p10le", 1.0, 0.0, 2, 51),
    # info=0: no x265 settings SEI, a fixed ~2.3 kB per stream that is noise in a real video
    # but 10-90% of these short clips' inputs (x264's own SEI is in the input too).
    "x265-main10": OutputCodec(
        "libx265", "yuv420p10le", 1.0, 0.0, 2, 51, {"x265-params": "log-level=none:info=0"}
    ),
    "svtav1-10bit": OutputCodec("libsvtav1", "yuv420p10le", 1.55, -5.0, 3, 63, {"preset": "8"}),
}
FFV1 = OutputCodec("ffv1", "yuv420p", 0.0, 0.0, 1, 0, {"level": "3", "slicecrc": "1"})


def encode_frames(planes: list[tuple], path: Path, codec: OutputCodec, crf: int | None) -> int:
    """Encode 8-bit yuv420p planes with ``codec`` (10-bit: samples << 2) -> the file's bytes."""
    shift = codec.bits - 8
    if shift:
        planes = [tuple(p.astype(np.uint16) << shift for p in yuv) for yuv in planes]
    data = encode_to_bytes(
        planes,
        EncodeSettings(codec=codec.encoder),
        FRAME_RATE,
        pix_fmt=codec.pix_fmt,
        options=codec.options if crf is None else codec.encoder_options(crf),
        container="matroska" if codec.encoder == "ffv1" else "mp4",
    )
    path.write_bytes(data)
    return len(data)


@dataclass
class Enhanced:
    """One source at one input CRF: what the re-encodes are scored against."""

    name: str
    ref: list[np.ndarray]  # clean luma
    planes: list[tuple]  # the enhanced frames (8-bit yuv420p planes)
    decoded: list[tuple]  # the input's frames as decoded (the encoder-alone baseline)
    in_size: int
    in_psnr: float
    in_vmaf: float | None


def _bits(path: Path) -> int:
    """The bit depth of a file's video stream (8 or 10), for ``decode_luma``."""
    import av

    with av.open(str(path)) as c:
        name = c.streams.video[0].codec_context.format.name
    return 10 if name.endswith("10le") else 8


def _mean_psnr(luma: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return float(np.mean([psnr(y, r) for y, r in zip(luma, ref, strict=True)]))


def _point(
    items: list[Enhanced],
    codec: OutputCodec,
    crf: int | None,
    work: Path,
    tag: str,
    frames: str = "planes",
) -> dict[str, Any]:
    """Encode every source's ``frames`` (enhanced ``planes``, or the ``decoded`` input) with
    ``codec`` at ``crf``: per-source net ΔPSNR-Y against the input, and size."""
    nets, sizes, files = {}, {}, {}
    suffix = ".mkv" if codec.encoder == "ffv1" else ".mp4"
    for it in items:
        path = work / f"{it.name}-{tag}-{crf}-{frames}{suffix}"
        size = encode_frames(getattr(it, frames), path, codec, crf)
        nets[it.name] = _mean_psnr(decode_luma(path, codec.bits), it.ref) - it.in_psnr
        sizes[it.name] = size / it.in_size
        files[it.name] = path
    worst = min(nets, key=nets.__getitem__)
    return {
        "crf": crf,
        "mean_net_dpsnr_y": float(np.mean(list(nets.values()))),
        "worst": nets[worst],
        "worst_source": worst,
        "size_ratio": float(np.mean(list(sizes.values()))),
        "net": nets,
        "size": sizes,
        "_files": files,
    }


def _dvmaf(items: list[Enhanced], point: dict[str, Any], bits: int, vmaf: Vmaf) -> float | None:
    if not vmaf:
        return None
    scores = [
        vmaf(it.ref, decode_luma(point["_files"][it.name], bits)) - it.in_vmaf for it in items
    ]
    return float(np.mean(scores))


def _keeps_promise(p: dict[str, Any]) -> bool:
    return p["worst"] >= WORST_DB and p["size_ratio"] <= MAX_SIZE


def codec_sweep(
    items: list[Enhanced],
    name: str,
    codec: OutputCodec,
    input_crf: int,
    work: Path,
    vmaf: Vmaf,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Walk ``codec``'s CRFs over 1x..3x the input's size; the best setting under the promise."""
    points: dict[int, dict[str, Any]] = {}
    note, failed = None, False
    tag = f"{input_crf}-{name}"

    def at(crf: int) -> dict[str, Any]:
        if crf not in points:
            points[crf] = _point(items, codec, crf, work, tag)
            p = points[crf]
            log(
                f"  crf {input_crf} {name:12} crf {crf:2}: net {p['mean_net_dpsnr_y']:+.3f} dB, "
                f"worst {p['worst']:+.3f} ({p['worst_source']}), size {p['size_ratio']:.2f}x"
            )
        return points[crf]

    start = codec.start(input_crf)
    try:
        hi = start
        while at(hi)["size_ratio"] > 1.0 and hi + codec.step <= codec.crf_max:
            hi += codec.step  # smaller files, down to the input's size
        lo = start
        while at(lo)["size_ratio"] <= MAX_SIZE and lo - codec.step >= 0:
            lo -= codec.step  # bigger files, until past MAX_SIZE
    except Exception as exc:  # noqa: BLE001 - an encoder that cannot do this is a note
        failed = True
        note = f"{codec.encoder} {codec.pix_fmt} failed: {type(exc).__name__}: {exc}"
        log(f"  crf {input_crf} {name}: {note}")
    grid = [points[c] for c in sorted(points, reverse=True)]
    fits = [p for p in grid if _keeps_promise(p)]
    best = max(fits, key=lambda p: p["mean_net_dpsnr_y"]) if fits else None
    alone = None  # the encoder's own effect: the unenhanced input re-encoded at the best CRF
    if best is not None:
        try:
            alone = _point(items, codec, best["crf"], work, tag, "decoded")["mean_net_dpsnr_y"]
        except Exception as exc:  # noqa: BLE001 - as above
            note = f"input re-encode failed: {type(exc).__name__}: {exc}"
    if best is None and grid and note is None:
        small = [p for p in grid if p["size_ratio"] <= MAX_SIZE]
        closest = max(small or grid, key=lambda p: p["mean_net_dpsnr_y"])
        note = (
            f"no CRF keeps every source >= {WORST_DB} dB within {MAX_SIZE:g}x (copy); highest: "
            f"CRF {closest['crf']} {closest['mean_net_dpsnr_y']:+.3f} dB, worst "
            f"{closest['worst']:+.3f} ({closest['worst_source']}), {closest['size_ratio']:.2f}x"
        )
    return {
        "encoder": codec.encoder,
        "pix_fmt": codec.pix_fmt,
        "best_crf": None if best is None else best["crf"],
        "mean_net_dpsnr_y": None if best is None else best["mean_net_dpsnr_y"],
        "worst": None if best is None else best["worst"],
        "worst_source": None if best is None else best["worst_source"],
        "size_ratio": None if best is None else best["size_ratio"],
        "dvmaf": None if best is None else _dvmaf(items, best, codec.bits, vmaf),
        "input_reencoded_net": alone,
        "note": note,
        "failed": failed,
        "grid": [{k: v for k, v in p.items() if k != "_files"} for p in grid],
    }


def ffv1_ceiling(items: list[Enhanced], input_crf: int, work: Path, vmaf: Vmaf) -> dict[str, Any]:
    """The enhanced frames, lossless: the gain every re-encode loses some of."""
    p = _point(items, FFV1, None, work, f"{input_crf}-ffv1")
    return {
        "encoder": "ffv1",
        "pix_fmt": FFV1.pix_fmt,
        "best_crf": None,
        "mean_net_dpsnr_y": p["mean_net_dpsnr_y"],
        "worst": p["worst"],
        "worst_source": p["worst_source"],
        "size_ratio": p["size_ratio"],
        "dvmaf": _dvmaf(items, p, 8, vmaf),
        "input_reencoded_net": 0.0,
        "note": None,
        "failed": False,
        "grid": [{k: v for k, v in p.items() if k != "_files"}],
    }


def codecs_table(codecs: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """The markdown table of ``codecs`` (input CRF -> codec name -> sweep), then its notes."""
    lines = [
        "| input CRF | encoder | best CRF | net ΔPSNR-Y | worst source | size | ΔVMAF "
        "| input re-encoded alike | CRFs tried (sizes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for crf, sweeps in codecs.items():
        for name, s in sweeps.items():
            label = "FFV1 (lossless, ceiling)" if name == "ffv1" else f"{name} ({s['pix_fmt']})"
            grid = s["grid"]
            tried = (
                f"{grid[0]['crf']}..{grid[-1]['crf']} ({grid[0]['size_ratio']:.2f}-"
                f"{grid[-1]['size_ratio']:.2f}x)"
                if grid and name != "ffv1"
                else "-"
            )
            if s["mean_net_dpsnr_y"] is None:
                cells = ["failed" if s["failed"] else "none: copy", "-", "-", "-", "-"]
            else:
                cells = [
                    "lossless" if name == "ffv1" else str(s["best_crf"]),
                    f"{s['mean_net_dpsnr_y']:+.3f} dB",
                    f"{s['worst']:+.3f} ({s['worst_source']})",
                    f"{s['size_ratio']:.2f}x",
                    f"{s['dvmaf']:+.2f}" if s["dvmaf"] is not None else "n/a",
                ]
            alone = s["input_reencoded_net"]
            cells.append("-" if alone is None or name == "ffv1" else f"{alone:+.3f} dB")
            lines.append(f"| {crf} | {label} | " + " | ".join(cells) + f" | {tried} |")
            if s["note"]:
                notes.append(f"- CRF {crf} {name}: {s['note']}")
    return lines + notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seed", type=int, default=101, help="not the calibration's seed (11)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/output.json"))
    ap.add_argument(
        "--rate",
        type=Path,
        default=None,
        help="an output-rate table (JSON from python -m enhancer.training.rate_calibration "
        "--dry-run --json) to use instead of the one in the weights' meta",
    )
    ap.add_argument(
        "--qualities",
        nargs="+",
        choices=list(QUALITIES),
        default=list(QUALITY_DEFAULTS),
        help="the --quality levels of the product's output table (default: balanced high)",
    )
    ap.add_argument(
        "--codecs",
        nargs="*",
        choices=list(OUTPUT_CODECS),
        default=list(OUTPUT_CODECS),
        help="encoders to re-encode the enhanced frames with (default: all; none: skip)",
    )
    ap.add_argument("--crfs", type=int, nargs="+", default=list(CRFS), help="input CRFs")
    ap.add_argument("--sources", type=int, default=None, help="only the first N held-out sources")
    args = ap.parse_args(argv)
    if args.sources is not None and args.sources < 1:
        ap.error("--sources must be at least 1")
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, not a banner per encode
    engine = None
    if args.weights or args.rate:
        from enhancer.engine import Engine

        engine = Engine(weights=args.weights, device="auto")
        if args.rate:
            engine.meta = {**(engine.meta or {}), "output_rate": json.loads(args.rate.read_text())}
    pipeline = Pipeline(engine=engine)
    vmaf = Vmaf()
    vmaf_note = None if vmaf else vmaf.reason
    crfs = tuple(args.crfs)
    rows: dict[str, dict[int, list[dict]]] = {q: {c: [] for c in crfs} for q in args.qualities}
    enhanced: dict[int, list[Enhanced]] = {c: [] for c in crfs}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vqe-bench-output-") as work:
        work_dir = Path(work)
        sequences = validation_sequences(args.footage, args.frames, (320, 256), args.seed)
        for name, clean in itertools.islice(sequences, args.sources):
            ref = [c[0] for c in clean]
            for crf in crfs:
                src = work_dir / f"{name}-{crf}.mp4"
                in_size = encode_planes(clean, src, crf)
                inp = decode_luma(src)
                in_psnr = _mean_psnr(inp, ref)
                in_vmaf = vmaf(ref, inp) if vmaf else None
                for quality in args.qualities:
                    ext = ".mkv" if quality == "archive" else ".mp4"
                    out = work_dir / f"{name}-{crf}-{quality}{ext}"
                    result = pipeline.run(src, out, {"quality": quality})
                    outp = decode_luma(out, _bits(out))
                    row = {
                        "source": name,
                        "net_dpsnr_y": _mean_psnr(outp, ref) - in_psnr,
                        "size_ratio": out.stat().st_size / in_size,
                        "output_crf": result.crf,
                        "codec": result.codec,
                        "gops_copied": result.gops_copied,
                        "gops": result.gops,
                        "passthrough": result.passthrough,
                        "expected_gain_db": result.expected_gain_db,
                    }
                    if vmaf:
                        row["dvmaf"] = vmaf(ref, outp) - in_vmaf
                    rows[quality][crf].append(row)
                    print(
                        f"{name:12} crf {crf} {quality:8}: net {row['net_dpsnr_y']:+.3f} dB, "
                        f"size {row['size_ratio']:.2f}x, {result.codec} crf {result.crf}, "
                        f"copied {result.gops_copied}/{result.gops}",
                        flush=True,
                    )
                if not args.codecs:
                    continue
                # The enhanced frames themselves (what --codec ffv1 writes), same engine.
                with enhanced_frames(src, {}, engine=pipeline.engine) as video:
                    planes = [f.planes for f in video]
                with open_video(str(src)) as reader:
                    decoded = [f.planes for f in reader]
                enhanced[crf].append(
                    Enhanced(name, ref, planes, decoded, in_size, in_psnr, in_vmaf)
                )
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    print(
        "\n| quality | input CRF | net ΔPSNR-Y, output vs input | worst source "
        "| output size / input size | ΔVMAF |\n| --- | --- | --- | --- | --- | --- |"
    )
    for quality, by_crf in rows.items():
        summary[quality] = {}
        for crf, rs in by_crf.items():
            if not rs:
                continue
            worst = min(rs, key=lambda r: r["net_dpsnr_y"])
            vm = np.mean([r["dvmaf"] for r in rs]) if vmaf else None
            s = summary[quality][crf] = {
                "mean_net_dpsnr_y": float(np.mean([r["net_dpsnr_y"] for r in rs])),
                "worst": worst["net_dpsnr_y"],
                "worst_source": worst["source"],
                "size_ratio": float(np.mean([r["size_ratio"] for r in rs])),
                "dvmaf": None if vm is None else float(vm),
            }
            vm_cell = f"{vm:+.2f}" if vm is not None else "n/a"
            print(
                f"| {quality} | {crf} | {s['mean_net_dpsnr_y']:+.3f} dB | {s['worst']:+.3f} "
                f"({s['worst_source']}) | {s['size_ratio']:.2f}x | {vm_cell} |"
            )
    if vmaf_note:
        print(f"VMAF: {vmaf_note}")
    codecs: dict[int, dict[str, dict[str, Any]]] = {}
    if args.codecs:
        print("\nRe-encoding the enhanced frames (best setting under the promise):", flush=True)
    with tempfile.TemporaryDirectory(prefix="vqe-bench-codecs-") as work:
        work_dir = Path(work)
        for crf, items in enhanced.items():
            if not items or not args.codecs:
                continue
            codecs[crf] = {"ffv1": ffv1_ceiling(items, crf, work_dir, vmaf)}
            for name in args.codecs:
                codecs[crf][name] = codec_sweep(
                    items, name, OUTPUT_CODECS[name], crf, work_dir, vmaf
                )
    if codecs:
        print("\n" + "\n".join(codecs_table(codecs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "summary": summary,
                "rows": rows,
                "codecs": codecs,
                "codec_settings": {
                    n: {"encoder": c.encoder, "pix_fmt": c.pix_fmt, "options": c.options}
                    for n, c in {**OUTPUT_CODECS, "ffv1": FFV1}.items()
                },
                "vmaf": vmaf_note or "vmaf-torch",
                "seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
