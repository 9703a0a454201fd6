"""Measuring the output rate of a weights file (enhancer.output_rate reads what this stores).

For each input CRF (x264, preset medium) and held-out source it encodes the
clean sequence, enhances it, re-encodes the enhanced frames at input CRF -
margin for every margin and measures the net ΔPSNR-Y against the input and the
size: with x264 8-bit for ``balanced`` and ``compact`` (``MARGINS``) and with
x265 Main10 for ``high`` (``HIGH_MARGINS``; 10-bit luma scored on the 8-bit
scale, see ``decode_luma``). ``build_tables`` picks each quality's margin (see
enhancer.output_rate), ``calibrate`` stores the table in the weights' meta::

    python -m enhancer.training.rate_calibration --weights W --footage ../shared/footage

``--quality high`` measures that level only and keeps the weights' other tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from enhancer.checkpoint import DEFAULT_WEIGHTS, load_model
from enhancer.metrics import psnr
from enhancer.options import QUALITY_ENCODERS
from enhancer.output_rate import (
    CALIBRATION_MAX_SIZE,
    CALIBRATION_WORST_DB,
    COMPACT_MIN_DB,
    HIGH_KEEP,
    HIGH_MARGINS,
    INPUT_CRFS,
    KEEP,
    MARGINS,
    MAX_SIZE,
    WORST_DB,
    OutputRate,
    RateEntry,
    output_crf,
)
from enhancer.training.data import EncodeSettings
from enhancer.training.data import encode_planes as encode_to_bytes
from enhancer.training.sources import clean_sequence, footage_sources, split_sources

__all__ = ["REENCODES", "ReEncode", "build_tables", "calibrate", "decode_luma", "encode_planes",
           "measure", "merged", "stored_records", "validation_sequences"]  # fmt: skip


@dataclass(frozen=True)
class ReEncode:
    """How the calibration re-encodes the enhanced frames for some quality levels."""

    codec: str
    pix_fmt: str
    margins: tuple[float, ...]
    qualities: tuple[str, ...]  # the tables measured with it
    key: str = ""  # record fields: ``{key}net`` / ``{key}size`` (x264's: net / size)
    params: dict[str, str] = field(default_factory=dict)  # encoder options besides crf/preset

    @property
    def bits(self) -> int:
        return 10 if self.pix_fmt.endswith("10le") else 8

    def encode(self, planes: list[tuple], path: Path, crf: float, preset: str) -> int:
        """The 8-bit planes (10-bit: samples << 2, as the writer's reformat) -> size."""
        if self.bits == 10:
            planes = [tuple(p.astype(np.uint16) << 2 for p in yuv) for yuv in planes]
        settings = EncodeSettings(codec=self.codec, crf=crf, preset=preset)
        data = encode_to_bytes(
            planes, settings, pix_fmt=self.pix_fmt, options={**settings.options(), **self.params}
        )
        path.write_bytes(data)
        return len(data)


REENCODES = (
    ReEncode("libx264", "yuv420p", MARGINS, ("balanced", "compact")),
    # info=0: no x265 settings SEI, a fixed ~2.3 kB that is noise in a real video but
    # 10-90 % of these short clips' inputs (as bench/output.py measures it).
    ReEncode(
        QUALITY_ENCODERS["high"].codec, "yuv420p10le", HIGH_MARGINS, ("high",), "high_",
        {"x265-params": "log-level=none:info=0"},
    ),
)  # fmt: skip


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
    reencodes: tuple[ReEncode, ...] | None = None,
) -> list[dict]:
    """One record per (source, input CRF): input PSNR, lossless gain, and per margin net/size
    of each of ``reencodes`` (default: x264 at ``margins``, and x265 Main10 at its own)."""
    from bitstream.reader import open_video

    if reencodes is None:
        reencodes = (replace(REENCODES[0], margins=tuple(margins)), *REENCODES[1:])
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
            }
            cells = []
            for how in reencodes:
                net, ratio = _reencode_grid(how, enhanced, clean, base, in_size, crf, rec, work,
                                            f"{name}-{crf}", preset)  # fmt: skip
                rec[f"{how.key}net"], rec[f"{how.key}size"] = net, ratio
                cells += [f"{how.key}m{m:g}:{net[m]:+.2f}/{ratio[m]:.1f}x" for m in how.margins]
            records.append(rec)
            log(
                f"{name:12} crf {crf:2}: input {base:.2f} dB, enhanced {lossless - base:+.3f}, "
                + " ".join(cells)
                + f"  ({time.perf_counter() - t0:.0f}s)"
            )
    return records


def _reencode_grid(
    how: ReEncode,
    enhanced: list[tuple],
    clean: list[tuple],
    base: float,
    in_size: int,
    crf: float,
    rec: dict,
    work: Path,
    stem: str,
    preset: str,
) -> tuple[dict, dict]:
    """Per margin of ``how``: net ΔPSNR-Y over the input and output/input size. Margins that
    clamp to the same output CRF are encoded once."""
    net: dict = {}
    ratio: dict = {}
    done: dict[float, tuple[float, float]] = {}
    for m in how.margins:
        if rec["untouched"]:  # the pipeline copies such a GOP: nothing is lost
            net[m], ratio[m] = 0.0, 1.0
            continue
        out_crf = output_crf(crf, m, how.codec)
        if out_crf not in done:
            out = work / f"{stem}-out.mp4"
            out_size = how.encode(enhanced, out, out_crf, preset)
            luma = decode_luma(out, how.bits)
            p = float(np.mean([psnr(y, c[0]) for y, c in zip(luma, clean, strict=True)]))
            done[out_crf] = (p - base, out_size / in_size)
        net[m], ratio[m] = done[out_crf]
    return net, ratio


def build_tables(
    records: list[dict],
    margins=MARGINS,
    preset: str = "medium",
    reencodes: tuple[ReEncode, ...] | None = None,
) -> OutputRate:
    """Pick each quality's margin per input CRF from the measured grid (see the module doc):
    the tables of every re-encode in ``reencodes`` whose grid the records hold."""
    if reencodes is None:
        reencodes = (replace(REENCODES[0], margins=tuple(margins)), *REENCODES[1:])
    held = [h for h in reencodes if records and all(f"{h.key}net" in r for r in records)]
    tables: dict[str, list[RateEntry]] = {q: [] for h in held for q in h.qualities}
    offsets = [r["mean_qp"] - r["crf"] for r in records if r["mean_qp"] is not None]
    for crf in sorted({r["crf"] for r in records}):
        rows = [r for r in records if r["crf"] == crf]
        for how in held:
            gains = [r.get(f"{how.key}lossless_gain", r["lossless_gain"]) for r in rows]
            lossless = round(float(np.mean(gains)), 4)
            grid = {}
            for m in how.margins:
                nets = [r[f"{how.key}net"][m] for r in rows]
                sizes = [r[f"{how.key}size"][m] for r in rows]
                grid[m] = (float(np.mean(nets)), float(np.min(nets)), float(np.mean(sizes)))
            for quality in how.qualities:
                tables[quality].append(_pick(grid, quality, crf, lossless))
    measured = {  # per re-encode its own lossless gain: merged grids keep theirs
        f"{r['source']}@{r['crf']}": {
            f"{h.key}{what}": (
                round(r.get(f"{h.key}lossless_gain", r["lossless_gain"]), 4)
                if what == "lossless"
                else {
                    str(m): round(v, 4 if what == "net" else 3)
                    for m, v in r[f"{h.key}{what}"].items()
                }
            )
            for h in held
            for what in ("lossless", "net", "size")
        }
        for r in records
    }
    qp_offset = round(float(np.mean(offsets)), 2) if offsets else 2.0
    return OutputRate(tables, preset, qp_offset, "calibrated", measured)


def _pick(
    grid: dict[float, tuple[float, float, float]], quality: str, crf: float, lossless: float
) -> RateEntry:
    """One quality's entry at one input CRF from (mean net, worst, mean size) per margin:
    ``compact`` the smallest margin that gains ``COMPACT_MIN_DB``, ``balanced`` the smallest
    that keeps ``KEEP`` of the best net gain within the bounds, ``high`` ``HIGH_KEEP`` of it
    and more than ``COMPACT_MIN_DB``."""
    margins = list(grid)
    # The best gain reachable is the promise's (WORST_DB, MAX_SIZE); the margin chosen
    # must also meet it with headroom (CALIBRATION_*), so that it holds on other crops.
    within = [m for m in margins if grid[m][1] >= WORST_DB and grid[m][2] <= MAX_SIZE]
    ok = [
        m
        for m in within
        if grid[m][1] >= CALIBRATION_WORST_DB and grid[m][2] <= CALIBRATION_MAX_SIZE
    ]
    if quality == "compact":
        cands = [m for m in ok if grid[m][0] >= COMPACT_MIN_DB]
    else:
        reach = max((grid[m][0] for m in within), default=0.0)
        keep = HIGH_KEEP if quality == "high" else KEEP
        # high: a gain under compact's floor is x265's own noise, not worth 1.5x the size
        least = COMPACT_MIN_DB if quality == "high" else 0.0
        cands = [m for m in ok if grid[m][0] > least and grid[m][0] >= keep * reach]
    if not cands:
        best = max(margins, key=lambda m: grid[m][0])
        return RateEntry(crf, best, True, 0.0, 0.0, 1.0, lossless)
    m = min(cands)
    net, worst, ratio = grid[m]
    return RateEntry(crf, m, False, round(net, 4), round(worst, 4), round(ratio, 3), lossless)


def calibrate(
    weights: str | Path | None,
    footage: Path,
    *,
    frames: int = 16,
    size: tuple[int, int] = (320, 256),
    device: str = "cpu",
    save: bool = True,
    qualities: tuple[str, ...] | None = None,
    crfs: tuple[int, ...] = INPUT_CRFS,
    records: list[dict] | None = None,
    log=print,
) -> OutputRate:
    """Measure the output rate for ``weights`` and (``save``) store it in its meta.

    ``qualities``: only the re-encodes of these levels are measured, and the weights' own
    tables of the other levels are kept (merged, with their measured grid). ``records``:
    build the tables from these (``stored_records``) instead of measuring.
    """
    import tempfile

    from enhancer.engine import Engine

    reencodes = tuple(h for h in REENCODES if not qualities or set(h.qualities) & set(qualities))
    if not reencodes:
        raise ValueError(f"no calibrated table for {qualities}: archive has none")
    if records is None:
        engine = Engine(weights=weights, device=device)
        with tempfile.TemporaryDirectory(prefix="vqe-rate-") as work:
            records = measure(engine, footage, Path(work), crfs=crfs, frames=frames, size=size,
                              log=log, reencodes=reencodes)  # fmt: skip
    rate = build_tables(records, reencodes=reencodes)
    own = (load_model(weights).meta or {}).get("output_rate")
    if qualities and isinstance(own, dict):
        rate = merged(OutputRate.from_dict(own), rate)
    if save:
        path = Path(weights) if weights else Path(DEFAULT_WEIGHTS)
        loaded = load_model(path)
        meta = dict(loaded.meta or {})
        meta["output_rate"] = rate.to_dict()
        replace(loaded, meta=meta).save(path)
        log(f"saved the output rate into {path}")
    return rate


def stored_records(measured: dict[str, dict]) -> list[dict]:
    """Records (as ``measure`` returns them) from a table's stored grid (``measured``), to
    rebuild its tables without measuring again; the mean QPs are not stored (the QP offset
    is then the default, which ``merged`` replaces with the weights' own)."""
    records = []
    for key, cells in measured.items():
        source, _, crf = key.rpartition("@")
        rec: dict[str, Any] = {"source": source, "crf": int(crf), "input_psnr": None,
                               "mean_qp": None, "untouched": False}  # fmt: skip
        for name, value in cells.items():
            if name.endswith("lossless"):
                rec[f"{name}_gain"] = value
            else:
                rec[name] = {int(m): v for m, v in value.items()}
        rec["lossless_gain"] = rec.get("lossless_gain", next(
            v for k, v in cells.items() if k.endswith("lossless")))  # fmt: skip
        records.append(rec)
    return records


def merged(old: OutputRate, new: OutputRate) -> OutputRate:
    """``old``'s tables with ``new``'s measured levels over them (and their grids merged
    per source and input CRF); the QP offset and preset stay ``old``'s."""
    own = {q: t for q, t in old.tables.items() if q not in old.defaulted}
    measured = {k: dict(v) for k, v in old.measured.items()}
    for key, cells in new.measured.items():
        measured.setdefault(key, {}).update(cells)
    return replace(old, tables={**own, **new.tables}, measured=measured, defaulted=frozenset())


def format_tables(rate: OutputRate) -> str:
    codec = {q: h.codec for h in REENCODES for q in h.qualities}
    lines = ["quality   input CRF  output CRF  net dB  worst dB  size  lossless dB"]
    for quality, table in rate.tables.items():
        for e in table:
            out = "copy" if e.copy else f"{output_crf(e.level, e.margin, codec[quality]):g}"
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
    ap.add_argument(
        "--quality",
        nargs="+",
        choices=sorted({q for h in REENCODES for q in h.qualities}),
        default=None,
        help="measure only these levels' tables and keep the weights' others (default: all)",
    )
    ap.add_argument(
        "--crfs", type=int, nargs="+", default=list(INPUT_CRFS), help="input CRFs to measure"
    )
    ap.add_argument(
        "--rebuild",
        type=Path,
        default=None,
        metavar="JSON",
        help="build the tables from the grid a --json file stored, without measuring "
        "(after a change of the choosing rule)",
    )
    args = ap.parse_args(argv)
    stored = None
    if args.rebuild:
        stored = stored_records(json.loads(args.rebuild.read_text())["measured"])
    t0 = time.perf_counter()
    rate = calibrate(
        args.weights,
        args.footage,
        frames=args.frames,
        device=args.device,
        save=not args.dry_run,
        qualities=tuple(args.quality) if args.quality else None,
        crfs=tuple(args.crfs),
        records=stored,
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
