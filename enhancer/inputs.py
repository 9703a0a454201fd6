"""Assemble model inputs for a batch of frames (or crops), filling gaps with blind estimates.

Training, validation and the inference engine all go through ``FrameInputs``
and ``collate`` so the model sees exactly the same tensors everywhere. A
missing QP map (HEVC, transcoded input, ``--side-info blind``) is replaced by
the QPEstimator's prediction; a missing CRF by the estimated mean QP; a
missing reference by the current frame with a zero validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from enhancer.features import QP_SCALE, phase_planes, pict_onehot
from enhancer.model import QPEstimator, VQENet


@dataclass
class FrameInputs:
    cur: torch.Tensor  # (6, h, w) in [0, 1]
    ref: torch.Tensor | None = None  # (6, h, w) past anchor warped by the MVs
    ref_mask: torch.Tensor | None = None  # (1, h, w)
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
    need_est = any(it.qmap is None for it in items)
    if need_est:
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
        has_ref = it.ref is not None and it.ref_mask is not None
        fqps.append(fqp)
        seqs.append([seq / QP_SCALE, 1.0 if it.seq_known else 0.0])
        frames.append([fqp / QP_SCALE, (fqp - seq) / 10.0, *pict_onehot(it.pict_type),
                       1.0 if has_ref else 0.0])  # fmt: skip
    cfg = model.cfg
    ref = ref_mask = parts = None
    if cfg.temporal:
        ref = torch.stack([it.ref if it.ref is not None else it.cur for it in items])
        ref_mask = torch.stack(
            [it.ref_mask if it.ref is not None and it.ref_mask is not None
             else torch.zeros(1, h, w) for it in items]  # fmt: skip
        )
        ref, ref_mask = ref.to(device=device, dtype=dtype), ref_mask.to(device=device, dtype=dtype)
    if cfg.partitions:
        parts = torch.stack(
            [it.parts if it.parts is not None else torch.zeros(4, h, w) for it in items]
        ).to(device=device, dtype=dtype)
    qmap = torch.stack(qmaps)
    inputs = model.assemble(x, ref, ref_mask, qmap, parts, phase)
    return Batch(
        x=x,
        inputs=inputs,
        seq_cond=torch.tensor(seqs, device=device, dtype=dtype),
        frame_cond=torch.tensor(frames, device=device, dtype=dtype),
        est_qmap=est,
        frame_qp=torch.tensor(fqps),
    )
