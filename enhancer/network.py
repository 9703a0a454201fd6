"""The early-exit enhancement network (v2) and the blind QP estimator.

VQENet works on the half-resolution 4:2:0 stack (see features.py) and predicts
a correction that is added to the decoded frame. Inputs, each switchable off
in ModelConfig for ablations:

- the current frame (6 channels), always;
- two references aligned to it (``references``, see references.py): the
  quality-peak anchors before and after it (codec-aware path) or the
  adjacent frames (blind path), each given as its difference to the current
  frame plus the per-block matching cost, so the network can tell a good
  match from a bad one;
- the per-macroblock QP map (``qp_map``) and partition masks (``partitions``);
- 8x8/16x16 block-edge phase masks (``phase``);
- frame-level FiLM (``frame_cond``) from the frame QP, its offset from the
  sequence QP (CRF), the picture type and each reference's QP offset, which
  tells the network how far to trust a reference;
- optionally (``coarse`` > 0) a coarse context branch: the inputs pooled to an
  eighth and a sixteenth of the luma resolution, a few wide convolutions there
  (a few per cent of the body's work) and their output added to the stem's
  features. It widens the receptive field from about 50 luma pixels to over
  200 (the scale of smooth regions whose blocking shows most), and it is
  computed on the whole frame, so crops (transfer, tiling) see the same
  context as the frame.

The body is S stages of residual blocks; each ends in a light exit head that
gives a full output, so inference can stop after any stage (early exit).
Plain 3x3 convolutions and ReLUs only: they run fast in bf16 with
channels_last on CPUs with AMX and on GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from enhancer.features import PARTITION_CHANNELS, PHASE_CHANNELS

# frame_qp, frame_qp - seq_qp, I, P, B, has_past, has_future, past QP - frame QP,
# future QP - frame QP, reference QPs known
FRAME_COND = 10
SEQ_COND = 2  # seq_qp, seq_qp known from the encoder (1) or estimated (0)
REFERENCES = 2  # past and future
EMBED = 32


def _onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused oneDNN convolution would run ``x`` in, or None where it does not
    apply: training (autograd), other devices, layouts other than channels_last."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or not torch.backends.mkldnn.enabled:
        return None
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 else None
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None


def _same(a, b) -> bool:
    """Tensors by identity (== on tensors compares values), the rest by value."""
    return a is b if isinstance(a, torch.Tensor) else a == b


def _packed(conv: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's own blocked layout: a plain one is reordered on every call,
    about 40 us a convolution, which on the small crops transfer leaves (17 convolutions
    a call, several calls a frame) was 15-40 % of a crop's time. The layout does not
    depend on the input's size (checked equal on 8x8 to 136x320 maps, bf16 and fp32)."""
    size = [1, conv.in_channels, 32, 32]
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups, size
        )
    except RuntimeError:  # a build without it: the plain weight still works
        return weight


def _weights(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight (packed for oneDNN) and bias in ``dtype``, made once per change of
    the weights (a cast per call, as autocast does, cost as much as a small crop's
    convolution).

    The cache holds the parameters it was cast from and their versions: a replaced
    parameter (``to()``, a new ``nn.Parameter``) or an in-place update renews it.
    """
    weight, bias = conv.weight, conv.bias
    key = (dtype, weight, weight._version, bias, None if bias is None else bias._version)
    cached = conv.__dict__.get("_onednn_weights")
    if cached is None or not all(map(_same, cached[0], key)):
        cast_bias = None if bias is None else bias.detach().to(dtype)
        cached = (key, _packed(conv, weight.detach().to(dtype)), cast_bias)
        conv.__dict__["_onednn_weights"] = cached
    return cached[1], cached[2]


def conv3x3(
    conv: nn.Conv2d, x: torch.Tensor, relu: bool = False, add_to: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv(x)``, then ReLU (``relu``) or added in place to ``add_to``.

    On the CPU at inference, oneDNN applies the ReLU or the add as it writes the
    convolution's output (post-ops): each saves a pass over the feature map, which at
    720p (64 channels of 640x360) does not fit in cache: 10-15 % of the network's time.
    Elsewhere, the same arithmetic unfused.
    """
    dtype = _onednn_dtype(x)
    if dtype is None or (add_to is not None and add_to.dtype != dtype):
        y = conv(x)
        if add_to is not None:
            return add_to.add_(y) if not torch.is_grad_enabled() else add_to + y
        return F.relu(y, inplace=True) if relu else y
    w, b = _weights(conv, dtype)
    x = x.to(dtype)
    args = (conv.padding, conv.stride, conv.dilation, conv.groups)
    if add_to is not None:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            add_to, x, w, b, *args, "add", None, None, [], None
        )
    return torch.ops.mkldnn._convolution_pointwise(
        x, w, b, *args, "relu" if relu else "none", [], ""
    )


@dataclass
class ModelConfig:
    channels: int = 48
    stages: int = 3
    blocks_per_stage: int = 2
    references: bool = True
    qp_map: bool = True
    partitions: bool = True
    phase: bool = True
    frame_cond: bool = True
    coarse: int = 0  # channels of the coarse context branch at 1/8 luma; 0: none

    def in_channels(self) -> int:
        n = 6
        if self.references:
            n += REFERENCES * (6 + 1)
        if self.qp_map:
            n += 1
        if self.partitions:
            n += PARTITION_CHANNELS
        if self.phase:
            n += PHASE_CHANNELS
        return n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _res_block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, 1, 1))


class Stage(nn.Module):
    """Residual blocks with frame-level FiLM and an exit head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.channels
        self.entry = nn.Conv2d(c, c, 3, 1, 1)
        self.blocks = nn.ModuleList(_res_block(c) for _ in range(cfg.blocks_per_stage))
        self.film = nn.Linear(EMBED, 2 * c) if cfg.frame_cond else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.head = nn.Conv2d(c, 6, 3, 1, 1)
        # Small but not zero: a zero head passes no gradient to the body.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, feat: torch.Tensor, frame_emb: torch.Tensor, head: bool = True):
        f = conv3x3(self.entry, feat, relu=True)
        if self.film is not None:
            gamma, beta = self.film(frame_emb).to(f.dtype).chunk(2, dim=1)
            # One pass over the feature map instead of two (a multiply, then an add).
            f = torch.addcmul(beta[:, :, None, None], f, 1.0 + gamma[:, :, None, None])
        for blk in self.blocks:
            # In place at inference (no new map); autograd needs f as it was.
            f = conv3x3(blk[2], conv3x3(blk[0], f, relu=True), add_to=f)
        return feat + f, conv3x3(self.head, f) if head else None


class CoarseContext(nn.Module):
    """Context from a quarter and an eighth of the half-resolution grid, returned at the
    half resolution for adding to the stem's features. The last convolution starts at
    zero, so a network warm-started from one without this branch begins unchanged."""

    POOL = 4

    def __init__(self, in_channels: int, c: int, out_channels: int):
        super().__init__()
        c2 = 2 * c
        self.entry = nn.Conv2d(in_channels, c, 3, 1, 1)
        self.block = _res_block(c)
        self.down = nn.Conv2d(c, c2, 3, 2, 1)
        self.low = nn.ModuleList(_res_block(c2) for _ in range(2))
        self.up = nn.Conv2d(c2, c, 1)
        self.fuse = nn.Conv2d(c, c, 3, 1, 1)
        self.out = nn.Conv2d(c, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h, w = inputs.shape[2:]
        a = F.avg_pool2d(inputs, self.POOL, ceil_mode=True)
        a = conv3x3(self.entry, a, relu=True)
        a = conv3x3(self.block[2], conv3x3(self.block[0], a, relu=True), add_to=a)
        b = conv3x3(self.down, a, relu=True)
        for blk in self.low:
            b = conv3x3(blk[2], conv3x3(blk[0], b, relu=True), add_to=b)
        b = F.interpolate(self.up(b), size=a.shape[2:], mode="nearest")
        a = conv3x3(self.fuse, a + b, relu=True)
        # Nearest, not bilinear (6x the time at 720p): the body's convolutions smooth it.
        return F.interpolate(self.out(a), size=(h, w), mode="nearest")


class VQENet(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.inp = nn.Conv2d(cfg.in_channels(), cfg.channels, 3, 1, 1)
        self.coarse = (
            CoarseContext(cfg.in_channels(), cfg.coarse, cfg.channels) if cfg.coarse else None
        )
        self.stages = nn.ModuleList(Stage(cfg) for _ in range(cfg.stages))
        self.frame_mlp = nn.Sequential(nn.Linear(FRAME_COND + SEQ_COND, EMBED), nn.ReLU())

    def assemble(self, x, refs, costs, qmap, parts, phase) -> torch.Tensor:
        """Concatenate the enabled inputs (all (B, *, h, w)) into the stem's input.

        ``refs`` (B, 2, 6, h, w) aligned references, ``costs`` (B, 2, 1, h, w).
        """
        cfg = self.cfg
        items = [x]
        if cfg.references:
            for r in range(REFERENCES):
                items += [refs[:, r] - x, costs[:, r]]
        if cfg.qp_map:
            items.append(qmap)
        if cfg.partitions:
            items.append(parts)
        if cfg.phase:
            items.append(phase.expand(x.shape[0], -1, -1, -1))
        return torch.cat(items, 1)

    def forward(
        self,
        x: torch.Tensor,
        inputs: torch.Tensor,
        seq_cond: torch.Tensor,
        frame_cond: torch.Tensor,
        stages: int | None = None,
        last_only: bool = False,
        between: Callable | None = None,
        context: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Return the outputs of stages 1..``stages`` (each x + correction, unclipped);
        with ``last_only`` just the last one's (the heads of the others are not run).

        ``between(k, feat, x) -> (feat, x)`` runs before every stage k >= 1: at inference
        on crops it cuts the context later stages do not need (enhancer.regions).
        ``context``: the coarse branch's output for these pixels, where the caller cut
        them from a whole frame's (``self.context(whole inputs)``); None computes it from
        ``inputs``.
        """
        n = self.cfg.stages if stages is None else max(1, min(stages, self.cfg.stages))
        if not self.cfg.frame_cond:
            frame_cond = torch.zeros_like(frame_cond)
        emb = self.frame_mlp(torch.cat([frame_cond, seq_cond], 1))
        feat = conv3x3(self.inp, inputs, relu=True)
        if self.coarse is not None:
            ctx = self.context(inputs) if context is None else context
            feat = feat.add_(ctx.to(feat.dtype)) if not torch.is_grad_enabled() else feat + ctx
        outs = []
        for i, stage in enumerate(self.stages[:n]):
            if between is not None and i > 0:
                feat, x = between(i, feat, x)
            feat, corr = stage(feat, emb, head=not last_only or i == n - 1)
            if corr is not None:
                outs.append(x + corr.to(x.dtype))
        return outs

    def context(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The coarse branch's output on ``inputs`` (None without one)."""
        return None if self.coarse is None else self.coarse(inputs)


class QPEstimator(nn.Module):
    """Blind degradation estimator: predicts the per-macroblock QP map (/51) from pixels."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(6 + PHASE_CHANNELS, w, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """(B, 6, h, w) -> (B, 1, h/8, w/8): one value per 16x16 macroblock."""
        return self.net(torch.cat([x, phase.expand(x.shape[0], -1, -1, -1)], 1)) + 0.6
