"""One cached sequence frame -> model inputs and clean target, as the engine would build them.

The input plan (enhancer.references.input_plan) decides, by codec and side-info
mode, which reference slots and which side information a frame gets, so
training and inference cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from enhancer.align import apply_flow
from enhancer.batch import FrameInputs, Reference, cost_plane
from enhancer.features import partition_planes, planes_to_tensor, qp_plane, tensor_to_planes
from enhancer.pixel_qp import PixelQP
from enhancer.references import input_plan
from enhancer.training.data import pack, unpack_yuv

SLOT_NAMES = {"peaks": ("peak_past", "peak_future"), "adjacent": ("adj_past", "adj_future")}


def _digest(data) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def attach_pixel_crf(samples: list[dict], pixel_qp: PixelQP, store: Path | None = None) -> int:
    """Store in each sample the CRF the engine's pixel estimate would tell the network on
    each frame on the blind path (``pixel_crf``, the running estimate), which
    ``frame_inputs(blind=True)`` then hands it.

    With ``store`` (a folder), the estimates are kept in a file named by the estimate's
    weights, each under a digest of its sample's decoded frames, and read back on the next
    call: a training restart does not recompute them, a rebuilt sample is not told a stale one.
    """
    if not pixel_qp:
        return 0
    known: dict[str, np.ndarray] = {}
    path = None
    if store is not None:
        path = store / f"pixel_crf-{_digest(json.dumps(pixel_qp.to_dict()).encode())}.npz"
        if path.exists():
            known = dict(np.load(path))
    added = 0
    for s in samples:
        if "pixel_crf" in s:
            continue
        key = _digest(np.ascontiguousarray(s["dec"]).data) if path is not None else None
        if key in known:
            s["pixel_crf"] = known[key]
            continue
        s["pixel_crf"] = np.array(pixel_qp.told_crfs(unpack_yuv(p)[0] for p in s["dec"]))
        if key is not None:
            known[key] = s["pixel_crf"]
            added += 1
    if path is not None and added:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **known)
        tmp.replace(path)
    return len(samples)


def warped_clean(sample: dict, slot: str, t: int) -> np.ndarray:
    """The clean frame of reference ``slot`` of frame ``t``, warped to ``t`` (packed)."""
    h, w = sample["dec"].shape[1] * 2 // 3, sample["dec"].shape[2]
    j = int(sample[f"{slot}_idx"][t])
    anchor = planes_to_tensor(unpack_yuv(sample["clean"][j]))[None]
    flow = torch.from_numpy(sample[f"{slot}_flow"][t].astype(np.float32))[None]
    return pack(tensor_to_planes(apply_flow(anchor, flow)[0], h, w))


def frame_inputs(
    sample: dict,
    t: int,
    crop: tuple[int, int, int] | None = None,
    blind: bool = False,
    drop_refs: tuple[bool, bool] = (False, False),
    enhanced: bool = False,
    crf_noise: float = 0.0,
    truth: bool = False,
) -> tuple[FrameInputs, torch.Tensor]:
    """FrameInputs (and the clean target) for frame ``t`` of a cached sample.

    ``crop`` = (y0, x0, size) in luma pixels, multiples of 16 so block phase is kept.
    ``blind`` builds what ``--side-info blind`` gives: adjacent references aligned by
    search, no QP map, no picture types, and the CRF the pixel estimate reads
    (``attach_pixel_crf``; the true CRF in a sample without one) plus ``crf_noise``.
    ``enhanced`` takes the quality-peak slots warped from the enhanced anchors
    (training.anchors), as the recurrent engine does, where the sample has them.
    ``truth`` hands every reference slot its *clean* frame, warped by the flow the
    decoded one was aligned with: truth guidance (VIG/CRF-net, arXiv 2303.00520), so
    that the network learns to take detail from its references before it must learn
    to cope with their artefacts.
    """
    h = sample["dec"].shape[1] * 2 // 3
    w = sample["dec"].shape[2]
    if crop is None:
        y0, x0, ch, cw = 0, 0, h, w
    else:
        y0, x0, size = crop
        ch = cw = size

    def cut(packed):
        y, u, v = unpack_yuv(packed)
        cy, cx = slice(y0 // 2, (y0 + ch) // 2), slice(x0 // 2, (x0 + cw) // 2)
        return y[y0 : y0 + ch, x0 : x0 + cw], u[cy, cx], v[cy, cx]

    cur = planes_to_tensor(cut(sample["dec"][t]))
    target = planes_to_tensor(cut(sample["clean"][t]))
    hh, ww = cur.shape[1:]
    codec = str(sample["codec"])
    plan = input_plan(codec, "blind" if blind else "auto")
    pict = "IPB?"[int(sample["pict"][t])] if plan.pict_type else "?"
    fqps = sample["frame_qp"]
    frame_qp = float(fqps[t]) if plan.frame_qp and np.isfinite(fqps[t]) else None
    refs: list[Reference | None] = []
    g0, g1, gh, gw = y0 // 8, x0 // 8, -(-ch // 8), -(-cw // 8)
    for name, drop in zip(SLOT_NAMES[plan.references], drop_refs, strict=True):
        j = int(sample[f"{name}_idx"][t])
        if j < 0 or drop:
            refs.append(None)
            continue
        cost = sample[f"{name}_cost"][t][g0 : g0 + gh, g1 : g1 + gw]
        cost = torch.from_numpy(cost.astype(np.float32))
        qp = float(fqps[j]) if frame_qp is not None and np.isfinite(fqps[j]) else None
        if truth:
            pixels = planes_to_tensor(cut(warped_clean(sample, name, t)))
        else:
            key = f"{name}_enh" if enhanced and f"{name}_enh" in sample else name
            pixels = planes_to_tensor(cut(sample[key][t]))
        refs.append(Reference(pixels, cost_plane(cost, hh, ww), qp))
    item = FrameInputs(
        cur=cur,
        refs=refs,
        frame_qp=frame_qp,
        pict_type=pict,
        seq_qp=float(sample["pixel_crf"][t]) + crf_noise
        if blind and "pixel_crf" in sample
        else float(sample["crf"]),
        seq_known=True,
    )
    box = (y0, x0, ch, cw)
    if plan.qp_map and (qmap := true_qp_map(sample, t, box)) is not None:
        item.qmap = qmap
        item.parts = partition_planes(sample["partition"][t][_macroblocks(box)], hh, ww)
    return item, target


def _macroblocks(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """The macroblock rows and columns a luma (y0, x0, height, width) box covers."""
    y0, x0, ch, cw = box
    return slice(y0 // 16, y0 // 16 - (-ch // 16)), slice(x0 // 16, x0 // 16 - (-cw // 16))


def true_qp_map(sample: dict, t: int, box: tuple[int, int, int, int]) -> torch.Tensor | None:
    """Frame ``t``'s QP map as the network gets it, over ``box`` = (y0, x0, height, width)
    in luma pixels; None where the stream exports none (HEVC). The QP estimator's target,
    on the blind path too, where the network is not given it."""
    qmap_arr = sample["qp_map"][t]
    if np.isnan(qmap_arr).any():
        return None
    return qp_plane(qmap_arr[_macroblocks(box)], box[2] // 2, box[3] // 2)
