"""The codec-aware early-exit enhancement network and the blind QP estimator.

VQENet works on the half-resolution 4:2:0 stack (see features.py) and predicts
a correction that is added to the decoded frame. Inputs, each switchable off
in ModelConfig for ablations:

- the current frame (6 channels), always;
- the past reference frame warped by the bitstream motion vectors, plus the
  validity mask (``temporal``);
- the per-macroblock QP map (``qp_map``) and partition masks (``partitions``);
- 8x8/16x16 block-edge phase masks (``phase``);
- sequence-level expert mixing from the CRF or mean QP (``experts``): the first
  conv of each stage is a softmax-weighted mix of E expert kernels;
- frame-level FiLM from frame QP, its offset from the sequence QP and the
  picture type (``frame_cond``).

The body is S stages; each ends in a light exit head producing a full
output, so inference can stop after any stage (early exit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from enhancer.features import PARTITION_CHANNELS, PHASE_CHANNELS

FRAME_COND = 6  # frame_qp, frame_qp - seq_qp, I, P, B, has_ref
SEQ_COND = 2  # seq_qp, seq_qp known from the encoder (1) or estimated (0)


@dataclass
class ModelConfig:
    channels: int = 32
    stages: int = 3
    blocks_per_stage: int = 2
    experts: int = 4
    temporal: bool = True
    qp_map: bool = True
    partitions: bool = True
    phase: bool = True
    use_experts: bool = True
    frame_cond: bool = True

    def in_channels(self) -> int:
        n = 6
        if self.temporal:
            n += 6 + 1
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


class ExpertConv(nn.Module):
    """3x3 conv whose kernel is a per-sample convex mix of E expert kernels."""

    def __init__(self, channels: int, experts: int):
        super().__init__()
        self.channels = channels
        w = torch.empty(experts, channels, channels, 3, 3)
        for e in range(experts):
            nn.init.kaiming_normal_(w[e], nonlinearity="relu")
        self.weight = nn.Parameter(w * 0.5)
        self.bias = nn.Parameter(torch.zeros(experts, channels))

    def forward(self, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if b == 1 or bool((mix == mix[:1]).all()):
            weight = torch.einsum("e,eoikl->oikl", mix[0], self.weight)
            return F.conv2d(x, weight, mix[0] @ self.bias, padding=1)
        weight = torch.einsum("be,eoikl->boikl", mix, self.weight).reshape(b * c, c, 3, 3)
        bias = (mix @ self.bias).reshape(b * c)
        y = F.conv2d(x.reshape(1, b * c, h, w), weight, bias, padding=1, groups=b)
        return y.reshape(b, c, h, w)


class Stage(nn.Module):
    """Residual blocks with frame-level FiLM and an exit head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.entry = ExpertConv(c, cfg.experts) if cfg.use_experts else nn.Conv2d(c, c, 3, 1, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, 1, 1))
            for _ in range(cfg.blocks_per_stage)
        )
        self.film = nn.Linear(32, 2 * c) if cfg.frame_cond else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.head = nn.Conv2d(c, 6, 3, 1, 1)
        # Small but not zero: a zero head passes no gradient to the body, and the
        # model then sits at the identity (seen in the first training run).
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, feat, mix, frame_emb):
        f = self.entry(feat, mix) if self.cfg.use_experts else self.entry(feat)
        f = F.relu(f, inplace=True)
        if self.film is not None:
            gamma, beta = self.film(frame_emb).chunk(2, dim=1)
            f = f * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
        for blk in self.blocks:
            f = f + blk(f)
        return feat + f, self.head(f)


class VQENet(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        c = cfg.channels
        self.inp = nn.Conv2d(cfg.in_channels(), c, 3, 1, 1)
        self.stages = nn.ModuleList(Stage(cfg) for _ in range(cfg.stages))
        self.mixer = nn.Sequential(nn.Linear(SEQ_COND, 32), nn.ReLU(), nn.Linear(32, cfg.experts))
        self.frame_mlp = nn.Sequential(nn.Linear(FRAME_COND + SEQ_COND, 32), nn.ReLU())

    def assemble(self, x, ref, ref_mask, qmap, parts, phase) -> torch.Tensor:
        """Concatenate the enabled inputs (all (B, *, h, w)) into the stem's input."""
        cfg = self.cfg
        items = [x]
        if cfg.temporal:
            items += [ref, ref_mask]
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
    ) -> list[torch.Tensor]:
        """Return the outputs of stages 1..``stages`` (each x + correction, unclipped)."""
        n = self.cfg.stages if stages is None else max(1, min(stages, self.cfg.stages))
        mix = torch.softmax(self.mixer(seq_cond), dim=1)
        emb = self.frame_mlp(torch.cat([frame_cond, seq_cond], 1))
        feat = F.relu(self.inp(inputs), inplace=True)
        outs = []
        for stage in self.stages[:n]:
            feat, corr = stage(feat, mix, emb)
            outs.append(x + corr)
        return outs


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
