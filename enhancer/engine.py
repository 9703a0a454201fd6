"""Inference engine: decoded frames + side info in, enhanced frames out, streaming.

``Engine.process`` consumes the reader's frames in display order and yields
each one enhanced, in display order, with a ``FrameReport`` (stages run,
side-info source, QP, time). Each frame borrows from two references chosen
by the input plan (enhancer.references): on the codec-aware path its
quality-peak anchors, the I/P frames before and after it; on the blind path
its neighbours. A B-frame waits (at most ``MAX_PENDING`` frames) until its
future anchor has arrived; anchors are enhanced first and their enhanced
output is what the frames after them borrow (recurrence), so quality carries
through a GOP. References are aligned per 8x8 block by matching (align.py),
seeded by the bitstream's motion vectors where the stream has them.

Precision: bf16 autocast with channels_last on CPUs with AMX / AVX-512 BF16,
fp32 on other CPUs, bf16 (or fp16) weights on CUDA. Large frames are tiled
with an overlap so memory stays bounded at 4K.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bitstream.types import DecodedFrame, FrameSideInfo, SequenceInfo
from enhancer.align import apply_flow
from enhancer.batch import FrameInputs, Reference, collate, cost_plane
from enhancer.checkpoint import load_model
from enhancer.features import (
    cpu_has_bf16,
    partition_planes,
    planes_to_tensor,
    qp_plane,
    tensor_to_planes,
)
from enhancer.options import SIDE_INFO_MODES
from enhancer.references import ANCHOR_TYPES, MAX_PENDING, align_reference, input_plan

PRECISIONS = ("auto", "bf16", "fp32")


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


@dataclass
class _Pending:
    frame: DecodedFrame
    cur: torch.Tensor  # (6, h, w) decoded, on the device
    t0: float


@dataclass
class _Anchor:
    index: int
    decoded: torch.Tensor  # what alignment matches against
    pixels: torch.Tensor  # what is borrowed: the enhanced output (or the decode)
    qp: float | None


def _as_samples(out: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The enhanced frame as the integer samples that are written (what training borrows)."""
    maxv = (1 << ctx["bit_depth"]) - 1
    return (out.float().clamp(0.0, 1.0) * maxv).round() / maxv


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
        precision: str = "auto",
        recurrent: bool = True,
    ):
        if side_info not in SIDE_INFO_MODES:
            raise ValueError(f"side_info must be one of {SIDE_INFO_MODES}, not {side_info!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
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
        self.recurrent = recurrent
        if threads:
            torch.set_num_threads(threads)
        self.dtype = torch.float32  # of the tensors handed to the model
        self.autocast = False
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision == "bf16" or (precision == "auto" and cpu_has_bf16()):
            self.autocast = True
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        self.precision = "bf16" if self.autocast else names[self.dtype]
        self.model = model.to(self.device, self.dtype).to(memory_format=torch.channels_last)
        self.estimator = est.to(self.device, self.dtype)

    # ------------------------------------------------------------ decisions

    def plan_stages(self, side: FrameSideInfo, info: SequenceInfo) -> int | None:
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

    def _amp(self):
        if self.autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ per frame

    def _reference(self, cur, side, anchor: _Anchor | None, index: int, bitstream: bool):
        if anchor is None or anchor.decoded.shape != cur.shape:  # none, or the size changed
            return None
        flow, cost = align_reference(cur, anchor.decoded, side, anchor.index - index, bitstream)
        pixels = apply_flow(anchor.pixels[None].float(), flow[None])[0]
        return Reference(pixels, cost_plane(cost, *cur.shape[1:]), anchor.qp)

    def _enhance(self, p: _Pending, refs, info: SequenceInfo, ctx) -> tuple:
        p.t0 = time.perf_counter()  # a B-frame's wait for its anchor is not its cost
        frame, side = p.frame, p.frame.side
        plan = ctx["plan"]
        _, h, w = p.cur.shape
        use_bits = (
            plan.qp_map and side.qp_map is not None and side.sources.get("qp_map") == "bitstream"
        )
        pict = side.pict_type if plan.pict_type and side.sources.get("pict_type") != "none" else "?"
        frame_qp = side.qp if plan.frame_qp and side.qp is not None else None
        item = FrameInputs(
            cur=p.cur,
            refs=[
                self._reference(p.cur, side, a, frame.index, plan.bitstream_vectors) for a in refs
            ],
            frame_qp=frame_qp,
            pict_type=pict,
            seq_qp=ctx["seq_qp"] if ctx["seq_known"] else ctx["mean_qp"](),
            seq_known=ctx["seq_known"],
        )
        if use_bits:
            item.qmap = qp_plane(side.qp_map, h, w)
            item.parts = partition_planes(side.partition, h, w)
        if frame_qp is None:  # refs' QPs only mean something next to the frame's own
            for r in item.refs:
                if r is not None:
                    r.qp = None
        with torch.inference_mode(), self._amp():
            batch = collate([item], self.model, self.estimator, self.device, self.dtype)
        qp = float(batch.frame_qp[0])
        ctx["qp_sum"] += qp
        ctx["qp_n"] += 1
        if self.stages != "auto":
            n = self.stages
        else:
            n = self._policy_stages(qp, info) if self.policy else self.max_stages
        out = self._run_model(batch, n)[0] if n > 0 else None
        return out, n, qp, use_bits

    @torch.inference_mode()
    def _run_model(self, batch, stages: int) -> torch.Tensor:
        x, inp = batch.x, batch.inputs.contiguous(memory_format=torch.channels_last)
        _, _, h, w = x.shape
        tile = self.tile
        if tile is None:
            tile = 0 if h * w <= 540 * 960 else 384
        with self._amp():
            if not tile or (h <= tile and w <= tile):
                return self.model(x, inp, batch.seq_cond, batch.frame_cond, stages)[-1].float()
            tile = max(32, tile // 8 * 8)
            overlap = 16
            out = torch.empty_like(x, dtype=torch.float32)
            for y0 in range(0, h, tile):
                for x0 in range(0, w, tile):
                    ya, xa = max(y0 - overlap, 0), max(x0 - overlap, 0)
                    yb, xb = min(y0 + tile + overlap, h), min(x0 + tile + overlap, w)
                    res = self.model(
                        x[:, :, ya:yb, xa:xb],
                        inp[:, :, ya:yb, xa:xb],
                        batch.seq_cond,
                        batch.frame_cond,
                        stages,
                    )[-1]
                    ye, xe = min(y0 + tile, h), min(x0 + tile, w)
                    out[:, :, y0:ye, x0:xe] = res[:, :, y0 - ya : ye - ya, x0 - xa : xe - xa]
            return out

    def _finish(self, p: _Pending, out, n, qp, from_bits, ctx):
        frame = p.frame
        height, width = frame.planes[0].shape
        planes = (
            tensor_to_planes(out, height, width, ctx["bit_depth"])
            if out is not None
            else frame.planes
        )
        report = FrameReport(
            index=frame.index,
            stages=n,
            side_info="bitstream" if from_bits else "estimated",
            qp=qp,
            seconds=time.perf_counter() - p.t0,
        )
        return replace(frame, planes=planes), report

    def process(
        self, frames: Iterable[DecodedFrame], info: SequenceInfo
    ) -> Iterator[tuple[DecodedFrame, FrameReport]]:
        plan = input_plan(info.codec, self.side_info)
        ctx = {
            "plan": plan,
            "bit_depth": info.bit_depth or 8,
            "seq_qp": info.sequence_qp,
            "seq_known": info.sequence_qp is not None,
            "qp_sum": 0.0,
            "qp_n": 0,
        }
        ctx["mean_qp"] = lambda: ctx["qp_sum"] / ctx["qp_n"] if ctx["qp_n"] else None
        if plan.references == "adjacent":
            yield from self._process_adjacent(frames, info, ctx)
        else:
            yield from self._process_peaks(frames, info, ctx)

    def _pending(self, frame: DecodedFrame, bit_depth: int) -> _Pending:
        t0 = time.perf_counter()
        cur = planes_to_tensor(frame.planes, bit_depth).to(self.device)
        return _Pending(frame, cur, t0)

    def _process_peaks(self, frames, info, ctx):
        anchor: _Anchor | None = None
        waiting: deque[_Pending] = deque()
        for frame in frames:
            p = self._pending(frame, ctx["bit_depth"])
            if frame.side.pict_type not in ANCHOR_TYPES and frame.side.pict_type != "?":
                waiting.append(p)
                if len(waiting) > MAX_PENDING:  # no anchor in sight: go on with the past only
                    yield self._run_one(waiting.popleft(), [anchor, None], info, ctx)
                continue
            out, n, qp, bits = self._enhance(p, [anchor, None], info, ctx)
            kept = p.cur if out is None or not self.recurrent else _as_samples(out, ctx)
            new = _Anchor(frame.index, p.cur, kept, frame.side.qp)
            while waiting:
                yield self._run_one(waiting.popleft(), [anchor, new], info, ctx)
            anchor = new
            yield self._finish(p, out, n, qp, bits, ctx)
        while waiting:
            yield self._run_one(waiting.popleft(), [anchor, None], info, ctx)

    def _run_one(self, p: _Pending, refs, info, ctx):
        return self._finish(p, *self._enhance(p, refs, info, ctx), ctx)

    def _process_adjacent(self, frames, info, ctx):
        prev: _Anchor | None = None
        held: _Pending | None = None
        for frame in frames:
            p = self._pending(frame, ctx["bit_depth"])
            nxt = _Anchor(frame.index, p.cur, p.cur, None)
            if held is not None:
                yield self._run_one(held, [prev, nxt], info, ctx)
                prev = _Anchor(held.frame.index, held.cur, held.cur, None)
            held = p
        if held is not None:
            yield self._run_one(held, [prev, None], info, ctx)
