"""Tiny models, inputs and weight files shared by the enhancer unit tests (not a test module).

Everything is 8 channels wide and runs on one torch thread, so the tests stay
cheap on a two-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bitstream.reader import open_video
from enhancer.batch import FrameInputs, Reference, collate
from enhancer.checkpoint import save_model
from enhancer.features import PARTITION_CHANNELS
from enhancer.network import ModelConfig, QPEstimator, VQENet
from enhancer.pixel_qp import PixelQP, PixelQPNet
from enhancer.policy import ExitPolicy, ExitTable

H, W = 16, 24  # half-resolution model grid of the model tests (luma 32x48)

# One stage count per DEFAULT_EDGES bin: the test clip's frame QPs (about 26-32) fall
# in bins 2-4, so a clip gets 1, 0 and 2 stages.
POLICY_STAGES = [3, 3, 1, 0, 2, 3, 3, 3, 3]
# CRF 27 -> bin 2 -> 3 stages, where the H.264 table (by frame QP) says fewer.
HEVC_STAGES = [3, 3, 3, 1, 0, 0, 0, 0, 0]


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(channels=8, stages=3, blocks_per_stage=1, **kw)


def tiny_model(seed: int = 0, **kw) -> VQENet:
    """A tiny model with non-trivial exit heads and FiLM, so every input can matter."""
    torch.manual_seed(seed)
    model = VQENet(tiny_cfg(**kw)).eval()
    with torch.no_grad():
        for stage in model.stages:
            nn.init.normal_(stage.head.weight, std=0.01)  # corrections of a few grey levels
            if stage.film is not None:
                nn.init.normal_(stage.film.weight, std=0.1)
        if model.coarse is not None:  # it starts at zero output: make it matter
            nn.init.normal_(model.coarse.out.weight, std=1.0)
    return model


def tiny_policy(**tables: ExitTable) -> ExitPolicy:
    """POLICY_STAGES for H.264, HEVC_STAGES for HEVC, and ``tables`` by kind."""
    aware = {
        "h264": ExitTable(stages=list(POLICY_STAGES)),
        "hevc": ExitTable(stages=list(HEVC_STAGES)),
    }
    return ExitPolicy(aware | tables, max_stages=3)


def write_weights(
    path: Path,
    policy: ExitPolicy | None = None,
    seed: int = 0,
    pixel_qp: PixelQP | None = None,
    coarse: int = 0,
) -> Path:
    """An exported tiny model file (8 channels, 3 stages; ``coarse`` its coarse branch's
    channels) for the engine."""
    torch.manual_seed(seed)
    model, est = tiny_model(seed, coarse=coarse), QPEstimator().eval()
    save_model(path, model, est, policy, {"version": "tiny"}, pixel_qp)
    return path


def reference(seed: int, qp: float | None, h: int = H, w: int = W) -> Reference:
    g = torch.Generator().manual_seed(seed)
    return Reference(torch.rand(6, h, w, generator=g), torch.rand(1, h, w, generator=g), qp)


def item(seed: int = 0, **overrides) -> FrameInputs:
    """Full side information for one (6, H, W) B-frame; ``overrides`` replace fields."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.zeros(PARTITION_CHANNELS, H, W)
    parts[torch.randint(0, PARTITION_CHANNELS, (1,), generator=g)] = 1.0
    fields_ = dict(
        cur=torch.rand(6, H, W, generator=g),
        refs=[reference(seed + 100, 28.0), reference(seed + 200, 32.0)],
        qmap=torch.full((1, H, W), 30 / 51),
        parts=parts,
        frame_qp=30.0,
        pict_type="B",
        seq_qp=28.0,
        seq_known=True,
    )
    fields_.update(overrides)
    return FrameInputs(**fields_)


def run(model: VQENet, items: list[FrameInputs], stages: int | None = None):
    batch = collate(items, model, QPEstimator().eval())
    with torch.no_grad():
        return batch, model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, stages)


def decode(path):
    with open_video(path) as reader:
        return reader.info, list(reader)


def same_planes(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def constant_pixel_qp(qp: float, offset: float = 8.0) -> PixelQP:
    """A pixel CRF estimate whose network reads ``qp`` everywhere."""
    net = PixelQPNet(8)
    with torch.no_grad():
        last = net.body[-1]
        last.weight.zero_()
        last.bias.fill_((qp - 35) / 10)
    return PixelQP(net, offset)
