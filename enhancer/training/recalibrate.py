"""Calibrate the exit policy through the engine itself, on the validation sources.

``export`` calibrates from the training validation (the network on cached
inputs). This measures what ``vqe enhance`` does instead: the engine with a
fixed stage count (1..S, transfer and alignment as shipped) on sequences of
the held-out sources encoded at many CRFs, and records per frame its source,
QP, network time and ΔPSNR-Y for every count at five strengths of the
correction. From those records ``policy.calibrate`` picks, per QP bin, the
count and strength under which no source loses more than 0.03 dB at any
CRF, each stage paying for its time, and with stages taken away where they
cost CRF 22 most until early exit fits its budget; the result is written into
the model file. The blind path (``--side-info blind``: pixels only, no CRF) is measured the
same way and gets tables of its own ("blind" for x264, "blind_hevc" for x265,
binned by the CRF estimated from the pixels that the engine tells the
network: enhancer.pixel_qp; fit it first with enhancer.training.fit_pixel_qp).
``--paths`` measures only some of the paths; the tables of paths not
measured are kept as the model file has them. The sequences are other crops
than bench/quality.py's (another seed).
About 11 minutes per path on 2 cores in bf16.

    python -m enhancer.training.recalibrate --footage ../shared/footage \
        --records runs/recalibrate.json [--write enhancer/weights/vqe-v5.pt]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bitstream.reader import open_video
from enhancer.checkpoint import load_model
from enhancer.engine import Engine
from enhancer.metrics import psnr
from enhancer.policy import ExitPolicy, calibrate
from enhancer.training.data import EncodeSettings, encode_planes
from enhancer.training.sources import clean_sequence, footage_sources, split_sources

X264_CRFS = (15, 18, 22, 25, 27, 30, 32, 35, 37, 42, 47, 51)
X265_CRFS = (22, 27, 32, 37, 42)
# Strengths the network's correction is measured at (output = input + s * correction).
SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
SEED = 4321  # bench/quality.py draws its crops with 1234
# A stage must earn this many dB per unit of one stage's network time (policy.calibrate's
# price). Then, while x264 CRF 22 costs more than EXIT_BUDGET times the network time of
# CRF 37 (the enhancer issue's early-exit target is 0.6x; the budget keeps a margin for
# other crops), the bin whose one stage less loses the least gain per unit of that ratio
# runs one stage less.
PRICE = 0.03
EXIT_BUDGET = 0.5
TOLERANCE = 0.0
# The blind tables by the pixel estimate are guarded at 0.015 dB, not policy.calibrate's
# 0.03: the estimate moves with content by more than a bin's width, so a source can land in
# a bin on other footage where it did not in calibration (at 0.03, FallenLeaf lost 0.08 dB at
# x264 CRF 15 on bench/quality.py's crops: its CRF read 22; at 0.015 no source is below 0).
ESTIMATE_GUARD = 0.015
# Per path measured: the engine's side_info, codecs.
PATHS = {
    "aware": ("auto", ("libx264", "libx265")),
    "blind": ("blind", ("libx264", "libx265")),
}


def collect(
    footage: Path, weights, frames: int, size: tuple[int, int], log, paths=tuple(PATHS)
) -> list[dict]:
    """Per frame and path (of PATHS): source, codec, CRF, QP the engine used (on the
    blind path: the CRF it estimated from the pixels), network ms per stage count and
    ``deltas[a][k - 1]``: ΔPSNR-Y with k stages, the correction scaled by ``SCALES[a]``."""
    sources = split_sources(footage_sources(footage), validation=True)
    photos = [p for _, p in sources if p.parent.name == "photos"]
    seqs = {
        name: clean_sequence(path, photos, {}, np.random.default_rng([SEED, i]), frames, size)
        for i, (name, path) in enumerate(sources)
    }
    loaded = load_model(weights)
    depth = loaded.policy.max_stages if loaded.policy else 3
    if "blind" in paths and not loaded.pixel_qp:
        raise ValueError("the model file has no pixel CRF estimate: run fit_pixel_qp first")
    engine = Engine(weights, device="cpu")
    runs = [(path, k) for path in paths for k in range(1, depth + 1)]
    configs = [("libx264", c) for c in X264_CRFS] + [("libx265", c) for c in X265_CRFS]
    records, t0 = [], time.time()
    for codec, crf in configs:
        here = [path for path in paths if codec in PATHS[path][1]]
        if not here:
            continue
        for name, clean in seqs.items():
            data = encode_planes(clean, EncodeSettings(codec=codec, crf=crf))
            with open_video(io.BytesIO(data)) as r:
                info, dec = r.info, list(r)
            base = [psnr(f.planes[0], c[0]) for f, c in zip(dec, clean, strict=False)]
            rows = {
                path: [
                    {"source": name, "codec": codec, "crf": crf, "index": i, "path": path,
                     "ms": [], "deltas": [[] for _ in SCALES]}
                    for i in range(len(dec))
                ]
                for path in here
            }  # fmt: skip
            for path, k in runs:
                if path not in here:
                    continue
                for (out, rep), row, d, c, b in zip(
                    engine.process(iter(dec), info, stages=k, side_info=PATHS[path][0]),
                    rows[path],
                    dec,
                    clean,
                    base,
                    strict=False,
                ):
                    x = d.planes[0].astype(np.float64)
                    corr = out.planes[0].astype(np.float64) - x
                    for a, s in enumerate(SCALES):
                        y = np.clip(np.round(x + s * corr), 0, 255)
                        row["deltas"][a].append(round(psnr(y, c[0]) - b, 4))
                    row["ms"].append(round(1000 * rep.model_seconds, 2))
                    row["qp"] = rep.qp  # on the blind path: the CRF estimated from the pixels
            records += [r for path_rows in rows.values() for r in path_rows]
        log(f"{codec} CRF {crf}: {len(records)} frames ({time.time() - t0:.0f}s)")
    return records


def _fit(rows: list[dict], level, max_stages: int, **kw):
    return calibrate(
        [(level(r), r["deltas"]) for r in rows],
        max_stages,
        sources=[f"{r['source']} {r['codec']} {r['crf']}" for r in rows],
        costs=_mean_costs(rows, max_stages),
        strengths=list(SCALES),
        **kw,
    )


def _aware(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("path", "aware") == "aware"]


def _fit_h264(records: list[dict], max_stages: int, caps: list[int] | None = None, **kw):
    rows = [r for r in _aware(records) if r["codec"] == "libx264"]
    return _fit(rows, lambda r: r["qp"], max_stages, caps=caps, **kw)


def policy_from(records: list[dict], max_stages: int, caps: list[int] | None = None, **kw):
    """The H.264 policy by frame QP (``caps``: its most stages per bin) and the HEVC one by
    CRF, from engine records."""
    policy = _fit_h264(records, max_stages, caps, **kw)
    hevc = [r for r in _aware(records) if r["codec"] == "libx265"]
    if hevc:
        policy.set_table("hevc", _fit(hevc, lambda r: float(r["crf"]), max_stages, **kw))
    blind_policy(records, max_stages, policy, **kw)
    return policy


def blind_policy(records: list[dict], max_stages: int, policy, **kw) -> None:
    """Fit the blind path's tables into ``policy``, by the estimated CRF (those measured)."""
    for kind, codec in (("blind", "libx264"), ("blind_hevc", "libx265")):
        rows = [r for r in records if r.get("path") == "blind" and r["codec"] == codec]
        if rows:
            fitted = _fit(rows, lambda r: float(r["qp"]), max_stages, **kw, guard=ESTIMATE_GUARD)
            policy.set_table(kind, fitted)


def exit_ratio(records: list[dict], policy, costs: list[float]) -> float:
    """Network time of x264 CRF 22 over CRF 37 under ``policy`` (``costs``: of 1..S stages)."""

    def mean_cost(crf: int) -> float:
        c = [
            costs[k - 1] if (k := policy.stages_for(r["qp"])) else 0.0
            for r in _aware(records)
            if r["codec"] == "libx264" and r["crf"] == crf
        ]
        return float(np.mean(c)) if c else 0.0

    full = mean_cost(37)
    return mean_cost(22) / full if full else 0.0


def mean_gain(records: list[dict], policy) -> float:
    """Mean ΔPSNR-Y of the x264 records under ``policy`` (its stages and strengths)."""
    total, rows = 0.0, [r for r in _aware(records) if r["codec"] == "libx264"]
    for r in rows:
        if k := policy.stages_for(r["qp"]):
            total += r["deltas"][SCALES.index(policy.strength_for(r["qp"]))][k - 1]
    return total / max(1, len(rows))


def budgeted_policy(
    records: list[dict],
    max_stages: int,
    log=None,
    price: float = PRICE,
    budget: float = EXIT_BUDGET,
):
    """``policy_from`` at ``price``, then stages taken away bin by bin (least gain lost per
    unit of early-exit ratio saved first) until early exit fits ``budget``."""
    costs = _mean_costs([r for r in _aware(records) if r["codec"] == "libx264"], max_stages)
    policy = policy_from(records, max_stages, tolerance=TOLERANCE, price=price)
    caps = list(policy.table("h264").stages)
    ratio, gain = exit_ratio(records, policy, costs), mean_gain(records, policy)
    if log is not None:
        log(f"price {price}: early-exit ratio {ratio:.2f}, mean gain {gain:.3f}")
    while ratio > budget:
        best = None
        for b, k in enumerate(caps):
            if k == 0:
                continue
            fewer = caps[:b] + [k - 1] + caps[b + 1 :]
            # Only the H.264 table changes; the ratio and the gain read nothing else.
            trial = _fit_h264(records, max_stages, fewer, tolerance=TOLERANCE, price=price)
            saved = ratio - exit_ratio(records, trial, costs)
            if saved > 1e-9:
                lost = (gain - mean_gain(records, trial)) / saved
                if best is None or lost < best[0]:
                    best = (lost, b, trial)
        if best is None:
            break
        _, b, h264 = best
        policy.set_table("h264", h264)
        caps = list(policy.table("h264").stages)
        ratio, gain = exit_ratio(records, policy, costs), mean_gain(records, policy)
        if log is not None:
            log(f"bin {b}: one stage less; early-exit ratio {ratio:.2f}, mean gain {gain:.3f}")
    return policy


def _mean_costs(records: list[dict], max_stages: int) -> list[float]:
    """Mean network ms per stage count, relative to one stage."""
    ms = np.array([r["ms"] for r in records], dtype=np.float64).reshape(-1, max_stages)
    m = ms.mean(0)
    return [round(float(x / m[0]), 3) for x in m]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument(
        "--records", type=Path, nargs="+", default=[Path("runs/recalibrate.json")],
        help="where to write the records (the first); with --reuse, all are read",
    )  # fmt: skip
    ap.add_argument("--reuse", action="store_true", help="calibrate from existing --records")
    ap.add_argument(
        "--price",
        type=float,
        default=PRICE,
        help="dB a stage must gain per unit of one stage's network time",
    )
    ap.add_argument(
        "--exit-budget",
        type=float,
        default=EXIT_BUDGET,
        help="x264 CRF 22's network time at most this share of CRF 37's, on the records",
    )
    ap.add_argument("--write", type=Path, default=None, help="model file to write the policy to")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help=f"paths to measure, of {','.join(PATHS)}"
    )
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if bad := [p for p in paths if p not in PATHS]:
        ap.error(f"unknown path {bad[0]!r}: choose from {', '.join(PATHS)}")
    torch.set_num_threads(2)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.reuse:
        records = [r for f in args.records for r in json.loads(f.read_text())]
    else:
        records = collect(args.footage, args.weights, args.frames, (384, 256), log, paths)
        args.records[0].parent.mkdir(parents=True, exist_ok=True)
        args.records[0].write_text(json.dumps(records))
    loaded = load_model(args.weights)
    stages, old = loaded.network.cfg.stages, loaded.policy
    if _aware(records):
        policy = budgeted_policy(records, stages, log, args.price, args.exit_budget)
        if old and not any(r.get("path") == "blind" for r in records):
            for kind in ("blind", "blind_hevc"):  # a path not measured keeps its tables
                if kind in old.tables:
                    policy.set_table(kind, old.tables[kind])
    else:  # only blind paths measured: the codec-aware and HEVC tables stay
        policy = old or ExitPolicy(max_stages=stages)
        blind_policy(records, stages, policy, tolerance=TOLERANCE, price=args.price)
    print(f"H.264 by QP, edges {policy.table('h264').edges}")
    for kind, by in (
        ("h264", "QP"),
        ("hevc", "CRF"),
        ("blind", "estimated CRF"),
        ("blind_hevc", "estimated CRF"),
    ):
        table = policy.table(kind)
        print(f"{kind} by {by}: stages {table.stages}, strengths {table.strengths}")
    if args.write:
        meta = loaded.meta | {"policy_source": "enhancer.training.recalibrate (engine records)"}
        replace(loaded, policy=policy, meta=meta).save(args.write)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
