"""Measuring the output rate of a weights file (enhancer.output_rate reads what this stores).

For each input CRF (x264, preset medium) and held-out source it encodes the
clean sequence, enhances it, re-encodes the enhanced frames at input CRF -
margin for every margin and measures the net ΔPSNR-Y against the input and the
size; ``build_tables`` picks each quality's margin (see enhancer.output_rate),
``calibrate`` stores the table in the weights' meta::

    python -m enhancer.training.rate_calibration --weights W --footage ../shared/footage
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from enhancer.checkpoint import DEFAULT_WEIGHTS, load_model
from enhancer.metrics import psnr
from enhancer.output_rate import (
    COMPACT_MIN_DB,
    INPUT_CRFS,
    KEEP,
    MARGINS,
    MAX_SIZE,
    WORST_DB,
    OutputRate,
    RateEntry,
)
from enhancer.training.data import EncodeSettings
from enhancer.training.data import encode_planes as encode_to_bytes
from enhancer.training.sources import clean_sequence, footage_sources, split_sources

__all__ = ["build_tables", "calibrate", "decode_luma", "encode_planes", "measure",
           "validation_sequences"]  # fmt: skip


def encode_planes(
    planes: list[tuple], path: str | Path, crf: float, preset: str = "medium",
    codec: str = "libx264",
) -> int:  # fmt: skip
    """Encode yuv420p planes to ``path`` (MP4, the encoder's defaults); -> its size in bytes."""
    data = encode_to_bytes(planes, EncodeSettings(codec=codec, crf=crf, preset=preset))
    Path(path).write_bytes(data)
    return len(data)


def decode_luma(path: str | Path, bits: int = 8) -> list[np.ndarray]:
    """The decoded luma planes; 10-bit ones on the 8-bit scale (float, samples / 4), so
    that 8- and 10-bit outputs are scored alike against 8-bit sources."""
    import av

    fmt = {8: "yuv420p", 10: "yuv420p10le"}[bits]
    with av.open(str(path)) as c:
        out = []
        for f in c.decode(c.streams.video[0]):  # the first H rows are Y, as coded
            y = f.reformat(format=fmt).to_ndarray()[: f.height]
            out.append(y.copy() if bits == 8 else y / 4.0)
        return out


def validation_sequences(footage: Path, frames: int, size: tuple[int, int], seed: int):
    """(name, clean yuv420p planes) of every held-out source (never trained on)."""
    sources = footage_sources(footage)
    photos = [p for _, p in sources if p.parent.name == "photos"]
    cache: dict = {}
    for i, (name, path) in enumerate(split_sources(sources, validation=True)):
        rng = np.random.default_rng(seed + i)
        yield name, clean_sequence(path, photos, cache, rng, frames, size)


def measure(
    engine: Any,
    footage: Path,
    work: Path,
    crfs=INPUT_CRFS,
    margins=MARGINS,
    frames: int = 16,
    size: tuple[int, int] = (320, 256),
    seed: int = 11,
    preset: str = "medium",
    log=print,
) -> list[dict]:
    """One record per (source, input CRF): input PSNR, lossless gain, and per margin net/size."""
    from bitstream.reader import open_video

    records = []
    for name, clean in validation_sequences(footage, frames, size, seed):
        for crf in crfs:
            t0 = time.perf_counter()
            src = work / f"{name}-{crf}.mp4"
            in_size = encode_planes(clean, src, crf, preset)
            decoded, enhanced, stages, qps = [], [], [], []
            with open_video(str(src)) as reader:
                info = reader.info

                def tap(it, decoded=decoded):
                    for f in it:
                        decoded.append(f.planes)
                        yield f

                for frame, report in engine.process(tap(reader), info):
                    enhanced.append(frame.planes)
                    stages.append(int(report.stages))
                    if report.qp is not None:
                        qps.append(float(report.qp))
            base = float(np.mean([psnr(d[0], c[0]) for d, c in zip(decoded, clean, strict=True)]))
            lossless = float(
                np.mean([psnr(e[0], c[0]) for e, c in zip(enhanced, clean, strict=True)])
            )
            rec = {
                "source": name,
                "crf": crf,
                "input_psnr": base,
                "lossless_gain": lossless - base,
                "mean_qp": float(np.mean(qps)) if qps else None,
                "untouched": not any(stages),
                "net": {},
                "size": {},
            }
            for m in margins:
                if rec["untouched"]:  # the pipeline copies such a GOP: nothing is lost
                    rec["net"][m], rec["size"][m] = 0.0, 1.0
                    continue
                out = work / f"{name}-{crf}-out.mp4"
                out_size = encode_planes(enhanced, out, max(crf - m, 0), preset)
                luma = decode_luma(out)
                p = float(np.mean([psnr(y, c[0]) for y, c in zip(luma, clean, strict=True)]))
                rec["net"][m], rec["size"][m] = p - base, out_size / in_size
            records.append(rec)
            log(
                f"{name:12} crf {crf:2}: input {base:.2f} dB, enhanced {lossless - base:+.3f}, "
                + " ".join(f"m{m}:{rec['net'][m]:+.2f}/{rec['size'][m]:.1f}x" for m in margins)
                + f"  ({time.perf_counter() - t0:.0f}s)"
            )
    return records


def build_tables(records: list[dict], margins=MARGINS, preset: str = "medium") -> OutputRate:
    """Pick each quality's margin per input CRF from the measured grid (see the module doc)."""
    tables: dict[str, list[RateEntry]] = {"balanced": [], "compact": []}
    offsets = [r["mean_qp"] - r["crf"] for r in records if r["mean_qp"] is not None]
    for crf in sorted({r["crf"] for r in records}):
        rows = [r for r in records if r["crf"] == crf]
        lossless = float(np.mean([r["lossless_gain"] for r in rows]))
        grid = {}
        for m in margins:
            nets = [r["net"][m] for r in rows]
            grid[m] = (
                float(np.mean(nets)),
                float(np.min(nets)),
                float(np.mean([r["size"][m] for r in rows])),
            )
        ok = [m for m in margins if grid[m][1] >= WORST_DB and grid[m][2] <= MAX_SIZE]
        best = max(margins, key=lambda m: grid[m][0])
        reach = max((grid[m][0] for m in ok), default=0.0)
        balanced = [m for m in ok if grid[m][0] > 0 and grid[m][0] >= KEEP * reach]
        compact = [m for m in ok if grid[m][0] >= COMPACT_MIN_DB]
        for quality, cands in (("balanced", balanced), ("compact", compact)):
            if cands:
                m = min(cands)
                net, worst, ratio = grid[m]
                tables[quality].append(
                    RateEntry(
                        crf,
                        m,
                        False,
                        round(net, 4),
                        round(worst, 4),
                        round(ratio, 3),
                        round(lossless, 4),
                    )
                )
            else:
                tables[quality].append(
                    RateEntry(crf, best, True, 0.0, 0.0, 1.0, round(lossless, 4))
                )
    measured = {
        f"{r['source']}@{r['crf']}": {
            "lossless": round(r["lossless_gain"], 4),
            "net": {str(m): round(v, 4) for m, v in r["net"].items()},
            "size": {str(m): round(v, 3) for m, v in r["size"].items()},
        }
        for r in records
    }
    qp_offset = round(float(np.mean(offsets)), 2) if offsets else 2.0
    return OutputRate(tables, preset, qp_offset, "calibrated", measured)


def calibrate(
    weights: str | Path | None,
    footage: Path,
    *,
    frames: int = 16,
    size: tuple[int, int] = (320, 256),
    device: str = "cpu",
    save: bool = True,
    log=print,
) -> OutputRate:
    """Measure the output rate for ``weights`` and (``save``) store it in its meta."""
    import tempfile

    from enhancer.engine import Engine

    engine = Engine(weights=weights, device=device)
    with tempfile.TemporaryDirectory(prefix="vqe-rate-") as work:
        records = measure(engine, footage, Path(work), frames=frames, size=size, log=log)
    rate = build_tables(records)
    if save:
        path = Path(weights) if weights else Path(DEFAULT_WEIGHTS)
        loaded = load_model(path)
        meta = dict(loaded.meta or {})
        meta["output_rate"] = rate.to_dict()
        replace(loaded, meta=meta).save(path)
        log(f"saved the output rate into {path}")
    return rate


def format_tables(rate: OutputRate) -> str:
    lines = ["quality   input CRF  output CRF  net dB  worst dB  size  lossless dB"]
    for quality, table in rate.tables.items():
        for e in table:
            out = "copy" if e.copy else f"{e.level - e.margin:g}"
            lines.append(
                f"{quality:9} {e.level:9g}  {out:>10}  {e.net_gain:+6.3f}  "
                f"{e.worst:+8.3f}  {e.size_ratio:4.2f}x  {e.lossless_gain:+.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m enhancer.training.rate_calibration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped one)")
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dry-run", action="store_true", help="measure and print, do not save")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rate = calibrate(
        args.weights,
        args.footage,
        frames=args.frames,
        device=args.device,
        save=not args.dry_run,
        log=lambda s: print(s, flush=True),
    )
    print(format_tables(rate))
    print(f"qp_offset {rate.qp_offset}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rate.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
