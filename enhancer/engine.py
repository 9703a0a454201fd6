"""Inference engine: decoded frames + side info in, enhanced frames out, streaming.

``Engine.process`` consumes the reader's frames in display order and yields
each one enhanced, with a ``FrameReport`` (stages run, side-info source, QP,
time). It keeps one frame of temporal context: the last decoded I/P frame
(the past anchor), which is warped by each frame's bitstream motion vectors
exactly as in training. It runs on CUDA when present (bf16/fp16,
channels_last) and on the CPU otherwise, and tiles large frames with an
overlap so memory stays bounded at 4K.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bitstream.types import DecodedFrame, SequenceInfo
from enhancer.checkpoint import load_model
from enhancer.features import (
    flow_plane_full,
    mask_plane,
    partition_planes,
    planes_to_tensor,
    qp_plane,
    tensor_to_planes,
    warp_reference,
)
from enhancer.inputs import FrameInputs, collate

SIDE_INFO_MODES = ("auto", "bitstream", "blind")


@dataclass
class FrameReport:
    index: int
    stages: int
    side_info: str  # "bitstream" or "estimated"
    qp: float | None
    seconds: float


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r} (auto, cpu or cuda)")
    return torch.device(device)


class Engine:
    """Loads the model once; ``process`` may be called for many videos."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "auto",
        stages: str | int = "auto",
        side_info: str = "auto",
        tile: int | None = None,
        threads: int | None = None,
    ):
        if side_info not in SIDE_INFO_MODES:
            raise ValueError(f"side_info must be one of {SIDE_INFO_MODES}, not {side_info!r}")
        self.device = pick_device(device)
        model, est, policy, meta = load_model(weights)
        self.meta = meta
        self.policy = policy
        self.max_stages = model.cfg.stages
        if stages != "auto":
            stages = int(stages)
            if not 0 <= stages <= self.max_stages:
                raise ValueError(f"stages must be auto or 0..{self.max_stages}, not {stages}")
        self.stages = stages
        self.side_info = side_info
        self.tile = tile  # half-resolution tile edge; None = automatic, 0 = never tile
        if threads:
            torch.set_num_threads(threads)
        self.dtype = torch.float32
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.model = model.to(self.device, self.dtype)
        self.estimator = est.to(self.device, self.dtype)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------ per frame

    def _inputs(self, frame: DecodedFrame, anchor: torch.Tensor | None, bit_depth: int,
                seq_qp: float | None, seq_known: bool):  # fmt: skip
        side = frame.side
        cur = planes_to_tensor(frame.planes, bit_depth)
        _, h, w = cur.shape
        # Only a decoded per-macroblock map (H.264) counts: HEVC's flat map from the slice
        # headers comes without partitions or motion, and training treats HEVC as blind.
        use_bits = (self.side_info != "blind" and side.qp_map is not None
                    and side.sources.get("qp_map") == "bitstream")  # fmt: skip
        if not use_bits:  # blind, or the stream has none: the estimate stands in (reported)
            pict = side.pict_type if side.sources.get("pict_type") != "none" else "?"
            if self.side_info == "blind":
                pict = "?"
            return FrameInputs(cur=cur, pict_type=pict, seq_qp=seq_qp, seq_known=seq_known), False
        ref = mask = None
        valid = side.mv_past_valid
        if anchor is not None and side.mv_past is not None and valid is not None and valid.any():
            height, width = frame.planes[0].shape
            flow = flow_plane_full(side.mv_past, side.mv_past_valid, height, width)
            ref = warp_reference(anchor.to(self.device)[None], flow.to(self.device))[0].cpu()
            maxv = (1 << bit_depth) - 1
            ref = (ref * maxv).round() / maxv  # training stored the aligned frame as integers
            mask = mask_plane(valid, h, w)
        item = FrameInputs(
            cur=cur,
            ref=ref,
            ref_mask=mask,
            qmap=qp_plane(side.qp_map, h, w),
            parts=partition_planes(side.partition, h, w),
            frame_qp=side.qp,
            pict_type=side.pict_type,
            seq_qp=seq_qp,
            seq_known=seq_known,
        )
        return item, True

    @torch.inference_mode()
    def _run_model(self, batch, stages: int) -> torch.Tensor:
        x, inp = batch.x, batch.inputs
        _, _, h, w = x.shape
        tile = self.tile
        if tile is None:
            tile = 0 if h * w <= 540 * 960 else 384
        if not tile or (h <= tile and w <= tile):
            if self.device.type == "cuda":
                inp = inp.contiguous(memory_format=torch.channels_last)
            return self.model(x, inp, batch.seq_cond, batch.frame_cond, stages)[-1]
        tile = max(32, tile // 8 * 8)
        overlap = 16
        out = torch.empty_like(x)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                ya, xa = max(y0 - overlap, 0), max(x0 - overlap, 0)
                yb, xb = min(y0 + tile + overlap, h), min(x0 + tile + overlap, w)
                res = self.model(x[:, :, ya:yb, xa:xb], inp[:, :, ya:yb, xa:xb],
                                 batch.seq_cond, batch.frame_cond, stages)[-1]  # fmt: skip
                ye, xe = min(y0 + tile, h), min(x0 + tile, w)
                out[:, :, y0:ye, x0:xe] = res[:, :, y0 - ya : ye - ya, x0 - xa : xe - xa]
        return out

    def plan_stages(self, side, info: SequenceInfo) -> int | None:
        """Stages ``process`` will run on a frame, from its side info alone.

        None when that depends on the pixels (no QP in the stream, or the blind path,
        whose QP is estimated). A caller can use it to copy untouched GOPs as they are.
        """
        if self.stages != "auto":
            return int(self.stages)
        if not self.policy:
            return self.max_stages
        if self.side_info == "blind" or side.qp is None:
            return None
        return self._policy_stages(side.qp, info)

    def _policy_stages(self, qp: float, info: SequenceInfo) -> int:
        """HEVC is calibrated by the stream's CRF (when x265 wrote it), H.264 by frame QP."""
        if info.codec == "hevc" and self.policy.hevc_stages:
            level = info.sequence_qp if info.sequence_qp is not None else qp
            return self.policy.stages_for(level, hevc=True)
        return self.policy.stages_for(qp)

    def process(
        self, frames: Iterable[DecodedFrame], info: SequenceInfo
    ) -> Iterator[tuple[DecodedFrame, FrameReport]]:
        bit_depth = info.bit_depth or 8
        seq_qp = info.sequence_qp
        seq_known = seq_qp is not None
        qp_sum, qp_n = 0.0, 0
        anchor: torch.Tensor | None = None
        for frame in frames:
            t0 = time.perf_counter()
            cur_seq = seq_qp if seq_known else (qp_sum / qp_n if qp_n else None)
            item, from_bits = self._inputs(frame, anchor, bit_depth, cur_seq, seq_known)
            with torch.inference_mode():
                batch = collate([item], self.model, self.estimator, self.device, self.dtype)
            qp = float(batch.frame_qp[0])
            qp_sum, qp_n = qp_sum + qp, qp_n + 1
            n = self.stages if self.stages != "auto" else (
                self._policy_stages(qp, info) if self.policy
                else self.max_stages
            )  # fmt: skip
            if frame.side.pict_type in ("I", "P"):
                anchor = item.cur
            height, width = frame.planes[0].shape
            if n > 0:
                out = self._run_model(batch, n)[0]
                planes = tensor_to_planes(out, height, width, bit_depth)
            else:
                planes = frame.planes
            report = FrameReport(
                index=frame.index,
                stages=n,
                side_info="bitstream" if from_bits else "estimated",
                qp=qp,
                seconds=time.perf_counter() - t0,
            )
            yield replace(frame, planes=planes), report
