"""The encoder's CRF estimated from the decoded pixels, for streams that carry none.

Streams without x264/x265's options SEI (hardware encoders, remuxed or
re-encoded streams) and without a frame QP give the network nothing to tell
light compression from heavy: its own QP estimator collapsed to a constant in
training, and run unconditioned it loses 2 dB at CRF 15. This small CNN reads
the luma plane (grid-aligned, so it sees the 4x4 and 8x8 transform grid) and
predicts the QP of every 8x8 block; their mean over a frame is its QP.

The engine turns the running mean of those frame QPs into a CRF that it
hands the network as if the stream had said it, lowered by ``offset``: the
network over-corrects badly when told a CRF above the true one and only
gains less when told one below, so the estimate errs low. The blind exit
table is calibrated on that estimate (enhancer.training.recalibrate).

It is trained by ``python -m enhancer.training.fit_pixel_qp`` and stored in
the model file as an entry of its own (``to_state``: its config and fp16
state dict; model format 2, vqe-v3.pt, kept it base64 in the exit policy's
``blind_qp``: ``from_dict`` reads that, and a JSON file of fit_pixel_qp's).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from enhancer.features import autocast, cpu_has_bf16

TILE = 128  # luma pixels per tile edge (a multiple of the 16-pixel macroblock)
TILES = 6  # tiles a frame is sampled at (the CRF belongs to the whole sequence)
ESTIMATE_FRAMES = 32  # the engine's estimate is the mean over a stream's first frames
QP_MIN, QP_MAX = 0.0, 51.0
_BF16 = cpu_has_bf16()


class PixelQPNet(nn.Module):
    """(B, 1, H, W) luma in [0, 1], H and W multiples of 8 -> (B, 1, H/8, W/8) QP."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = self.width = width
        self.body = nn.Sequential(
            nn.Conv2d(2, w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(w, w, 4, 4, 0), nn.ReLU(),  # one step per 4x4 transform block
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 2, 2, 0), nn.ReLU(),  # per 8x8 block
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 1, 1),
        )  # fmt: skip

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # The high-pass carries what quantisation removed; scaled to the range of the luma.
        high = y - F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, 1)
        return self.body(torch.cat([y - 0.5, high * 8], 1)) * 10 + 35


def tiles(y: np.ndarray, count: int = TILES, size: int = TILE) -> np.ndarray:
    """Up to ``count`` grid-aligned size x size tiles of a luma plane, spread over it
    (the whole plane, cut to whole macroblocks, when it is smaller than a tile)."""
    h, w = y.shape
    if h < size or w < size:
        hh, ww = max(h // 16 * 16, 16), max(w // 16 * 16, 16)
        return y[:hh, :ww][None]
    rows = np.unique(np.linspace(0, (h - size) // 16, 2).round().astype(int) * 16)
    cols = np.unique(np.linspace(0, (w - size) // 16, max(count // 2, 1)).round().astype(int) * 16)
    return np.stack([y[r : r + size, c : c + size] for r in rows for c in cols][:count])


class PixelQP:
    """A trained PixelQPNet and the margin its CRF estimate keeps below the QP."""

    def __init__(self, net: PixelQPNet | None = None, offset: float = 9.0):
        self.net = net.eval() if net is not None else None
        self.offset = offset

    def __bool__(self) -> bool:
        return self.net is not None

    def frame_qp(self, y: np.ndarray, bit_depth: int = 8) -> float:
        """Mean QP the network reads in tiles of one luma plane (8-bit scale)."""
        if bit_depth > 8:  # trained on 8-bit samples
            y = y >> (bit_depth - 8)
        t = torch.from_numpy(tiles(y).astype(np.float32) / 255.0)[:, None]
        with torch.inference_mode(), autocast("cpu", enabled=_BF16):
            qp = self.net(t.contiguous(memory_format=torch.channels_last)).float().mean()
        return float(np.clip(float(qp), QP_MIN, QP_MAX))

    def crf(self, frame_qps: list[float] | float) -> float:
        """The CRF handed to the network for a sequence whose frames read ``frame_qps``."""
        return float(np.clip(np.mean(frame_qps) - self.offset, QP_MIN, QP_MAX))

    def estimate(self, bit_depth: int = 8) -> CRFEstimate:
        """A running estimate for one stream, fed its luma planes in order."""
        return CRFEstimate(self, bit_depth)

    def told_crfs(self, lumas, bit_depth: int = 8) -> list[float]:
        """The CRF told on each frame of a stream whose luma planes are ``lumas``."""
        est = self.estimate(bit_depth)
        return [est.add(y) for y in lumas]

    def to_state(self) -> dict | None:
        """The model file's entry: config and fp16 state dict (None without a network)."""
        if self.net is None:
            return None
        weights = {k: v.half() for k, v in self.net.state_dict().items()}
        return {"config": {"width": self.net.width, "offset": self.offset}, "weights": weights}

    @classmethod
    def from_state(cls, d: dict | None) -> PixelQP:
        """From ``to_state`` (an empty PixelQP for None)."""
        if not d:
            return cls()
        return cls._of(int(d["config"]["width"]), d["weights"], float(d["config"]["offset"]))

    def to_dict(self) -> dict:
        """JSON-safe: the fp16 weights as base64 (fit_pixel_qp's files; model format 2)."""
        if self.net is None:
            return {}
        buf = io.BytesIO()
        torch.save(self.to_state()["weights"], buf)
        return {
            "kind": "cnn",
            "width": self.net.width,
            "offset": self.offset,
            "weights": base64.b64encode(buf.getvalue()).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> PixelQP:
        """An empty PixelQP for no dict (or the ridge statistics of vqe-v3's first release)."""
        if not d or d.get("kind") != "cnn":
            return cls()
        state = torch.load(io.BytesIO(base64.b64decode(d["weights"])), weights_only=True)
        return cls._of(int(d["width"]), state, float(d["offset"]))

    @classmethod
    def _of(cls, width: int, state: dict, offset: float) -> PixelQP:
        net = PixelQPNet(width)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(net.to(memory_format=torch.channels_last), offset)


class CRFEstimate:
    """One stream's running CRF estimate: the frame QPs of its first ESTIMATE_FRAMES frames."""

    def __init__(self, pixel_qp: PixelQP, bit_depth: int = 8):
        self.pixel_qp, self.bit_depth = pixel_qp, bit_depth
        self.qps: list[float] = []

    @property
    def full(self) -> bool:
        return len(self.qps) >= ESTIMATE_FRAMES

    def add(self, y: np.ndarray) -> float:
        """Read one more luma plane (ignored once full); the CRF told from here on."""
        if not self.full:
            self.qps.append(self.pixel_qp.frame_qp(y, self.bit_depth))
        return self.pixel_qp.crf(self.qps)
