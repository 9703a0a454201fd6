"""enhancer.blind_qp: pixel statistics and the ridge fit behind the blind path's policy."""

from __future__ import annotations

import io

import numpy as np
import pytest

from enhancer.blind_qp import BlindQP, frame_features
from enhancer.checkpoint import load_model
from enhancer.training.data import EncodeSettings, encode_planes
from tests.enhancer.tiny import decode


def _texture(t: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A deterministic detailed picture that pans one pixel per frame."""
    rng = np.random.default_rng(3)
    base = rng.normal(128, 40, (h // 4 + 4, w // 4 + 4)).repeat(4, 0).repeat(4, 1)
    yy, xx = np.mgrid[0 : base.shape[0], 0 : base.shape[1]]
    base = base + 25 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + rng.normal(0, 6, base.shape)
    return np.clip(base[2 : 2 + h, t : t + w], 0, 255).astype(np.uint8)


def test_features_are_finite_and_see_copied_blocks():
    y = _texture(0)
    alone, same = frame_features(y, None), frame_features(y, y)
    assert alone.shape == same.shape and np.isfinite(alone).all() and np.isfinite(same).all()
    names_at = {"copied": 14, "near": 15, "motion": 17}
    assert alone[names_at["motion"]] == 0 and same[names_at["motion"]] == 1
    assert same[names_at["copied"]] == 1.0 and same[names_at["near"]] == 1.0
    moved = frame_features(_texture(1), y)
    assert moved[names_at["copied"]] < 0.5
    assert frame_features(y, y[:-16]).tolist() == alone.tolist()  # another size: no previous


def test_fit_recovers_a_linear_relation_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    qp = 30 + x @ np.array([3.0, -2.0, 0.0, 1.0, 0.5])
    est = BlindQP.fit(x, qp, ridge=1e-6)
    assert est and not BlindQP()
    assert abs(est.predict(x[0]) - qp[0]) < 1e-3
    assert est.predict(np.full(5, 100.0)) == 51.0  # clamped to the H.264 range
    assert BlindQP.from_dict(est.to_dict()) == est
    assert not BlindQP.from_dict(None) and not BlindQP.from_dict({})


def test_shipped_estimate_orders_light_and_heavy_compression():
    """The shipped estimate, on a clip it never saw: CRF 18 reads lower than CRF 40."""
    _, _, policy, _ = load_model()
    est = BlindQP.from_dict(policy.blind_qp)
    if not est:
        pytest.fail("the shipped model file has no blind QP estimate")
    grey = np.full((48, 64), 128, np.uint8)
    clean = [(_texture(t), grey, grey) for t in range(8)]
    means = {}
    for crf in (18, 40):
        _, frames = decode(io.BytesIO(encode_planes(clean, EncodeSettings(crf=crf))))
        ys = [f.planes[0] for f in frames]
        means[crf] = np.mean([
            est.predict(frame_features(y, ys[i - 1] if i else None)) for i, y in enumerate(ys)
        ])  # fmt: skip
    assert means[18] + 5 < means[40]
