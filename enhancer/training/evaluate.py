"""Validation metrics: ΔPSNR-Y of each exit over the compressed input, on held-out sequences.

Used during training (to catch a model that only learns identity or learns
to blur), by the early-exit calibration at export and for the ablations of
the model card. With ``enhanced`` the codec-aware path borrows from the
anchors as the current model enhanced them (training.anchors), as the
recurrent engine does; bench/quality.py measures the engine end to end.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from enhancer.batch import collate
from enhancer.features import autocast
from enhancer.metrics import psnr_batch
from enhancer.network import QPEstimator, VQENet
from enhancer.training.samples import frame_inputs


def luma(x6: torch.Tensor) -> torch.Tensor:
    """(B, 6, h, w) half-res stack -> (B, 1, 2h, 2w) luma."""
    return F.pixel_shuffle(x6[:, :4], 2)


def psnr_y(out6: torch.Tensor, ref6: torch.Tensor, bit_depth: int = 8) -> torch.Tensor:
    """Per-image PSNR-Y in dB on integer-rounded values (B,)."""
    maxv = (1 << bit_depth) - 1
    a = (luma(out6.float()).clamp(0, 1) * maxv).round()
    b = (luma(ref6.float()) * maxv).round()
    return psnr_batch(a, b, maxv).float()


@torch.no_grad()
def validate(
    model: VQENet,
    estimator: QPEstimator,
    samples: list[dict],
    *,
    max_frames: int = 16,
    blind: bool = True,
    bf16: bool = True,
    edit=None,
    enhanced: bool = False,
) -> dict:
    """ΔPSNR-Y per CRF for every stage count (and the blind path at full depth).

    ``edit(item, sample, t)`` may change each frame's inputs (ablations).
    ``enhanced``: the codec-aware path borrows from enhanced anchors (training.anchors
    attached them), as the recurrent engine does.
    Returns {"crf": {crf: {"input": psnr, "s1": Δ, ..., "blind": Δ, "est_qp": the blind
    estimator's mean frame QP}}, "records":
    [(frame_qp, [Δ per stage])] for calibration, "hevc_records": the same for x265
    samples, by CRF}.
    """
    model.eval()
    estimator.eval()
    device = next(model.parameters()).device  # where the model is, the batches go
    per_crf: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    records, hevc_records = [], []
    for sample in samples:
        n = min(max_frames, len(sample["dec"]))
        crf = float(sample["crf"])
        for is_blind in [False, True] if blind else [False]:
            pairs = [
                frame_inputs(sample, t, blind=is_blind, enhanced=enhanced and not is_blind)
                for t in range(n)
            ]
            items = [p[0] for p in pairs]
            if edit is not None:
                items = [edit(it, sample, t) for t, it in enumerate(items)]
            target = torch.stack([p[1] for p in pairs]).to(device)
            with autocast(device.type, enabled=bf16):
                batch = collate(items, model, estimator, device)
                outs = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond)
            base = psnr_y(batch.x, target)
            deltas = [(psnr_y(o, target) - base) for o in outs]
            if is_blind:
                per_crf[crf]["blind"] += deltas[-1].tolist()
                per_crf[crf]["est_qp"] += batch.frame_qp.tolist()  # the estimator's frame QP
                continue
            # x265 samples are binned by the stream's CRF for their own policy.
            hevc = str(sample["codec"]) == "libx265"
            for i in range(n):
                level = crf if hevc else float(batch.frame_qp[i])
                (hevc_records if hevc else records).append((level, [float(d[i]) for d in deltas]))
            per_crf[crf]["input"] += base.tolist()
            for s, d in enumerate(deltas, 1):
                per_crf[crf][f"s{s}"] += d.tolist()
    table = {
        crf: {k: float(np.mean(v)) for k, v in cols.items()}
        for crf, cols in sorted(per_crf.items())
    }
    return {"crf": table, "records": records, "hevc_records": hevc_records}


def format_table(result: dict, stages: int) -> str:
    cols = ["input"] + [f"s{s}" for s in range(1, stages + 1)]
    for extra in ("blind", "est_qp"):
        if any(extra in row for row in result["crf"].values()):
            cols.append(extra)
    lines = ["  CRF  " + " ".join(f"{c:>8}" for c in cols)]
    for crf, row in result["crf"].items():
        vals = [row.get(c, math.nan) for c in cols]
        pairs = zip(cols, vals, strict=True)
        cells = [f"{v:8.2f}" if c in ("input", "est_qp") else f"{v:+8.3f}" for c, v in pairs]
        lines.append(f"  {crf:4g} " + " ".join(cells))
    return "\n".join(lines)


def estimator_spread(result: dict) -> float | None:
    """How far apart (QP) the blind estimator puts the lowest and highest validation CRF;
    near 0 means it collapsed to a constant (it did once, unnoticed)."""
    est = [row["est_qp"] for row in result["crf"].values() if "est_qp" in row]
    return float(max(est) - min(est)) if len(est) >= 2 else None


def score(result: dict, stages: int, paths: tuple[str, ...] | None = None) -> float:
    """Model-selection score: mean ΔPSNR-Y of both paths at full depth, losses counted double
    (``paths``: of "aware" and "blind", only those)."""
    paths = paths or ("aware", "blind")
    vals = []
    for row in result["crf"].values():
        vals += [row[f"s{stages}"]] if "aware" in paths else []
        vals += [row["blind"]] if "blind" in row and "blind" in paths else []
    return float(np.mean([v if v >= 0 else 2 * v for v in vals]))
