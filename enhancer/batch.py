"""Assemble model inputs for a batch of frames (or crops), filling gaps with blind estimates.

Training, validation and the inference engine all go through ``FrameInputs``
and ``collate`` so the model sees exactly the same tensors everywhere. A
missing QP map (HEVC, transcoded input, ``--side-info blind``) is replaced by
the QPEstimator's prediction; a missing CRF by the estimated mean QP; a
missing reference by the current frame with the worst matching cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from enhancer.features import QP_SCALE, phase_planes, pict_onehot
from enhancer.network import REFERENCES, QPEstimator, VQENet

COST_SCALE = 20.0  # mean absolute luma difference -> trust plane (1 = no match)


def cost_plane(cost: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-8x8-luma-block matching cost (gh, gw) -> (1, h, w) half-res plane in [0, 1]."""
    plane = (cost.float() * COST_SCALE).clamp(0.0, 1.0)
    plane = plane.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w]
    return plane[None]


@dataclass
class Reference:
    pixels: torch.Tensor  # (6, h, w) aligned to the current frame
    cost: torch.Tensor  # (1, h, w) trust plane from cost_plane
    qp: float | None = None  # the reference frame's QP, when the stream says


@dataclass
class FrameInputs:
    cur: torch.Tensor  # (6, h, w) in [0, 1]
    refs: list[Reference | None] = field(default_factory=lambda: [None] * REFERENCES)
    qmap: torch.Tensor | None = None  # (1, h, w) QP / 51
    parts: torch.Tensor | None = None  # (4, h, w)
    frame_qp: float | None = None
    pict_type: str = "?"
    seq_qp: float | None = None  # CRF (or constant QP) from the encoder
    seq_known: bool = False


@dataclass
class Batch:
    x: torch.Tensor
    inputs: torch.Tensor
    seq_cond: torch.Tensor
    frame_cond: torch.Tensor
    est_qmap: torch.Tensor | None  # estimator output per macroblock, (B, 1, h/8, w/8)
    frame_qp: torch.Tensor  # (B,) QP actually used for the frame (known or estimated)


def _frame_cond(it: FrameInputs, fqp: float, seq: float) -> list[float]:
    refs = list(it.refs) + [None] * (REFERENCES - len(it.refs))
    has = [1.0 if r is not None else 0.0 for r in refs[:REFERENCES]]
    known = all(r is None or r.qp is not None for r in refs) and it.frame_qp is not None
    deltas = [
        (r.qp - fqp) / 10.0 if r is not None and r.qp is not None and known else 0.0
        for r in refs[:REFERENCES]
    ]
    return [fqp / QP_SCALE, (fqp - seq) / 10.0, *pict_onehot(it.pict_type), *has, *deltas,
            1.0 if known else 0.0]  # fmt: skip


def collate(
    items: list[FrameInputs],
    model: VQENet,
    estimator: QPEstimator | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Stack frames of one size into a Batch on ``device``."""
    x = torch.stack([it.cur for it in items]).to(device=device, dtype=dtype)
    b, _, h, w = x.shape
    phase = phase_planes(h, w, device).to(dtype)[None]
    est = None
    if any(it.qmap is None for it in items):
        if estimator is None:
            raise ValueError("a frame without a QP map needs the blind estimator")
        with torch.no_grad():
            est = estimator(x, phase).clamp(0.1, 1.0)
    qmaps, fqps, seqs, frames = [], [], [], []
    for i, it in enumerate(items):
        if it.qmap is not None:
            qm = it.qmap.to(device=device, dtype=dtype)
        else:
            qm = F.interpolate(est[i : i + 1], scale_factor=8, mode="nearest")[0][:, :h, :w]
        qmaps.append(qm)
        fqp = it.frame_qp if it.frame_qp is not None else float(qm.mean()) * QP_SCALE
        seq = it.seq_qp if it.seq_qp is not None else fqp
        fqps.append(fqp)
        seqs.append([seq / QP_SCALE, 1.0 if it.seq_known else 0.0])
        frames.append(_frame_cond(it, fqp, seq))
    cfg = model.cfg
    refs = costs = parts = None
    if cfg.references:
        ones = torch.ones(1, h, w)
        refs = torch.stack([
            torch.stack([r.pixels if r is not None else it.cur for r in it.refs])
            for it in items
        ]).to(device=device, dtype=dtype)  # fmt: skip
        costs = torch.stack([
            torch.stack([r.cost if r is not None else ones for r in it.refs]) for it in items
        ]).to(device=device, dtype=dtype)  # fmt: skip
    if cfg.partitions:
        parts = torch.stack(
            [it.parts if it.parts is not None else torch.zeros(4, h, w) for it in items]
        ).to(device=device, dtype=dtype)
    inputs = model.assemble(x, refs, costs, torch.stack(qmaps), parts, phase)
    return Batch(
        x=x,
        inputs=inputs,
        seq_cond=torch.tensor(seqs, device=device, dtype=dtype),
        frame_cond=torch.tensor(frames, device=device, dtype=dtype),
        est_qmap=est,
        frame_qp=torch.tensor(fqps),
    )
