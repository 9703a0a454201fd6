"""enhancer.pixel_qp: the CRF-from-pixels estimate behind the blind path without a CRF."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from enhancer.checkpoint import load_model
from enhancer.pixel_qp import ESTIMATE_FRAMES, TILE, PixelQP, PixelQPNet, tiles
from enhancer.training.data import EncodeSettings, encode_planes
from enhancer.training.fit_pixel_qp import train
from tests.enhancer.tiny import constant_pixel_qp, decode, tiny_policy, write_weights


def _texture(t: int, h: int = 160, w: int = 224) -> np.ndarray:
    """A deterministic detailed picture that pans one pixel per frame."""
    rng = np.random.default_rng(3)
    base = rng.normal(128, 40, (h // 4 + 4, w // 4 + 4)).repeat(4, 0).repeat(4, 1)
    yy, xx = np.mgrid[0 : base.shape[0], 0 : base.shape[1]]
    base = base + 25 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + rng.normal(0, 6, base.shape)
    return np.clip(base[2 : 2 + h, t : t + w], 0, 255).astype(np.uint8)


def test_tiles_are_grid_aligned_and_cover_small_planes():
    y = np.arange(360 * 640, dtype=np.int64).reshape(360, 640)  # each value: its position
    t = tiles(y)
    assert t.shape == (6, TILE, TILE)
    corners = [divmod(int(tile[0, 0]), 640) for tile in t]
    for (r, c), tile in zip(corners, t, strict=True):  # on the 16-pixel macroblock grid
        assert r % 16 == 0 and c % 16 == 0
        assert (y[r : r + TILE, c : c + TILE] == tile).all()
    # Spread over the plane: both edges are reached (to within a macroblock).
    assert min(r for r, _ in corners) == 0 and max(r for r, _ in corners) + TILE > 360 - 16
    assert min(c for _, c in corners) == 0 and max(c for _, c in corners) + TILE > 640 - 16
    small = tiles(np.zeros((72, 100), np.uint8))
    assert small.shape == (1, 64, 96)


def test_estimate_round_trips_as_json_and_errs_low_by_its_offset():
    est = constant_pixel_qp(30.0, offset=6.0)
    d = json.loads(json.dumps(est.to_dict()))
    back = PixelQP.from_dict(d)
    y = _texture(0)
    assert back and back.offset == 6.0
    assert back.frame_qp(y) == pytest.approx(30.0, abs=0.2)
    assert back.crf([30.0, 32.0]) == pytest.approx(25.0)
    assert back.frame_qp((y.astype(np.uint16) << 2), bit_depth=10) == pytest.approx(30.0, abs=0.2)
    # No estimate, or the ridge statistics of an earlier release: none.
    assert not PixelQP.from_dict(None) and not PixelQP.from_dict({"mean": [0.0]})
    assert PixelQP().to_dict() == {}


def test_estimate_round_trips_as_a_model_file_entry(tmp_path):
    """The model file's entry: config and fp16 state dict, read back with weights_only;
    the same weights as through the base64 JSON of model format 2."""
    est = constant_pixel_qp(30.0, offset=6.0)
    state = est.to_state()
    assert state["config"] == {"width": 8, "offset": 6.0}
    assert all(v.dtype == torch.float16 for v in state["weights"].values())
    torch.save(state, tmp_path / "entry.pt")
    back = PixelQP.from_state(torch.load(tmp_path / "entry.pt", weights_only=True))
    old = PixelQP.from_dict(est.to_dict())
    for k, v in old.net.state_dict().items():
        assert torch.equal(back.net.state_dict()[k], v)
    y = _texture(0)
    assert back.offset == 6.0 and back.frame_qp(y) == old.frame_qp(y)
    assert PixelQP().to_state() is None and not PixelQP.from_state(None)
    # Stored by save_model beside the policy, not in it.
    write_weights(tmp_path / "m.pt", tiny_policy(), pixel_qp=est)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "blind_qp" not in blob["policy"] and blob["pixel_qp"]["config"]["width"] == 8
    assert load_model(tmp_path / "m.pt").pixel_qp.frame_qp(y) == old.frame_qp(y)


class _MeanReads(PixelQP):
    """Reads a plane's mean brightness / 4 as its QP: frames that read apart, knowably."""

    def frame_qp(self, y: np.ndarray, bit_depth: int = 8) -> float:
        return float((y >> (bit_depth - 8)).mean() / 4)


def test_running_estimate_reads_the_first_frames_only():
    est = _MeanReads(PixelQPNet(4), offset=2.0)
    lumas = [np.full((64, 64), 40 + 4 * t, np.uint8) for t in range(ESTIMATE_FRAMES + 3)]
    qps = [10 + t for t in range(len(lumas))]
    told = est.told_crfs(lumas)  # frame t is told the mean of frames 0..t, up to the limit
    assert told == pytest.approx([est.crf(qps[: t + 1]) for t in range(ESTIMATE_FRAMES)]
                                 + [est.crf(qps[:ESTIMATE_FRAMES])] * 3)  # fmt: skip
    assert told[0] == pytest.approx(8.0)
    ten = est.estimate(bit_depth=10)  # 10-bit planes read on their 8-bit scale
    assert ten.add(lumas[1].astype(np.uint16) << 2) == pytest.approx(9.0)


def test_training_learns_a_qp_from_the_pixels():
    """A few hundred steps on two real encodes: the estimate reads CRF 40 above CRF 18."""
    grey = np.full((80, 112), 128, np.uint8)
    clean = [(_texture(t), grey, grey) for t in range(6)]
    ys, qs = [], []
    for crf in (18, 40):
        _, frames = decode(io.BytesIO(encode_planes(clean, EncodeSettings(crf=crf))))
        ys += [f.planes[0] for f in frames]
        qs += [f.side.qp_map for f in frames]
    torch.manual_seed(0)
    net = PixelQPNet(8).to(memory_format=torch.channels_last)
    train(net, {"y": np.stack(ys), "q": np.stack(qs)}, 300, 3e-3, lambda m: None, batch=16)
    est = PixelQP(net)
    light, heavy = est.frame_qp(ys[0]), est.frame_qp(ys[-1])
    assert light + 8 < heavy


def test_shipped_estimate_orders_light_and_heavy_compression():
    """The shipped estimate, on a clip it never saw: CRF 18 reads lower than CRF 40."""
    est = load_model().pixel_qp
    if not est:
        pytest.fail("the shipped model file has no pixel CRF estimate")
    grey = np.full((80, 112), 128, np.uint8)
    clean = [(_texture(t), grey, grey) for t in range(8)]
    means = {}
    for crf in (18, 40):
        _, frames = decode(io.BytesIO(encode_planes(clean, EncodeSettings(crf=crf))))
        means[crf] = est.crf([est.frame_qp(f.planes[0]) for f in frames])
    assert means[18] + 8 < means[40]
