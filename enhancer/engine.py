"""Inference engine: decoded frames + side info in, enhanced frames out, streaming.

``Engine.process`` consumes the reader's frames in display order and yields
each one enhanced, in display order, with a ``FrameReport`` (stages run,
side-info source, QP, time). Each frame borrows from two references chosen
by the input plan (enhancer.references): on the codec-aware path its
quality-peak anchors, the I/P frames before and after it; on the blind path
its neighbours. A B-frame waits (at most ``MAX_PENDING`` frames) until its
future anchor has arrived; anchors are enhanced first. References are
aligned per 8x8 block by matching (align.py), seeded by the bitstream's
motion vectors where the stream has them. The network borrows either the
anchors' decoded pictures or (recurrent) their enhanced outputs: what it was
measured best with, which its model file says (meta "references", and
"<route>_references" for a route's own network, checkpoint.ROUTES: HEVC on
the codec-aware path, the blind path: "enhanced" or "decoded", the
default; vqe-v5's main network gains 0.02-0.05 dB more with its enhanced
anchors, its HEVC network and vqe-v3 do not: bench/ablation.py). Either way,
blocks the encoder copied from an anchor take the anchor's enhanced pixels
(transfer) instead of being computed.

Precision: bf16 autocast with channels_last on CPUs with AMX / AVX-512 BF16,
fp32 on other CPUs, bf16 (or fp16) weights on CUDA. Large frames are tiled
with an overlap so memory stays bounded at 4K.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bitstream.types import DecodedFrame, FrameSideInfo, SequenceInfo
from enhancer.align import warp_frame
from enhancer.batch import FrameInputs, Reference, collate, cost_plane
from enhancer.checkpoint import Networks, load_model
from enhancer.features import (
    autocast,
    cpu_has_bf16,
    partition_planes,
    planes_to_tensor,
    qp_plane,
    tensor_to_planes,
)
from enhancer.grain import grain_level
from enhancer.options import SIDE_INFO_MODES
from enhancer.references import ANCHOR_TYPES, MAX_PENDING, align_reference, input_plan
from enhancer.regions import run_regions

PRECISIONS = ("auto", "bf16", "fp32")
# Transfer (after FAST, Zhang and Sze 2017): where a block's decode matches its aligned
# anchor this closely (mean absolute luma difference, 0..1; the cost is blended with the
# neighbours', so the whole neighbourhood must match), the encoder copied it (skipped, no
# residual), and so is the anchor's enhanced block taken as it is. Below TRANSFER_QP the
# bound follows the frame's quantiser step (halved every 6 QP): at CRF 27 the flat bound
# cost 0.015 dB on bench/quality, 0.003 with this. Above it, a looser bound loses more
# than it saves (CRF 37: -0.017 dB for 1.5x the transferred share).
TRANSFER_COST = 0.75 / 255
TRANSFER_QP = 37.0
# Half-resolution pixels (32 luma): the unit the network runs or skips. Copied blocks lie
# scattered, and 64-pixel tiles computed whole took them back (bench.frame_time, x264 CRF
# 35, 640x272: 37 % of a moving-camera frame transferred at 64, 61 % at 32); smaller tiles
# only pay because equally tall crops run as one call (_run_changed). 8x8 blocks (16 luma)
# transferred 75 % but cost 0.025 dB at CRF 37-42 on bench/quality; 32-pixel tiles 0.014.
TILE = 16
LARGE_TILE_QP = 40.0
# Half-resolution pixels computed around a tile. The receptive field is 17, but the
# output 4 pixels in from a crop's edge is within 0.09 of a level (8-bit, rms) of the
# whole frame's, and at 16 the context cost 4x a tile's own area.
CONTEXT = 4
# What of it each stage keeps (enhancer.regions): later stages need less.
STAGE_CONTEXT = (4, 3, 2)
# Tiles of a large frame (bounded memory, ``tile``) take the whole receptive field: they
# are large, so it costs little, and the seams vanish.
TILE_CONTEXT = 16


@dataclass
class FrameReport:
    index: int
    stages: int
    side_info: str  # "bitstream" or "estimated"
    qp: float | None
    seconds: float
    model_seconds: float = 0.0  # the network's share of ``seconds``
    transferred: float = 0.0  # share of the frame taken from enhanced anchors, not computed
    align_seconds: float = 0.0  # aligning the references (and warping them)
    transfer_seconds: float = 0.0  # finding and warping what is transferred


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
    model_seconds: float = 0.0
    transferred: float = 0.0
    align_seconds: float = 0.0
    transfer_seconds: float = 0.0
    pixel_crf: float | None = None  # the CRF estimated from the pixels, if the stream has none
    grain: float | None = None  # its grain level (enhancer.grain), where the policy reads it
    # (level, table kind) the exit policy reads the frame by, where the stream's QP or the
    # pixel CRF estimate gives it before the network's inputs are built
    level: tuple[float, str] | None = None


@dataclass
class _Anchor:
    index: int
    decoded: torch.Tensor  # what alignment matches against
    pixels: torch.Tensor  # what the network borrows: the enhanced output if recurrent
    qp: float | None
    enhanced: torch.Tensor | None = None  # the network's output, what transfer copies


def transfer_cost(qp: float | None) -> float:
    """The matching cost under which a block is taken from its anchor, for a frame's QP."""
    if qp is None:
        return TRANSFER_COST
    return TRANSFER_COST * min(1.0, 2.0 ** ((qp - TRANSFER_QP) / 6.0))


def transfer_tile(qp: float | None) -> int:
    """The tile edge transfer decides on, for a frame's QP: twice ``TILE`` from
    ``LARGE_TILE_QP`` up, where the smaller tile cost 0.035 dB at CRF 51 on bench/quality."""
    return TILE * 2 if qp is not None and qp >= LARGE_TILE_QP else TILE


def _changed_runs(
    changed: torch.Tensor, h: int, w: int, tile: int = TILE
) -> list[tuple[int, int, int, int]]:
    """Half-res (y0, y1, x0, x1) rectangles covering the changed ``tile``-pixel tiles.

    Each row's runs of changed tiles, stacked with the run above where the two span the
    same columns: fewer, taller calls share their context rows.
    """
    open_: dict[tuple[int, int], list[int]] = {}  # (x0, x1) -> [y0, y1] of a growing rectangle
    done: list[tuple[int, int, int, int]] = []
    for ty, row in enumerate(changed.tolist()):
        spans, start = [], None
        for tx, on in enumerate([*row, False]):
            if on and start is None:
                start = tx
            elif not on and start is not None:
                spans.append((start * tile, min(tx * tile, w)))
                start = None
        y0, y1 = ty * tile, min((ty + 1) * tile, h)
        for span in list(open_):
            if span not in spans:
                done.append((*open_.pop(span), *span))
        for span in spans:
            if span in open_:
                open_[span][1] = y1
            else:
                open_[span] = [y0, y1]
    done += [(*ys, *span) for span, ys in open_.items()]
    return done


def _runs_area(runs: list[tuple[int, int, int, int]], h: int, w: int) -> int:
    """Pixels the network computes for the runs, context included."""
    area = 0
    for y0, y1, x0, x1 in runs:
        ch = min(y1 + CONTEXT, h) - max(y0 - CONTEXT, 0)
        area += ch * (min(x1 + CONTEXT, w) - max(x0 - CONTEXT, 0))
    return area


@dataclass
class _Candidate:
    """An enhanced anchor that transfer may copy from, aligned to the current frame."""

    cost: torch.Tensor  # (gh, gw) per-block matching cost of the decodes
    flow: torch.Tensor  # (2, gh, gw)
    source: torch.Tensor  # the anchor's enhanced output, unaligned


@dataclass
class _Transfer:
    """What transfer takes for a frame: decided from the matching costs alone, before
    anything is warped, so that warps are made only where they are used."""

    runs: list[tuple[int, int, int, int]]  # half-res rectangles the network computes
    changed: torch.Tensor  # (gh, gw) bool: the 8x8 luma blocks of those rectangles
    share: float  # of the frame transferred
    best: torch.Tensor  # (gh, gw) which candidate each block comes from
    candidates: list[_Candidate]

    def read(self) -> torch.Tensor:
        """The blocks the network reads: the changed ones and the ``CONTEXT`` around them
        (a block is 4 half-res pixels)."""
        r = -(-CONTEXT // 4)
        return F.max_pool2d(self.changed.float()[None, None], 2 * r + 1, 1, r)[0, 0] > 0

    def pixels(self) -> torch.Tensor:
        """The candidates' enhanced pixels on the blocks transferred (each from the anchor
        that matched its block best), zero elsewhere: each anchor is warped on its own
        blocks only, so their sum is the frame."""
        kept = ~self.changed
        source = None
        for r, c in enumerate(self.candidates):
            mine = kept & (self.best == r)
            if not mine.any():
                continue
            warped = warp_frame(c.source.float(), c.flow, mine)
            source = warped if source is None else source.add_(warped)
        return source


def _weaken(x: torch.Tensor, out: torch.Tensor, strength: float) -> torch.Tensor:
    """The input plus ``strength`` times the network's correction (see policy.py)."""
    if strength == 1.0:
        return out
    return x.float() + strength * (out - x.float())


class _Network(NamedTuple):
    model: torch.nn.Module
    estimator: torch.nn.Module
    recurrent: bool  # borrows its anchors' enhanced outputs (else their decoded pictures)


def _as_samples(out: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The enhanced frame as the integer samples that are written (what training borrows)."""
    maxv = (1 << ctx["bit_depth"]) - 1
    return (out.float().clamp(0.0, 1.0) * maxv).round() / maxv


class Engine:
    """The model, loaded once; ``process`` enhances any number of videos, each with its own
    options (stage count, side information), as whisper's model transcribes.

    ``weights``, ``device``, ``precision`` and ``tile`` belong to the loaded model: they
    decide where and in what arithmetic it runs. ``recurrent``: whether the network
    borrows its anchors' enhanced outputs (None: per network, as the model file says).
    Threads are the caller's
    (``torch.set_num_threads``), set once per process.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "auto",
        tile: int | None = None,
        precision: str = "auto",
        recurrent: bool | None = None,
        transfer: bool = True,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = pick_device(device)
        loaded = load_model(weights)
        policy = loaded.policy
        self.meta = loaded.meta
        self.policy = policy
        self.pixel_qp = loaded.pixel_qp
        self.max_stages = loaded.network.cfg.stages
        self.tile = tile  # half-resolution tile edge; None = automatic, 0 = never tile
        self.transfer = transfer
        self.dtype = torch.float32  # of the tensors handed to the model
        self.autocast = False
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif precision == "bf16" or (precision == "auto" and cpu_has_bf16()):
            self.autocast = True
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        self.precision = "bf16" if self.autocast else names[self.dtype]
        main = self._placed((loaded.network, loaded.estimator), recurrent, loaded.references())
        self.network = main
        self.model, self.estimator, self.recurrent = main
        # route ("hevc" on the codec-aware path, "blind") -> its own network, where the file
        # has one
        self.own_networks = {
            c: self._placed(n, recurrent, loaded.references(c))
            for c, n in loaded.own_networks.items()
        }

    def _placed(self, networks: Networks, recurrent: bool | None, references: str) -> _Network:
        """A network and its estimator on this engine's device and dtype, recurrent as asked
        or (None) as the model file says (``references``)."""
        model, est = networks
        model = model.to(self.device, self.dtype).to(memory_format=torch.channels_last)
        if recurrent is None:
            recurrent = references == "enhanced"
        return _Network(model, est.to(self.device, self.dtype), recurrent)

    def check(self, stages: str | int = "auto", side_info: str = "auto") -> str | int:
        """Validate per-call options against this model; -> the stage count ("auto" or int)."""
        if side_info not in SIDE_INFO_MODES:
            raise ValueError(f"side_info must be one of {SIDE_INFO_MODES}, not {side_info!r}")
        if stages == "auto":
            return stages
        n = int(stages)
        if not 0 <= n <= self.max_stages:
            raise ValueError(f"stages must be auto or 0..{self.max_stages}, not {stages}")
        return n

    # ------------------------------------------------------------ decisions

    def plan_stages(
        self,
        side: FrameSideInfo,
        info: SequenceInfo,
        stages: str | int = "auto",
        side_info: str = "auto",
    ) -> int | None:
        """Stages ``process`` will run on a frame with these options, from its side info alone.

        None when that depends on the pixels (no QP in the stream, the blind path, whose
        QP is estimated, or a level where the policy's table for frames without grain
        differs from the one for grainy frames). A caller can use it to copy untouched
        GOPs as they are.
        """
        stages = self.check(stages, side_info)
        level = None
        if self.policy and side_info != "blind" and side.qp is not None:
            level = self._policy_level(side.qp, info.codec, info.sequence_qp)
        return self._plan(level, stages)

    def _plan(
        self, level: tuple[float, str] | None, stages, grain: float | None = None
    ) -> int | None:
        """``plan_stages`` for options already checked (per frame: no validation again), at
        the frame's policy ``level`` (None: not known from the side info); ``grain``: the
        frame's grain level, if measured."""
        if stages != "auto":
            return int(stages)
        if not self.policy:
            return self.max_stages
        if level is None:
            return None
        if grain is None and self.policy.grain_decides(*level):
            return None  # the pixels' grain decides
        return self.policy.stages_for(*level, grain)

    def _policy_level(
        self, qp: float, codec: str, seq_qp: float | None, pixel_crf: float | None = None
    ) -> tuple[float, str]:
        """(level, table kind): HEVC is calibrated by the stream's CRF (when x265 wrote it),
        H.264 by frame QP (coarsely coded streams in a table of their own), and the blind
        path and streams that give neither by the CRF estimated from the pixels (H.264 and
        HEVC apart)."""
        if pixel_crf is not None:
            hevc = codec == "hevc" and self.policy.has("blind_hevc")
            return pixel_crf, "blind_hevc" if hevc else "blind"
        if codec == "hevc" and self.policy.has("hevc"):
            return (seq_qp if seq_qp is not None else qp), "hevc"
        return qp, self.policy.h264_kind(seq_qp)

    def _told_offset(self, p: _Pending) -> float:
        """What the policy adds to a frame's estimated CRF before the network is told it."""
        if not self.policy or p.level is None:
            return 0.0
        return self.policy.offset_for(*p.level, p.grain)

    def _amp(self):
        return autocast("cpu", enabled=self.autocast)

    # ------------------------------------------------------------ per frame

    def _align(self, cur, side, anchor: _Anchor | None, index: int, bitstream: bool):
        """(flow, cost) aligning an anchor to ``cur``, or None (none, or the size changed)."""
        if anchor is None or anchor.decoded.shape != cur.shape:
            return None
        return align_reference(cur, anchor.decoded, side, anchor.index - index, bitstream)

    def _transfer(self, refs, aligned, qp: float | None) -> _Transfer | None:
        """What the frame takes from its enhanced anchors, from the matching costs alone."""
        usable = [
            _Candidate(fc[1], fc[0], a.enhanced)
            for a, fc in zip(refs, aligned, strict=True)
            if fc is not None and a.enhanced is not None
        ]
        if not self.transfer or not usable:
            return None
        cost = torch.stack([c.cost for c in usable])  # (R, gh, gw) per 8x8 luma block
        low, best = cost.min(0)  # argmin is 10x slower on CPU
        same = low < transfer_cost(qp)
        if not same.any():
            return None
        tile = transfer_tile(qp)
        per = tile * 2 // 8  # blocks per tile edge
        changed = F.max_pool2d((~same).float()[None, None], per, per, ceil_mode=True)[0, 0] > 0
        h, w = usable[0].source.shape[1:]
        runs = _changed_runs(changed, h, w, tile)
        if _runs_area(runs, h, w) >= h * w:  # the context around the runs costs more
            return None
        share = 1.0 - float(changed.float().mean())
        blocks = changed.repeat_interleave(per, 0).repeat_interleave(per, 1)[: h // 4, : w // 4]
        return _Transfer(runs, blocks, share, best, usable)

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
        runs = self._plan(p.level, ctx["stages"], p.grain) if frame_qp is not None else None
        if runs == 0:
            # The stream's QP already says nothing runs: no alignment, no inputs.
            ctx["qp_sum"] += frame_qp
            ctx["qp_n"] += 1
            p.model_seconds = p.transferred = p.align_seconds = p.transfer_seconds = 0.0
            return None, 0, frame_qp, use_bits
        t_align = time.perf_counter()
        aligned = [self._align(p.cur, side, a, frame.index, plan.bitstream_vectors) for a in refs]
        t_transfer = time.perf_counter()
        transfer = self._transfer(refs, aligned, frame_qp)
        t_warp = time.perf_counter()
        p.transfer_seconds = t_warp - t_transfer
        # With transfer the network reads its references only in the crops it computes.
        read = transfer.read() if transfer is not None else None
        references = [
            None
            if fc is None
            else Reference(warp_frame(a.pixels.float(), fc[0], read), cost_plane(fc[1], h, w), a.qp)
            for a, fc in zip(refs, aligned, strict=True)
        ]
        p.align_seconds = t_transfer - t_align + time.perf_counter() - t_warp
        seq_qp = ctx["seq_qp"] if ctx["seq_known"] else ctx["mean_qp"]()
        item = FrameInputs(
            cur=p.cur,
            refs=references,
            frame_qp=frame_qp,
            pict_type=pict,
            # Without a CRF in the stream, the one estimated from the pixels, as if it said so
            # (plus the policy's offset for that estimate).
            seq_qp=seq_qp if p.pixel_crf is None else p.pixel_crf + self._told_offset(p),
            seq_known=ctx["seq_known"] or p.pixel_crf is not None,
        )
        if use_bits:
            item.qmap = qp_plane(side.qp_map, h, w)
            item.parts = partition_planes(side.partition, h, w)
        if frame_qp is None:  # refs' QPs only mean something next to the frame's own
            for r in item.refs:
                if r is not None:
                    r.qp = None
        with torch.inference_mode(), self._amp():
            model, estimator, _ = ctx["network"]
            batch = collate([item], model, estimator, self.device, self.dtype)
            if self.autocast:  # as the first convolution casts them: once, not once per crop
                batch.inputs = batch.inputs.to(torch.bfloat16, memory_format=torch.channels_last)
        qp = float(batch.frame_qp[0])
        ctx["qp_sum"] += qp  # what the network conditions on (a sequence QP, if unknown)
        ctx["qp_n"] += 1
        if p.pixel_crf is not None:  # what the network was told, and the blind table follows
            qp = p.pixel_crf
        n, strength = self.max_stages, 1.0
        if ctx["stages"] != "auto":
            n = ctx["stages"]
        elif self.policy:
            level = p.level or self._policy_level(qp, info.codec, ctx["seq_qp"], p.pixel_crf)
            n = self.policy.stages_for(*level, p.grain)
            strength = self.policy.strength_for(*level, p.grain)
        p.model_seconds, p.transferred = 0.0, 0.0
        out = None
        if n > 0:
            if transfer is None:
                t_model = time.perf_counter()
                out = self._run_model(batch, n, strength, model)[0]
            else:
                t_transfer = time.perf_counter()
                source = transfer.pixels()
                t_model = time.perf_counter()
                p.transfer_seconds += t_model - t_transfer
                out = self._run_changed(batch, n, strength, transfer.runs, source, model)
                p.transferred = transfer.share
            p.model_seconds = time.perf_counter() - t_model
        return out, n, qp, use_bits

    def _run_regions(
        self,
        batch,
        stages: int,
        strength: float,
        rects,
        out,
        context: int = CONTEXT,
        shrink=None,
        context_map=None,
        model=None,
    ) -> None:
        """Run the network (``model``, default the main one) on half-res rectangles (y0, y1,
        x0, x1), each with ``context`` pixels around it (``shrink``: the context kept before
        each stage), into ``out``."""
        x = batch.x
        model = model or self.model
        regions = run_regions(model, batch, stages, rects, context, shrink, context_map)
        for (y0, y1, x0, x1), res in regions:
            out[:, :, y0:y1, x0:x1] = _weaken(x[:, :, y0:y1, x0:x1], res.float(), strength)

    @torch.inference_mode()
    def _run_model(self, batch, stages: int, strength: float = 1.0, model=None) -> torch.Tensor:
        model = model or self.model
        x, inp = batch.x, batch.inputs.contiguous(memory_format=torch.channels_last)
        _, _, h, w = x.shape
        tile = self.tile
        if tile is None:
            tile = 0 if h * w <= 540 * 960 else 384
        with self._amp():
            if not tile or (h <= tile and w <= tile):
                out = model(x, inp, batch.seq_cond, batch.frame_cond, stages, True)[0].float()
                return _weaken(x, out, strength)
            tile = max(32, tile // 8 * 8)
            out = torch.empty_like(x, dtype=torch.float32)
            context_map = model.context(inp)  # once for the frame, not once a tile
            for y0 in range(0, h, tile):
                for x0 in range(0, w, tile):
                    y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                    # One tile a call, not side by side: tiling is what bounds memory here.
                    tile_rect = [(y0, y1, x0, x1)]
                    self._run_regions(
                        batch,
                        stages,
                        strength,
                        tile_rect,
                        out,
                        TILE_CONTEXT,
                        None,
                        context_map,
                        model,
                    )
            return out

    @torch.inference_mode()
    def _run_changed(
        self, batch, stages: int, strength: float, runs, source, model=None
    ) -> torch.Tensor:
        """Transfer ``source`` everywhere, then run the network on the changed rectangles."""
        out = source[None]
        with self._amp():
            self._run_regions(
                batch, stages, strength, runs, out, CONTEXT, STAGE_CONTEXT, model=model
            )
        return out[0]

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
            model_seconds=p.model_seconds,
            transferred=p.transferred,
            align_seconds=p.align_seconds,
            transfer_seconds=p.transfer_seconds,
        )
        return replace(frame, planes=planes), report

    def process(
        self,
        frames: Iterable[DecodedFrame],
        info: SequenceInfo,
        stages: str | int = "auto",
        side_info: str = "auto",
    ) -> Iterator[tuple[DecodedFrame, FrameReport]]:
        """Enhance ``frames`` (display order) of a video described by ``info``.

        ``stages``: "auto" (the exit policy, per frame) or a fixed count; ``side_info``:
        "auto"/"bitstream" (what the stream gives) or "blind" (the pixels alone).
        """
        stages = self.check(stages, side_info)
        plan = input_plan(info.codec, side_info)
        # The blind path takes nothing from the bitstream, the encoder's CRF included: it
        # is what the pixels alone give, the measure of what the side information adds.
        seq_qp = None if side_info == "blind" else info.sequence_qp
        ctx = {
            "stages": stages,
            "side_info": side_info,
            "plan": plan,
            "bit_depth": info.bit_depth or 8,
            "seq_qp": seq_qp,
            "seq_known": seq_qp is not None,
            "codec": info.codec,
            # The route's own network, where the model file has one.
            "network": self.own_networks.get(
                "blind" if side_info == "blind" else info.codec, self.network
            ),
            "qp_sum": 0.0,
            "qp_n": 0,
            "estimate": self.pixel_qp.estimate(info.bit_depth or 8) if self.pixel_qp else None,
        }
        ctx["mean_qp"] = lambda: ctx["qp_sum"] / ctx["qp_n"] if ctx["qp_n"] else None
        # Options are checked here, when called, not when the first frame is pulled.
        if plan.references == "adjacent":
            return self._process_adjacent(frames, info, ctx)
        return self._process_peaks(frames, info, ctx)

    def _pending(self, frame: DecodedFrame, ctx: dict) -> _Pending:
        t0 = time.perf_counter()
        cur = planes_to_tensor(frame.planes, ctx["bit_depth"]).to(self.device)
        p = _Pending(frame, cur, t0)
        # Only where the stream says neither the frame's QP nor the encoder's CRF: the
        # network is then told a CRF estimated from the pixels of the first frames (the
        # CRF belongs to the whole sequence), and the blind exit table follows it.
        estimated = not (ctx["plan"].frame_qp and frame.side.qp is not None)
        if estimated and not ctx["seq_known"] and ctx["estimate"] is not None:
            p.pixel_crf = ctx["estimate"].add(frame.planes[0])
        if self.policy:
            qp = frame.side.qp if ctx["plan"].frame_qp else None
            if qp is not None or p.pixel_crf is not None:
                p.level = self._policy_level(qp, ctx["codec"], ctx["seq_qp"], p.pixel_crf)
        if self._grain_decides(p, ctx):
            p.grain = grain_level(frame.planes[0], ctx["bit_depth"])
        return p

    def _grain_decides(self, p: _Pending, ctx: dict) -> bool:
        """Whether the policy needs this frame's grain: its level falls where the tables for
        clean and grainy frames differ, or is not known yet."""
        if ctx["stages"] != "auto" or not self.policy or self.policy.grain_limit is None:
            return False
        return p.level is None or self.policy.grain_decides(*p.level, strength=True)

    def _process_peaks(self, frames, info, ctx):
        anchor: _Anchor | None = None
        waiting: deque[_Pending] = deque()
        for frame in frames:
            p = self._pending(frame, ctx)
            if frame.side.pict_type not in ANCHOR_TYPES and frame.side.pict_type != "?":
                waiting.append(p)
                if len(waiting) > MAX_PENDING:  # no anchor in sight: go on with the past only
                    yield self._run_one(waiting.popleft(), [anchor, None], info, ctx)
                continue
            out, n, qp, bits = self._enhance(p, [anchor, None], info, ctx)
            recurrent = ctx["network"].recurrent
            keep = out is not None and (recurrent or self.transfer)
            enhanced = _as_samples(out, ctx) if keep else None
            if out is None and self.transfer:
                # Passed through, the anchor's output is its decode: blocks that match it
                # are passed through too, as the policy judged its frame, not computed.
                enhanced = p.cur
            kept = enhanced if enhanced is not None and recurrent else p.cur
            new = _Anchor(frame.index, p.cur, kept, frame.side.qp, enhanced)
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
            p = self._pending(frame, ctx)
            nxt = _Anchor(frame.index, p.cur, p.cur, None)
            if held is not None:
                yield self._run_one(held, [prev, nxt], info, ctx)
                prev = _Anchor(held.frame.index, held.cur, held.cur, None)
            held = p
        if held is not None:
            yield self._run_one(held, [prev, None], info, ctx)
