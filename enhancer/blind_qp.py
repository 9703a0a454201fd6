"""Frame QP from the decoded pixels alone, for the blind path's early-exit policy.

The blind path has no QP from the bitstream. The network's learned estimator
reads a constant (the network was trained with it and is calibrated on it), so
on its own the exit policy would treat a CRF-15 frame like a CRF-35 one and
over-correct it. This estimate only steers the policy (stages, strength,
pass-through); it is never fed to the network.

It is a ridge regression on a few statistics of the luma plane that
compression changes: detail left at several scales, the steps on the 4x4 and
8x8 transform grid against those inside the blocks, the share of flat blocks,
the share of blocks copied unchanged from the previous frame, and the energy
of the high 4x4 DCT coefficients. It is fitted on encodes of the training
sources (enhancer.training.fit_blind_qp) and stored with the exit policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The 4x4 DCT-II basis (orthonormal); its high band is where quantisation bites first.
_K = np.arange(4)
_DCT = np.sqrt(np.where(_K[:, None] == 0, 0.25, 0.5)) * np.cos(
    np.pi * (2 * _K[None, :] + 1) * _K[:, None] / 8
)
_HIGH = (_K[:, None] + _K[None, :]) >= 4  # of the 16 coefficients: u + v >= 4
_EPS = 1e-3


def _blocks(y: np.ndarray, n: int) -> np.ndarray:
    h, w = (y.shape[0] // n) * n, (y.shape[1] // n) * n
    return y[:h, :w].reshape(h // n, n, w // n, n).transpose(0, 2, 1, 3)


def _grid_ratio(d: np.ndarray, n: int) -> float:
    """Mean step across every n-th boundary over the mean step elsewhere (log)."""
    cols = np.arange(d.shape[1])
    on = (cols + 1) % n == 0
    return float(np.log((d[:, on].mean() + _EPS) / (d[:, ~on].mean() + _EPS)))


def frame_features(y: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
    """Statistics of one decoded luma plane (and the previous one, if any)."""
    f = y.astype(np.float32)
    dh = np.abs(np.diff(f, axis=1))
    dv = np.abs(np.diff(f, axis=0))
    lap = np.abs(4 * f[1:-1, 1:-1] - f[:-2, 1:-1] - f[2:, 1:-1] - f[1:-1, :-2] - f[1:-1, 2:])
    half = f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2]
    half = half.reshape(half.shape[0] // 2, 2, half.shape[1] // 2, 2).mean((1, 3))
    dh2 = np.abs(np.diff(half, axis=1))
    b4 = _blocks(f, 4)
    var4 = b4.var(axis=(2, 3))
    coef = _DCT.astype(np.float32) @ b4 @ _DCT.T.astype(np.float32)  # per 4x4 block
    ac = (coef**2).sum((2, 3)) - coef[:, :, 0, 0] ** 2
    high = (coef**2 * _HIGH).sum((2, 3))
    if prev is not None and prev.shape == y.shape:
        same = np.abs(_blocks(f, 4) - _blocks(prev.astype(np.float32), 4)).max(axis=(2, 3))
        copied, near, motion = float((same == 0).mean()), float((same <= 2).mean()), 1.0
        tdiff = float(np.log(np.abs(f - prev).mean() + _EPS))
    else:
        copied = near = motion = tdiff = 0.0
    return np.array(
        [
            np.log(dh.mean() + dv.mean() + _EPS),
            np.log(lap.mean() + _EPS),
            np.log(np.median(lap) + _EPS),
            np.log(dh2.mean() + _EPS),
            np.log(f.std() + _EPS),
            _grid_ratio(dh, 4),
            _grid_ratio(dv.T, 4),
            _grid_ratio(dh, 8),
            _grid_ratio(dv.T, 8),
            float((var4 < 0.5).mean()),
            float((var4 < 2).mean()),
            float((var4 < 8).mean()),
            np.log(high.mean() + _EPS) - np.log(ac.mean() + _EPS),
            float(np.mean(high < 1.0)),
            copied,
            near,
            tdiff,
            motion,
        ],
        dtype=np.float64,
    )


@dataclass
class BlindQP:
    """Ridge regression from ``frame_features`` to frame QP."""

    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # last one: the intercept

    def __bool__(self) -> bool:
        return bool(self.weights)

    def predict(self, features: np.ndarray) -> float:
        z = (np.asarray(features) - np.asarray(self.mean)) / np.asarray(self.scale)
        w = np.asarray(self.weights)
        return float(np.clip(z @ w[:-1] + w[-1], 0.0, 51.0))

    @classmethod
    def fit(cls, features: np.ndarray, qps: np.ndarray, ridge: float = 1.0) -> BlindQP:
        mean, scale = features.mean(0), features.std(0) + 1e-6
        z = np.hstack([(features - mean) / scale, np.ones((len(features), 1))])
        reg = ridge * np.eye(z.shape[1])
        reg[-1, -1] = 0.0
        w = np.linalg.solve(z.T @ z + reg, z.T @ qps)
        return cls(mean.tolist(), scale.tolist(), w.tolist())

    def to_dict(self) -> dict:
        return {"mean": self.mean, "scale": self.scale, "weights": self.weights}

    @classmethod
    def from_dict(cls, d: dict | None) -> BlindQP:
        return cls(**d) if d else cls()
