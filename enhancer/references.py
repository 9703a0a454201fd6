"""Which frames a frame borrows from, and how they are aligned: shared by training and inference.

Two plans, one network:

- ``peaks`` (the codec-aware path, and HEVC, whose picture types come from
  the slice headers): a frame's references are its quality-peak anchors,
  the nearest I/P frame before it and, for a B-frame, the nearest I/P frame
  after it. Decode order delivers both before the B-frame, and at inference
  the anchors' *enhanced* outputs stand in for them, so quality carries
  through a GOP.
- ``adjacent`` (``--side-info blind``, or a stream without picture types):
  the previous and the next decoded frame.

``input_plan`` is the one place that decides, from the codec and the
side-info mode, what a frame's model inputs are made of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from enhancer.align import align, seeds_from_vectors

ANCHOR_TYPES = ("I", "P")
MAX_PENDING = 16  # frames held back waiting for a future anchor, at most


@dataclass(frozen=True)
class InputPlan:
    """What a frame's inputs are built from."""

    references: str  # "peaks" or "adjacent"
    bitstream_vectors: bool  # seed the alignment with the stream's motion vectors
    qp_map: bool  # the stream's per-macroblock QP map and partitions (else: estimated)
    frame_qp: bool  # the stream's frame QP (H.264 map mean, HEVC slice header)
    pict_type: bool  # I/P/B from the stream


def input_plan(codec: str, side_info: str = "auto") -> InputPlan:
    """The inputs for a stream of ``codec`` ("h264", "hevc", ... or the encoder's name)."""
    if side_info == "blind":
        return InputPlan("adjacent", False, False, False, False)
    if codec in ("h264", "libx264"):
        return InputPlan("peaks", True, True, True, True)
    if codec in ("hevc", "libx265"):
        # FFmpeg exports neither vectors nor a QP map for HEVC; the slice headers
        # still give the picture type and QP, so HEVC gets quality peaks, aligned by search.
        return InputPlan("peaks", False, False, True, True)
    return InputPlan("adjacent", False, False, False, False)


def reference_indices(picts: list[str], plan: InputPlan) -> tuple[list[int], list[int]]:
    """(past, future) reference display index per frame; -1 where there is none."""
    n = len(picts)
    if plan.references == "adjacent" or not any(p in ANCHOR_TYPES for p in picts[1:]):
        return [t - 1 for t in range(n)], [t + 1 if t + 1 < n else -1 for t in range(n)]
    past, future = [-1] * n, [-1] * n
    last = -1
    for t, p in enumerate(picts):
        past[t] = last
        if p in ANCHOR_TYPES:
            last = t
    nxt = -1
    for t in range(n - 1, -1, -1):
        if picts[t] not in ANCHOR_TYPES:
            future[t] = nxt
        else:
            nxt = t
    return past, future


def vector_seeds(side, distance: int, device="cpu") -> list[torch.Tensor]:
    """Candidate flows toward a frame ``distance`` away (signed), from the frame's vectors."""
    seeds = []
    for mv, valid, direction in (
        (side.mv_past, side.mv_past_valid, -1),
        (side.mv_future, side.mv_future_valid, 1),
    ):
        if mv is None or valid is None or not valid.any():
            continue
        m = torch.from_numpy(np.ascontiguousarray(mv.transpose(2, 0, 1))).to(device)
        v = torch.from_numpy(np.ascontiguousarray(valid)).to(device, torch.float32)
        seeds += seeds_from_vectors(m, v, direction, distance)
    return seeds


def _fit_grid(seed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """A (2, ceil(H/8), ceil(W/8)) vector grid edge-padded to the frame's padded grid."""
    seed = seed[:, :gh, :gw]
    ph, pw = gh - seed.shape[1], gw - seed.shape[2]
    if ph or pw:
        seed = F.pad(seed[None], (0, pw, 0, ph), mode="replicate")[0]
    return seed


def align_reference(cur6, ref6, side=None, distance: int = 0, bitstream: bool = False):
    """Flow and cost aligning ``ref6`` (decoded) to ``cur6``; see align.align."""
    gh, gw = cur6.shape[-2] // 4, cur6.shape[-1] // 4
    seeds = vector_seeds(side, distance, cur6.device) if bitstream and side is not None else []
    # Frames are padded to 16 pixels; the stream's vector grid covers only ceil(H/8) rows.
    seeds = [_fit_grid(s, gh, gw) for s in seeds]
    # With the stream's vectors as seeds the search only covers what they miss (intra
    # blocks, vectors the encoder chose for rate rather than motion): an eighth of the
    # resolution is enough, and costs a tenth of a quarter-resolution search.
    flow, cost = align(cur6, ref6, seeds, search=True, search_scale=8 if seeds else 4)
    return flow[:, :gh, :gw], cost[:gh, :gw]
