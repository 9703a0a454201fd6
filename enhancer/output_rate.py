"""The output rate: which CRF re-encodes the enhanced frames without losing the gain.

Re-encoding costs a generation loss; the model gains 0.05-0.4 dB. So the output
CRF is not a constant offset: it is calibrated, for the weights it ships with,
on held-out sources, and stored in the weights file's meta under
``"output_rate"``::

    python -m enhancer.output_rate --weights enhancer/weights/vqe-v1.pt --footage ../shared/footage

For each input CRF (x264, preset medium) it measures, per source, the net
ΔPSNR-Y of the re-encoded output over the input (both against the clean
source) and the output/input size at output CRF = input CRF - margin for a
range of margins, then picks per quality:

* ``balanced`` (the default): among margins whose worst source loses at most
  ``WORST_DB`` and whose mean size is at most ``MAX_SIZE`` times the input's,
  the smallest margin (smallest file) that keeps at least ``KEEP`` of the best
  mean net gain reachable there;
* ``compact``: the smallest margin with a mean net gain of at least
  ``COMPACT_MIN_DB`` (and the same worst-source bound);
* ``archive``: no table: lossless FFV1, all of the gain.

Where no margin qualifies, re-encoding loses more than the model gains at
that level: the entry says ``copy`` and the pipeline passes the video
through (a remux, net 0 dB, same size) unless the user forces a CRF.

Without a calibrated table (an older weights file) :data:`DEFAULT_TABLE` is
used: vqe-v1's measured table, expected gain reported unknown (see its comment).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from enhancer.options import QUALITIES

__all__ = [
    "DEFAULT_TABLE",
    "QUALITIES",
    "OutputRate",
    "RateChoice",
    "calibrate",
    "choose_rate",
    "encode_planes",
    "psnr_y",
]

INPUT_CRFS = (18, 22, 27, 32, 37, 42)
MARGINS = (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
KEEP = 0.5
WORST_DB = -0.05
MAX_SIZE = 3.0
COMPACT_MIN_DB = 0.02
# Without any hint of the input's level: x264's default CRF.
UNKNOWN_LEVEL = 23.0
CRF_LIMITS = (0.0, 51.0)
X265_CRF_OFFSET = 5.0  # as bitstream.writer: x265's scale sits ~5 above x264's


@dataclass
class RateEntry:
    level: float  # input CRF (x264 scale)
    margin: float  # output CRF = level - margin (the best net gain when ``copy``)
    copy: bool  # re-encoding loses the gain here: pass the video through
    net_gain: float  # mean net ΔPSNR-Y of the output over the input, dB (0 when copy)
    worst: float  # the worst source's
    size_ratio: float  # mean output size / input size (1 when copy)
    lossless_gain: float  # the enhanced frames before re-encoding (what archive keeps)


@dataclass
class RateChoice:
    """What the pipeline does with one video's output."""

    quality: str
    crf: float | None  # None: lossless (archive)
    preset: str
    copy: bool  # pass the whole video through (nothing worth re-encoding)
    expected_gain: float | None  # dB, from the table (None: unknown)
    expected_size: float | None  # output/input, from the table
    level: float | None  # the input's level the choice was made for
    source: str  # "calibrated" | "default" | "explicit" | "lossless"


@dataclass
class OutputRate:
    tables: dict[str, list[RateEntry]]
    preset: str = "medium"
    qp_offset: float = 2.0  # mean frame QP minus CRF of the calibration encodes
    source: str = "calibrated"
    measured: dict[str, Any] = field(default_factory=dict)  # the raw grid, for the record

    def to_dict(self) -> dict:
        return {
            "tables": {q: [asdict(e) for e in t] for q, t in self.tables.items()},
            "preset": self.preset,
            "qp_offset": self.qp_offset,
            "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibrated") -> OutputRate:
        tables = {q: [RateEntry(**e) for e in t] for q, t in d["tables"].items()}
        return cls(
            tables,
            d.get("preset", "medium"),
            float(d.get("qp_offset", 2.0)),
            source,
            d.get("measured", {}),
        )

    @classmethod
    def from_meta(cls, meta: dict | None) -> OutputRate:
        """The weights' calibrated table, else :data:`DEFAULT_TABLE`."""
        if meta and isinstance(meta.get("output_rate"), dict):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return cls.from_dict(meta["output_rate"])
        return cls.from_dict(DEFAULT_TABLE, source="default")

    def level_from_qp(self, mean_qp: float | None) -> float | None:
        return None if mean_qp is None else mean_qp - self.qp_offset

    def entry(self, level: float | None, quality: str) -> RateEntry:
        table = sorted(self.tables[quality], key=lambda e: e.level)
        level = UNKNOWN_LEVEL if level is None else level
        return min(table, key=lambda e: abs(e.level - level))

    def choose(
        self, level: float | None, quality: str = "balanced", codec: str = "libx264"
    ) -> RateChoice:
        """The output CRF for an input at ``level`` (x264 CRF scale), nearest calibrated level."""
        if quality == "archive":
            gain = None
            if "balanced" in self.tables and self.source != "default":
                gain = self.entry(level, "balanced").lossless_gain
            return RateChoice(quality, None, self.preset, False, gain, None, level, "lossless")
        e = self.entry(level, quality)
        base = UNKNOWN_LEVEL if level is None else level
        crf = min(max(base - e.margin, CRF_LIMITS[0]), CRF_LIMITS[1])
        if codec == "libx265":
            crf = min(crf + X265_CRF_OFFSET, CRF_LIMITS[1])
        known = self.source != "default"  # the default table measured nothing of these weights
        return RateChoice(
            quality,
            round(crf, 1),
            self.preset,
            e.copy,
            e.net_gain if known else None,
            e.size_ratio if known else None,
            level,
            self.source,
        )


def choose_rate(
    meta: dict | None, level: float | None, quality: str, codec: str, crf: float | None
) -> RateChoice:
    """The pipeline's entry point: an explicit ``crf`` wins over the table."""
    rate = OutputRate.from_meta(meta)
    choice = rate.choose(level, quality, codec)
    if crf is not None and quality != "archive":
        choice.crf, choice.copy, choice.source = float(crf), False, "explicit"
        choice.expected_gain = choice.expected_size = None
    return choice


# ------------------------------------------------------------------ measuring


def psnr_y(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse <= 1e-10 else 10 * np.log10(peak * peak / mse)


def encode_planes(
    planes: list[tuple],
    path: str | Path,
    crf: float,
    preset: str = "medium",
    codec: str = "libx264",
    rate: int = 25,
) -> int:
    """Encode yuv420p planes to ``path`` (MP4); returns the file's size in bytes."""
    import av

    from bitstream.writer import frame_from_planes

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width = planes[0][0].shape
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": f"{crf:g}", "preset": preset}
        if codec == "libx265":
            stream.options["x265-params"] = "log-level=error"
        for i, p in enumerate(planes):
            frame = frame_from_planes(tuple(p), "yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path).stat().st_size


def decode_luma(path: str | Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        out = []
        for f in c.decode(c.streams.video[0]):  # yuv420p: the first H rows are Y, as coded
            out.append(f.reformat(format="yuv420p").to_ndarray()[: f.height].copy())
        return out


def validation_sequences(footage: Path, frames: int, size: tuple[int, int], seed: int):
    """(name, clean yuv420p planes) of every held-out source (never trained on)."""
    from enhancer.training.sources import clean_sequence, footage_sources, split_sources

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
            base = float(np.mean([psnr_y(d[0], c[0]) for d, c in zip(decoded, clean, strict=True)]))
            lossless = float(
                np.mean([psnr_y(e[0], c[0]) for e, c in zip(enhanced, clean, strict=True)])
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
                p = float(np.mean([psnr_y(y, c[0]) for y, c in zip(luma, clean, strict=True)]))
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

    import enhancer.engine as engine_module

    engine = engine_module.Engine(weights=weights, device=device)
    with tempfile.TemporaryDirectory(prefix="vqe-rate-") as work:
        records = measure(engine, footage, Path(work), frames=frames, size=size, log=log)
    rate = build_tables(records)
    if save:
        # Re-save through the module the engine loads weights with (checkpoint / model_file).
        files = importlib.import_module(engine_module.load_model.__module__)
        path = Path(weights) if weights else Path(files.DEFAULT_WEIGHTS)
        model, estimator, policy, meta = files.load_model(path)
        meta = dict(meta or {})
        meta["output_rate"] = rate.to_dict()
        files.save_model(path, model, estimator, policy, meta)
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
        prog="python -m enhancer.output_rate",
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


# For a weights file without its own table: the table measured on vqe-v1 (this command,
# --dry-run, 7 held-out sources, 320x256, 16 frames, x264 medium, 11 minutes on 2 busy
# cores; bench/results/output_rate-vqe-v1.json). v1's gain (0.0-0.3 dB on the enhanced
# frames) does not survive a re-encode below CRF 42 at any margin up to 18 within 3x the
# size, so those levels say copy: the video is passed through, which is never worse than
# the input. A flat margin is not safe: input - 14 measured -0.78 dB at 7.9x (CRF 22).
# Expected gains are reported as unknown for other weights (they measured nothing of them).
_V1_ROWS = [  # quality, input CRF, margin, copy, net dB, worst dB, size, lossless dB
    ("balanced", 18, 18, True, 0.0, 0.0, 1.0, -0.0034),
    ("balanced", 22, 18, True, 0.0, 0.0, 1.0, 0.0332),
    ("balanced", 27, 18, True, 0.0, 0.0, 1.0, 0.0964),
    ("balanced", 32, 18, True, 0.0, 0.0, 1.0, 0.1365),
    ("balanced", 37, 18, True, 0.0, 0.0, 1.0, 0.2333),
    ("balanced", 42, 14, False, 0.1196, -0.0484, 1.639, 0.2943),
    ("compact", 18, 18, True, 0.0, 0.0, 1.0, -0.0034),
    ("compact", 22, 18, True, 0.0, 0.0, 1.0, 0.0332),
    ("compact", 27, 18, True, 0.0, 0.0, 1.0, 0.0964),
    ("compact", 32, 18, True, 0.0, 0.0, 1.0, 0.1365),
    ("compact", 37, 18, True, 0.0, 0.0, 1.0, 0.2333),
    ("compact", 42, 14, False, 0.1196, -0.0484, 1.639, 0.2943),
]
DEFAULT_TABLE: dict = {
    "preset": "medium",
    "qp_offset": 2.55,
    "tables": {
        q: [
            dict(
                zip(
                    ("level", "margin", "copy", "net_gain", "worst", "size_ratio", "lossless_gain"),
                    row[1:],
                    strict=True,
                )
            )
            for row in _V1_ROWS
            if row[0] == q
        ]
        for q in ("balanced", "compact")
    },
}

if __name__ == "__main__":
    sys.exit(main())
