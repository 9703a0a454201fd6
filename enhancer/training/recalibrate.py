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
network: enhancer.pixel_qp; fit it first with enhancer.training.fit_pixel_qp),
measured at full depth told the estimate plus each of BLIND_OFFSETS too, so
that each bin also picks the offset of the CRF the network is told.
``--paths`` measures only some of the paths; the tables of paths not
measured are kept as the model file has them. The sequences are other crops
than bench/quality.py's (another seed).
About 11 minutes for the codec-aware path on 2 cores in bf16, 22 for the blind one.

    python -m enhancer.training.recalibrate --footage ../shared/footage \
        --records runs/recalibrate.json [--write enhancer/weights/vqe-v5.pt]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bitstream.reader import open_video
from enhancer.checkpoint import load_model
from enhancer.engine import Engine
from enhancer.grain import grain_level
from enhancer.metrics import psnr
from enhancer.policy import CLEAN, DEFAULT_EDGES, KINDS, ExitPolicy, ExitTable, calibrate
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
# Frames whose decoded luma reads at most this grain level (enhancer.grain, 8-bit levels)
# get the "_clean" tables, fitted on such frames only: just above the grainiest held-out
# photo (0.51 at x264 CRF 15), so that a frame grainier than any the calibration saw gain
# keeps the table guarded for grain (vtest, a real camera clip, reads 0.83 and more below
# QP 24, where it loses 0.03-0.07 dB to any correction).
GRAIN_LIMIT = 0.55
# The kinds that get a "_clean" table. Not the blind path on HEVC: its estimated CRF is the
# least reliable level (x265 CRF 22 reads 32-36 on some sources), and a clean table fitted on
# its fewer frames lost 0.055 dB on one source (Kite, x265 CRF 22) on bench/quality's crops.
CLEAN_KINDS = ("h264", "h264_coarse", "h264_fine", "hevc", "blind")
# H.264 streams of at least this CRF get the "h264_coarse" tables, fitted on such streams
# alone and outside the early-exit budget (policy.py): on the records, with the budget's
# "h264" table CRF 25 / 27 gain +0.312 / +0.382, with a table of their own +0.369 / +0.408.
COARSE_CRF = 25.0
# The tables of the blind path (with their "_clean" twins).
BLIND_KINDS = tuple(k for k in KINDS if k.startswith("blind"))
# Offsets to the estimated CRF the blind path's network is told, measured for every frame
# at full depth (policy.py): on bench/quality's crops, at 3 stages, x264 CRF 22 / 27 / 37
# gained +0.213 / +0.286 / +0.582 told the estimate, +0.258 / +0.360 / +0.496 told it less
# 4; CRF 37 / 51 +0.595 / +0.252 told it plus 2 (+0.582 / +0.221 at the estimate).
BLIND_OFFSETS = (-6.0, -3.0, 0.0, 3.0)
# Of the offsets whose gain in a bin comes within this much of the best one's, the one
# nearest 0 is picked: on a 0.005 dB lead at estimated CRF 28-36, offset -3 at strength 1.25
# lost 0.03 dB at x264 CRF 37 on bench/quality's crops against the estimate at strength 1,
# and -6 where -3 came within 0.02 dB lost 0.06-0.10 dB on a source whose CRF the estimate
# reads 6 too low.
OFFSET_MARGIN = 0.02
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
    told = {o: _telling(loaded.policy, o, depth) for o in BLIND_OFFSETS}
    runs = [(path, k, 0.0) for path in paths for k in range(1, depth + 1)]
    runs += [("blind", depth, o) for o in BLIND_OFFSETS if o and "blind" in paths]
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
            grains = [round(grain_level(f.planes[0]), 4) for f in dec]
            rows = {
                path: [
                    {"source": name, "codec": codec, "crf": crf, "index": i, "path": path,
                     "grain": grains[i], "ms": [], "deltas": [[] for _ in SCALES]}
                    | ({"told_deltas": {str(o): [] for o in BLIND_OFFSETS if o}}
                       if path == "blind" else {})
                    for i in range(len(dec))
                ]
                for path in here
            }  # fmt: skip
            for path, k, o in runs:
                if path not in here:
                    continue
                engine.policy = told[o] if path == "blind" else loaded.policy
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
                        delta = round(psnr(y, c[0]) - b, 4)
                        if o:  # at full depth only
                            row["told_deltas"][str(o)].append(delta)
                        else:
                            row["deltas"][a].append(delta)
                    if not o:
                        row["ms"].append(round(1000 * rep.model_seconds, 2))
                        row["qp"] = rep.qp  # on the blind path: the CRF estimated from the pixels
            engine.policy = loaded.policy
            records += [r for path_rows in rows.values() for r in path_rows]
        log(f"{codec} CRF {crf}: {len(records)} frames ({time.time() - t0:.0f}s)")
    return records


def _telling(policy: ExitPolicy | None, offset: float, stages: int) -> ExitPolicy:
    """``policy`` with blind tables that tell the network the estimate plus ``offset`` in
    every bin (what ``collect`` measures each offset with)."""
    policy = deepcopy(policy) if policy else ExitPolicy(max_stages=stages)
    for kind in BLIND_KINDS:
        table = policy.tables.get(kind) or ExitTable(stages=[stages] * (len(DEFAULT_EDGES) - 1))
        policy.tables[kind] = replace(table, offsets=[offset] * (len(table.edges) - 1))
    return policy


def _fit(rows: list[dict], level, max_stages: int, offsets: bool = False, **kw):
    """``calibrate`` on ``rows``; ``offsets``: with every told-CRF offset the rows measured."""
    told = _offsets(rows) if offsets else [0.0]
    return calibrate(
        [(level(r), [_deltas(r, o) for o in told]) for r in rows],
        max_stages,
        sources=[f"{r['source']} {r['codec']} {r['crf']}" for r in rows],
        costs=_mean_costs(rows, max_stages),
        strengths=list(SCALES),
        offsets=told if len(told) > 1 else None,
        **kw,
    )


def _offsets(rows: list[dict]) -> list[float]:
    """The told-CRF offsets every one of ``rows`` was measured at (0 alone for records
    made before offsets were)."""
    have = set(BLIND_OFFSETS)
    for r in rows:
        have &= {0.0} | {float(o) for o in r.get("told_deltas", {})}
    return sorted(have)


def _deltas(r: dict, offset: float) -> list[list[float]]:
    """A record's ``deltas`` (per strength, per stage count) told ``offset``: measured at
    full depth only, so fewer stages cannot be picked with an offset."""
    if not offset:
        return r["deltas"]
    short = [-np.inf] * (len(r["deltas"][0]) - 1)
    return [[*short, d] for d in r["told_deltas"][str(offset)]]


def _aware(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("path", "aware") == "aware"]


def _clean(rows: list[dict]) -> list[dict]:
    """The rows of frames that show no more grain than GRAIN_LIMIT (for the "_clean" tables)."""
    return [r for r in rows if r.get("grain", np.inf) <= GRAIN_LIMIT]


def _h264_rows(records: list[dict], kind: str = "h264") -> list[dict]:
    """The x264 records ``kind``'s table is fitted on: every stream's for "h264", those of
    CRF COARSE_CRF and up for "h264_coarse", of a lower CRF for "h264_fine"."""
    rows = [r for r in _aware(records) if r["codec"] == "libx264"]
    base = kind.removesuffix(CLEAN)
    if base == "h264_coarse":
        rows = [r for r in rows if r["crf"] >= COARSE_CRF]
    elif base == "h264_fine":
        rows = [r for r in rows if r["crf"] < COARSE_CRF]
    return _clean(rows) if kind.endswith(CLEAN) else rows


def _fit_h264(
    records: list[dict], max_stages: int, caps: list[int] | None = None, kind="h264", **kw
):
    return _fit(_h264_rows(records, kind), _frame_qp, max_stages, caps=caps, **kw)


def _set_fitted(policy, kind: str, rows: list[dict], fit) -> None:
    """Fit ``kind``'s table (``fit(rows)``) and, for CLEAN_KINDS where frames that clean are
    among ``rows``, its "_clean" table on those."""
    if rows:
        policy.set_table(kind, fit(rows))
    if kind in CLEAN_KINDS and (clean := _clean(rows)):
        policy.set_table(kind + CLEAN, fit(clean))
        policy.grain_limit = GRAIN_LIMIT


def policy_from(records: list[dict], max_stages: int, caps: list[int] | None = None, **kw):
    """The H.264 policy by frame QP (``caps``: its most stages per bin) and the HEVC one by
    CRF, from engine records, each with its "_clean" table where the records say grain."""
    h264 = _h264_rows(records)
    fit = lambda rows: _fit(rows, _frame_qp, max_stages, caps=caps, **kw)  # noqa: E731
    policy = fit(h264)
    _set_fitted(policy, "h264", h264, fit)
    hevc = [r for r in _aware(records) if r["codec"] == "libx265"]
    _set_fitted(policy, "hevc", hevc, lambda rows: _fit(rows, _crf, max_stages, **kw))
    blind_policy(records, max_stages, policy, **kw)
    return policy


def _frame_qp(r: dict) -> float:
    return float(r["qp"])


def _crf(r: dict) -> float:
    return float(r["crf"])


def _estimated(r: dict) -> float:
    return float(r["qp"])  # on the blind path: the CRF estimated from the pixels


def blind_policy(records: list[dict], max_stages: int, policy, **kw) -> None:
    """Fit the blind path's tables into ``policy``, by the estimated CRF (those measured)."""
    for kind, codec in (("blind", "libx264"), ("blind_hevc", "libx265")):
        rows = [r for r in records if r.get("path") == "blind" and r["codec"] == codec]
        _set_fitted(
            policy,
            kind,
            rows,
            lambda rows: _fit(
                rows,
                _estimated,
                max_stages,
                offsets=True,
                **kw,
                guard=ESTIMATE_GUARD,
                offset_margin=OFFSET_MARGIN,
            ),
        )


def exit_ratio(records: list[dict], policy, costs: list[float]) -> float:
    """Network time of x264 CRF 22 over CRF 37 under ``policy`` (``costs``: of 1..S stages)."""

    def mean_cost(crf: int) -> float:
        c = [
            costs[k - 1] if (k := _stages(policy, r)) else 0.0
            for r in _aware(records)
            if r["codec"] == "libx264" and r["crf"] == crf
        ]
        return float(np.mean(c)) if c else 0.0

    full = mean_cost(37)
    return mean_cost(22) / full if full else 0.0


def mean_gain(records: list[dict], policy) -> float:
    """Mean ΔPSNR-Y of the x264 records under ``policy`` (its stages and strengths)."""
    total, rows = 0.0, _h264_rows(records)
    for r in rows:
        if k := _stages(policy, r):
            total += r["deltas"][SCALES.index(_strength(policy, r))][k - 1]
    return total / max(1, len(rows))


def _stages(policy, r: dict) -> int:
    """The stages an x264 record's frame runs under ``policy``."""
    return policy.stages_for(r["qp"], _kind(policy, r), r.get("grain"))


def _strength(policy, r: dict) -> float:
    return policy.strength_for(r["qp"], _kind(policy, r), r.get("grain"))


def _kind(policy, r: dict) -> str:
    """The kind an x264 record's stream uses (its CRF is in the stream's options SEI)."""
    return policy.h264_kind(float(r["crf"]))


def budgeted_policy(
    records: list[dict],
    max_stages: int,
    log=None,
    price: float = PRICE,
    budget: float = EXIT_BUDGET,
):
    """``policy_from`` at ``price``, then per bin the stage counts (at most what it chose)
    of most mean gain whose early-exit ratio fits ``budget``: for the H.264 table as if
    every frame used it (streams that say no CRF), then the "h264_coarse" tables outside
    the budget and the "h264_fine" ones within it (``_fit_budgeted``)."""
    costs = _mean_costs(_h264_rows(records), max_stages)
    policy = policy_from(records, max_stages, tolerance=TOLERANCE, price=price)
    _fit_budgeted(records, max_stages, policy, "h264", costs, price, budget, log)
    # Then streams that say a CRF of COARSE_CRF or more, on their own (the budget binds at
    # CRF 22, below it), and those of a lower CRF, on their own frames within the budget.
    coarse = _h264_rows(records, "h264_coarse")
    if not coarse:
        return policy
    fit = lambda rows: _fit(rows, _frame_qp, max_stages, tolerance=TOLERANCE, price=price)  # noqa: E731
    _set_fitted(policy, "h264_coarse", coarse, fit)
    policy.coarse_crf = COARSE_CRF
    _log_kind(log, records, policy, "h264_coarse", costs)
    if fine := _h264_rows(records, "h264_fine"):
        _set_fitted(policy, "h264_fine", fine, fit)
        _fit_budgeted(records, max_stages, policy, "h264_fine", costs, price, budget, log)
        for kind in ("h264_fine", "h264_fine" + CLEAN):
            if policy.has(kind):
                _borrow_unmeasured(policy, kind, kind.replace("h264_fine", "h264"))
    return policy


def _borrow_unmeasured(policy, kind: str, lender: str) -> None:
    """Bins of ``kind`` that no record of its streams fell in take ``lender``'s stages and
    strength there (measured on other streams' frames at those QPs), not the nearest
    measured bin's: a finely coded stream's rare frame at QP 40 is compressed as hard as a
    coarse stream's."""
    table, other = policy.table(kind), policy.table(lender)
    stages, strengths = list(table.stages), list(table.strengths)
    for b, gains in enumerate(table.gains):
        if not gains:
            stages[b] = other.stages[b]
            if strengths:
                strengths[b] = other.strengths[b] if other.strengths else 1.0
    policy.set_table(kind, replace(table, stages=stages, strengths=strengths))


def _fit_budgeted(records, max_stages, policy, kind, costs, price, budget, log) -> None:
    """Fit ``kind``'s table to the budget as if every frame of its streams used it, then
    its "_clean" table, if any, with each frame in its own table."""
    clean = policy.tables.pop(kind + CLEAN, None)
    for k in (kind,) + ((kind + CLEAN,) if clean is not None else ()):
        if k != kind:
            policy.set_table(k, clean)
        _fit_budget(records, max_stages, policy, k, costs, price, budget)
        _log_kind(log, records, policy, k, costs)


def _log_kind(log, records, policy, kind: str, costs) -> None:
    if log is not None:
        ratio, gain = exit_ratio(records, policy, costs), mean_gain(records, policy)
        log(
            f"{kind}: stages {policy.table(kind).stages}, early-exit ratio {ratio:.2f}, "
            f"mean gain {gain:.3f}"
        )


def _fit_budget(records, max_stages, policy, kind, costs, price, budget) -> None:
    """Set ``policy``'s ``kind`` table to the combination, over its bins, of the table fitted
    with at most 0..S stages there (and no more than the uncapped fit) of most mean gain
    (``mean_gain``) whose ``exit_ratio`` fits ``budget``; every combination is tried (the
    gain and the ratio's two terms are sums over bins). None fits: the lowest ratio."""
    S = max_stages
    nbins = len(policy.table(kind).stages)
    fits = [
        _fit_h264(records, S, [c] * nbins, kind, tolerance=TOLERANCE, price=price).table("h264")
        for c in range(S + 1)
    ]
    rows = _h264_rows(records)
    # Per record: uses this table?, its bin, and (gain, cost) under each cap.
    gain = np.zeros((nbins, S + 1))
    cost = {crf: np.zeros((nbins, S + 1)) for crf in (22, 37)}
    fixed = {"gain": 0.0, 22: 0.0, 37: 0.0}
    count = {crf: sum(r["crf"] == crf for r in rows) for crf in (22, 37)}
    for r in rows:
        qp, grain = r["qp"], r.get("grain")
        if policy.kind_for(_kind(policy, r), grain) != kind:
            k, a = _stages(policy, r), SCALES.index(_strength(policy, r))
            fixed["gain"] += r["deltas"][a][k - 1] if k else 0.0
            if r["crf"] in cost:
                fixed[r["crf"]] += costs[k - 1] if k else 0.0
            continue
        b = fits[S].bin(qp)
        for c, fit in enumerate(fits):
            k = fit.stages[b]
            if k:
                gain[b, c] += r["deltas"][SCALES.index(fit.strengths[b])][k - 1]
                if r["crf"] in cost:
                    cost[r["crf"]][b, c] += costs[k - 1]
    seen = [b for b in range(nbins) if gain[b].any() or cost[22][b].any() or cost[37][b].any()]
    if not seen:
        return
    combos = np.array(list(itertools.product(range(S + 1), repeat=len(seen))), dtype=np.int64)
    pick = lambda m: m[seen][np.arange(len(seen)), combos].sum(1)  # noqa: E731
    total = (pick(gain) + fixed["gain"]) / max(1, len(rows))
    c22 = (pick(cost[22]) + fixed[22]) / max(1, count[22])
    c37 = (pick(cost[37]) + fixed[37]) / max(1, count[37])
    ratio = np.divide(c22, c37, out=np.zeros_like(c22), where=c37 > 0)
    ok = ratio <= budget
    best = int(np.lexsort((ratio, -total, ~ok))[0]) if ok.any() else int(np.argmin(ratio))
    chosen = dict(zip(seen, combos[best].tolist(), strict=True))
    cap = [chosen[min(seen, key=lambda s: abs(s - b))] for b in range(nbins)]
    table = fits[S]
    picked = [fits[c] for c in cap]
    policy.set_table(
        kind,
        replace(
            table,
            stages=[f.stages[b] for b, f in enumerate(picked)],
            strengths=[f.strengths[b] for b, f in enumerate(picked)] if table.strengths else [],
        ),
    )


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
            for kind in BLIND_KINDS:  # a path not measured keeps its tables
                if kind in old.tables:
                    policy.set_table(kind, old.tables[kind])
    else:  # only blind paths measured: the codec-aware and HEVC tables stay
        policy = old or ExitPolicy(max_stages=stages)
        blind_policy(records, stages, policy, tolerance=TOLERANCE, price=args.price)
    print(f"H.264 by QP, edges {policy.table('h264').edges}")
    by = {
        "h264": "QP",
        "h264_coarse": "QP",
        "h264_fine": "QP",
        "hevc": "CRF",
        "blind": "estimated CRF",
        "blind_hevc": "estimated CRF",
    }
    if policy.grain_limit is not None:
        print(f"frames of grain level <= {policy.grain_limit} use the _clean tables")
    for kind in KINDS:
        if kind in by or policy.has(kind):
            table = policy.table(kind)
            told = f", told-CRF offsets {table.offsets}" if table.offsets else ""
            print(
                f"{kind} by {by[kind.removesuffix(CLEAN)]}: stages {table.stages}, "
                f"strengths {table.strengths}{told}"
            )
    if args.write:
        meta = loaded.meta | {"policy_source": "enhancer.training.recalibrate (engine records)"}
        replace(loaded, policy=policy, meta=meta).save(args.write)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
