"""Unit tests for the enhancer package: model, features, inputs, policy, checkpoint, engine, train.

Everything is tiny (8-channel models, 16x24 tensors, 128x96 clips, a 2-sample
training set and a handful of steps) so the module stays cheap on a CPU.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from bitstream.reader import open_video
from bitstream.types import PARTITION_CODES
from enhancer import data, train
from enhancer.checkpoint import DEFAULT_WEIGHTS, load_model, save_model
from enhancer.engine import Engine, pick_device
from enhancer.features import (
    PARTITION_CHANNELS,
    PHASE_CHANNELS,
    flow_plane_full,
    partition_planes,
    phase_planes,
    planes_to_tensor,
    qp_plane,
    tensor_to_planes,
    warp_reference,
)
from enhancer.inputs import FrameInputs, collate
from enhancer.model import ExpertConv, ModelConfig, QPEstimator, VQENet
from enhancer.policy import DEFAULT_EDGES, ExitPolicy, calibrate

H, W = 16, 24  # half-resolution model grid used by the model tests (luma 32x48)
FLAGS = ("temporal", "qp_map", "partitions", "phase", "use_experts", "frame_cond")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(channels=8, stages=3, blocks_per_stage=1, experts=2, **kw)


def tiny_model(seed: int = 0, **kw) -> VQENet:
    """A tiny model with non-trivial exit heads and FiLM, so every input can matter."""
    torch.manual_seed(seed)
    model = VQENet(tiny_cfg(**kw)).eval()
    with torch.no_grad():
        for stage in model.stages:
            nn.init.normal_(stage.head.weight, std=0.1)
            if stage.film is not None:
                nn.init.normal_(stage.film.weight, std=0.5)
    return model


def item(seed: int = 0, **overrides) -> FrameInputs:
    """Full side information for one (6, H, W) frame; ``overrides`` replace fields."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.zeros(PARTITION_CHANNELS, H, W)
    parts[torch.randint(0, PARTITION_CHANNELS, (1,), generator=g)] = 1.0
    fields_ = dict(
        cur=torch.rand(6, H, W, generator=g),
        ref=torch.rand(6, H, W, generator=g),
        ref_mask=torch.ones(1, H, W),
        qmap=torch.full((1, H, W), 30 / 51),
        parts=parts,
        frame_qp=30.0,
        pict_type="P",
        seq_qp=28.0,
        seq_known=True,
    )
    fields_.update(overrides)
    return FrameInputs(**fields_)


def run(model: VQENet, items: list[FrameInputs], stages: int | None = None):
    batch = collate(items, model, QPEstimator().eval())
    with torch.no_grad():
        return batch, model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, stages)


# ---------------------------------------------------------------- model


def test_forward_one_output_per_stage_shaped_like_input():
    model = tiny_model()
    batch, outs = run(model, [item(0), item(1)])
    assert len(outs) == model.cfg.stages == 3
    for o in outs:
        assert o.shape == batch.x.shape == (2, 6, H, W)
        assert torch.isfinite(o).all()
        assert not torch.equal(o, batch.x)  # the heads do correct something
    # Early exit: asking for fewer stages gives exactly the first outputs of the full run.
    with torch.no_grad():
        two = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 2)
        assert len(two) == 2
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(two, outs[:2], strict=True))
        # Out-of-range requests are clamped to 1..S.
        assert len(model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 0)) == 1
        assert len(model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 9)) == 3


def test_output_is_input_plus_correction_and_clipped_only_on_conversion():
    model = tiny_model()
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.zero_()
            stage.head.bias.fill_(0.3)  # a constant correction of +0.3 everywhere
    batch, outs = run(model, [item(0)])
    for o in outs:
        assert torch.allclose(o, batch.x + 0.3, atol=1e-6)
    assert outs[-1].max() > 1.0  # the network output itself is not clipped...
    y, u, v = tensor_to_planes(outs[-1][0], 2 * H, 2 * W)  # ...the planes are
    assert y.dtype == np.uint8 and y.shape == (2 * H, 2 * W) and u.shape == (H, W)
    assert y.max() == 255 and (y == 255).sum() > 0
    expected = np.round(np.clip(F.pixel_shuffle(batch.x[:, :4] + 0.3, 2)[0, 0].numpy(), 0, 1) * 255)
    assert np.array_equal(y, expected.astype(np.uint8))
    with torch.no_grad():
        for stage in model.stages:
            stage.head.bias.fill_(-2.0)
    _, outs = run(model, [item(0)])
    for plane in tensor_to_planes(outs[-1][0], 2 * H, 2 * W, bit_depth=10):
        assert plane.dtype == np.uint16 and plane.max() == 0
    with torch.no_grad():
        for stage in model.stages:
            stage.head.bias.fill_(2.0)
    _, outs = run(model, [item(0)])
    for plane in tensor_to_planes(outs[-1][0], 2 * H, 2 * W, bit_depth=10):
        assert plane.min() == plane.max() == 1023


def test_ablation_flags_are_exactly_the_boolean_config_fields():
    bools = {f.name for f in fields(ModelConfig) if f.type in (bool, "bool")}
    assert bools == set(FLAGS) == set(train.ABLATIONS)


@pytest.mark.parametrize(
    "flag,fewer",
    [("temporal", 7), ("qp_map", 1), ("partitions", PARTITION_CHANNELS), ("phase", PHASE_CHANNELS),
     ("use_experts", 0), ("frame_cond", 0)],
)  # fmt: skip
def test_each_ablation_is_one_flag_and_still_runs(flag, fewer):
    full, cfg = tiny_cfg(), tiny_cfg(**{flag: False})
    differing = [f.name for f in fields(ModelConfig)
                 if getattr(full, f.name) != getattr(cfg, f.name)]  # fmt: skip
    assert differing == [flag]
    assert full.in_channels() == 6 + 7 + 1 + PARTITION_CHANNELS + PHASE_CHANNELS
    assert cfg.in_channels() == full.in_channels() - fewer
    model = tiny_model(**{flag: False})
    assert model.inp.in_channels == cfg.in_channels()
    batch, outs = run(model, [item(0), item(1, ref=None, ref_mask=None, pict_type="B")])
    assert batch.inputs.shape == (2, cfg.in_channels(), H, W)
    assert len(outs) == 3 and all(o.shape == (2, 6, H, W) for o in outs)
    if flag == "use_experts":
        assert all(isinstance(s.entry, nn.Conv2d) for s in model.stages)
    else:
        assert all(isinstance(s.entry, ExpertConv) for s in model.stages)
    assert all((s.film is None) == (flag == "frame_cond") for s in model.stages)


PERTURB = {  # flag -> a change of one input that only that flag lets into the model
    "temporal": dict(ref=torch.zeros(6, H, W)),
    "qp_map": dict(qmap=torch.full((1, H, W), 45 / 51)),
    "partitions": dict(parts=torch.zeros(PARTITION_CHANNELS, H, W)),
    "frame_cond": dict(pict_type="B"),
}


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("flag", sorted(PERTURB))
def test_disabled_input_no_longer_affects_the_output(flag, enabled):
    model = tiny_model(**{flag: enabled})
    _, a = run(model, [item(3)])
    _, b = run(model, [item(3, **PERTURB[flag])])
    assert torch.equal(a[-1], b[-1]) != enabled


def test_expert_conv_mixes_each_sample_with_its_own_weights():
    torch.manual_seed(0)
    conv = ExpertConv(4, 3)
    x = torch.randn(2, 4, 8, 8)
    mix = torch.softmax(torch.randn(2, 3), 1)
    with torch.no_grad():
        both = conv(x, mix)  # grouped path (different mixes)
        one = torch.cat([conv(x[i : i + 1], mix[i : i + 1]) for i in range(2)])  # shared path
        assert torch.allclose(both, one, atol=1e-5)
        same = conv(x, mix[:1].expand(2, -1))
        assert torch.allclose(same[1], conv(x[1:], mix[:1])[0], atol=1e-5)
        # A one-hot mix is exactly that expert's conv.
        onehot = torch.tensor([[0.0, 1.0, 0.0]])
        ref = F.conv2d(x[:1], conv.weight[1], conv.bias[1], padding=1)
        assert torch.allclose(conv(x[:1], onehot), ref, atol=1e-5)


def test_qp_estimator_one_value_per_macroblock():
    est = QPEstimator().eval()
    x = torch.rand(2, 6, 32, 48)
    with torch.no_grad():
        out = est(x, phase_planes(32, 48)[None])
        assert out.shape == (2, 1, 4, 6) and torch.isfinite(out).all()
        for m in est.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        # The offset puts an untrained estimator at QP 0.6 * 51 ~ 31 rather than at 0.
        assert torch.equal(est(x, phase_planes(32, 48)[None]), torch.full((2, 1, 4, 6), 0.6))


# ---------------------------------------------------------------- inputs


def test_collate_estimates_a_missing_qp_map_and_flags_missing_side_info():
    model = tiny_model()
    est = QPEstimator().eval()
    with pytest.raises(ValueError, match="estimator"):
        collate([item(0, qmap=None)], model, None)
    blind = item(0, qmap=None, ref=None, ref_mask=None, parts=None, frame_qp=None,
                 pict_type="?", seq_qp=None, seq_known=False)  # fmt: skip
    batch = collate([item(1), blind], model, est)
    assert batch.est_qmap.shape == (2, 1, H // 8, W // 8)
    assert ((batch.est_qmap >= 0.1) & (batch.est_qmap <= 1.0)).all()
    # channels: x 0-5, ref 6-11, ref mask 12, QP 13, partitions 14-17, phase 18-21
    qp_est = F.interpolate(batch.est_qmap[1:], scale_factor=8, mode="nearest")[0]
    assert torch.equal(batch.inputs[1, 13:14], qp_est)
    assert torch.equal(batch.inputs[0, 13:14], item(1).qmap)  # a known map wins
    assert torch.equal(batch.inputs[1, 6:12], blind.cur)  # no reference: the frame itself...
    assert batch.inputs[1, 12].abs().sum() == 0  # ...with a zero validity mask
    assert batch.inputs[1, 14:18].abs().sum() == 0  # unknown partitions: all zero
    assert torch.equal(batch.inputs[0, 18:22], phase_planes(H, W))
    assert batch.frame_qp[0] == 30.0
    assert float(batch.frame_qp[1]) == pytest.approx(float(qp_est.mean()) * 51, rel=1e-5)
    # seq_cond: (seq QP / 51, known); frame_cond: QP/51, (QP - seq)/10, I, P, B, has_ref
    assert torch.allclose(batch.seq_cond[0], torch.tensor([28 / 51, 1.0]))
    assert batch.seq_cond[1, 1] == 0.0  # unknown CRF: the estimated QP stands in
    assert torch.allclose(batch.frame_cond[0], torch.tensor([30 / 51, 0.2, 0, 1, 0, 1]))
    assert batch.frame_cond[1, 1] == 0.0 and batch.frame_cond[1, 2:].abs().sum() == 0


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("bit_depth,size", [(8, (30, 46)), (8, (64, 32)), (10, (30, 46))])
def test_planes_to_tensor_round_trip_is_lossless(bit_depth, size):
    rng = np.random.default_rng(bit_depth)
    h, w = size
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    maxv = (1 << bit_depth) - 1
    planes = (rng.integers(0, maxv + 1, (h, w)).astype(dtype),
              rng.integers(0, maxv + 1, ((h + 1) // 2, (w + 1) // 2)).astype(dtype),
              rng.integers(0, maxv + 1, ((h + 1) // 2, (w + 1) // 2)).astype(dtype))  # fmt: skip
    t = planes_to_tensor(planes, bit_depth)
    assert t.shape == (6, -(-h // 16) * 8, -(-w // 16) * 8) and t.dtype == torch.float32
    assert t.min() >= 0.0 and t.max() <= 1.0
    # The unshuffle puts luma phase (dy, dx) in channel 2*dy + dx.
    assert float(t[1, 0, 0]) == pytest.approx(planes[0][0, 1] / maxv)
    assert float(t[2, 0, 0]) == pytest.approx(planes[0][1, 0] / maxv)
    back = tensor_to_planes(t, h, w, bit_depth)
    for a, b in zip(back, planes, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def test_warp_reference_zero_motion_is_identity_and_integer_motion_shifts():
    rng = np.random.default_rng(1)
    h, w = 32, 48
    planes = (rng.integers(0, 256, (h, w), dtype=np.uint8),
              rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8),
              rng.integers(0, 256, (h // 2, w // 2), dtype=np.uint8))  # fmt: skip
    ref = planes_to_tensor(planes)[None]
    grid = (h // 8, w // 8)
    mv = np.zeros((*grid, 2), np.float32)
    valid = np.ones(grid, bool)
    same = warp_reference(ref, flow_plane_full(mv, valid, h, w))
    err = float((same - ref).abs().max())
    assert err < 1e-4, err  # grid_sample's coordinate round trip costs a few ulp, no more
    assert same_planes(tensor_to_planes(same[0], h, w), planes)
    assert torch.equal(flow_plane_full(None, None, h, w), torch.zeros(1, 2, h, w))
    # dx = +2 luma px: the current pixel x predicts from reference pixel x + 2.
    mv[..., 0] = 2.0
    y, u, v = tensor_to_planes(warp_reference(ref, flow_plane_full(mv, valid, h, w))[0], h, w)
    assert np.array_equal(y[:, :-2], planes[0][:, 2:])
    assert np.array_equal(u[:, :-1], planes[1][:, 1:])  # chroma moves by half
    assert np.array_equal(v[:, :-1], planes[2][:, 1:])
    # Invalid blocks carry no motion.
    flow = flow_plane_full(mv, np.zeros(grid, bool), h, w)
    assert flow.abs().sum() == 0


def test_qp_and_partition_planes_expand_macroblocks_to_the_model_grid():
    qmap = np.array([[20, 30, 40], [25, 35, 45]], np.float32)
    q = qp_plane(qmap, 16, 24)
    assert q.shape == (1, 16, 24)
    assert float(q[0, 0, 0]) == float(q[0, 7, 7]) == pytest.approx(20 / 51)
    assert float(q[0, 8, 8]) == pytest.approx(35 / 51)
    assert float(q[0, 15, 23]) == pytest.approx(45 / 51)
    codes = PARTITION_CODES
    part = np.array([[codes["intra"], codes["16x16"], codes["16x8"]],
                     [codes["8x16"], codes["8x8"], codes["unknown"]]], np.uint8)  # fmt: skip
    p = partition_planes(part, 16, 24)
    assert p.shape == (4, 16, 24)
    expect = [0, 1, 2, 2, 3, None]  # channel of each block, row-major
    for k, ch in enumerate(expect):
        cell = p[:, (k // 3) * 8, (k % 3) * 8]
        if ch is None:
            assert cell.sum() == 0
        else:
            assert cell.tolist() == [float(c == ch) for c in range(4)]
    assert partition_planes(None, 16, 24).abs().sum() == 0


def test_phase_planes_mark_block_edges():
    ph = phase_planes(16, 16)
    assert ph.shape == (PHASE_CHANNELS, 16, 16)
    # 8x8 luma blocks are 4 model pixels: columns 0, 3, 4, 7, ... are edges.
    assert ph[0, 0].tolist() == [1.0 if x % 4 in (0, 3) else 0.0 for x in range(16)]
    assert ph[1, :, 0].tolist() == ph[0, 0].tolist()
    assert ph[2, 0].tolist() == [1.0 if x % 8 in (0, 7) else 0.0 for x in range(16)]


# ---------------------------------------------------------------- exit policy


def test_calibrate_picks_fewest_stages_within_tolerance():
    records = [
        (22.0, [0.10, 0.26, 0.30]),  # bin [20, 24): mean of the two rows below -> 2 stages
        (23.0, [0.10, 0.30, 0.30]),
        (34.0, [0.50, 0.50, 0.52]),  # bin [32, 36): 1 stage is within 0.05 dB of 3
        (38.0, [-0.20, -0.10, -0.05]),  # bin [36, 40): every count loses -> 0
        (45.0, [-0.04, 0.50, 0.0]),  # bin [44, 48): not monotone, the best is 2 stages
    ]
    pol = calibrate(records, max_stages=3)
    assert pol.edges == DEFAULT_EDGES and pol.max_stages == 3
    # Empty bins borrow the nearest calibrated bin.
    assert pol.stages == [2, 2, 2, 1, 1, 0, 0, 2, 2]
    assert pol.gains[1] == [0.1, 0.28, 0.3] and pol.gains[0] == []
    assert calibrate(records, 3, tolerance=0.001).stages[1] == 3
    assert pol.stages_for(21.5) == 2 and pol.stages_for(33.0) == 1 and pol.stages_for(39) == 0
    assert pol.stages_for(-5) == 2 and pol.stages_for(200) == 2  # clamped to the end bins
    assert pol.stages_for(None) == 3 and pol.stages_for(float("nan")) == 3
    assert all(type(s) is int for s in pol.stages)  # stored in a weights_only model file


def test_policy_without_data_runs_everything_and_round_trips():
    empty = calibrate([], max_stages=2)
    assert empty.stages == [] and empty.stages_for(30.0) == 2
    pol = calibrate([(30.0, [0.2, 0.3]), (45.0, [0.4, 0.4])], max_stages=2, tolerance=0.02)
    d = json.loads(json.dumps(pol.to_dict()))
    back = ExitPolicy.from_dict(d)
    assert back == pol and back.tolerance == 0.02
    assert [back.stages_for(q) for q in (None, 10, 30, 45)] == [2, 2, 2, 1]
    # HEVC has its own table when calibrated, else falls back to the H.264 one.
    assert back.stages_for(45, hevc=True) == 1
    back.hevc_stages = [0] * len(back.stages)
    assert back.stages_for(45, hevc=True) == 0 and back.stages_for(45) == 1
    assert ExitPolicy.from_dict(json.loads(json.dumps(back.to_dict()))) == back


def test_engine_hevc_follows_the_hevc_policy_by_crf(clip):
    """HEVC frames take the x265-calibrated table, binned by the stream's CRF."""
    path = clip("h27.mp4", codec="libx265", size=(64, 48), frames=3,
                options={"crf": "27", "x265-params": "log-level=none"})  # fmt: skip
    info, frames = decode(path)
    engine = Engine(device="cpu")
    assert info.codec == "hevc" and info.sequence_qp == 27
    assert engine.policy.hevc_stages, "the shipped weights carry an HEVC table"
    want = engine.policy.stages_for(27.0, hevc=True)
    reports = [r for _, r in enhance(engine, info, frames)]
    # The H.264 table at the frames' estimated QP would answer differently, so this checks
    # that the HEVC table (by CRF) is the one used.
    assert any(engine.policy.stages_for(r.qp) != want for r in reports)
    assert [r.stages for r in reports] == [want] * 3


# ---------------------------------------------------------------- checkpoint


def test_save_and_load_model_round_trip(tmp_path):
    model = tiny_model(seed=5, partitions=False)
    est = QPEstimator().eval()
    pol = calibrate([(30.0, [0.1, 0.2, 0.2])], max_stages=3)
    path = tmp_path / "sub" / "m.pt"
    save_model(path, model, est, pol, {"version": "t", "step": 7})
    assert path.exists() and not path.with_suffix(".tmp").exists()
    model2, est2, pol2, meta = load_model(path)
    assert model2.cfg == model.cfg and not model2.training
    assert pol2 == pol and meta == {"version": "t", "step": 7}
    items = [item(0, parts=None), item(1, qmap=None)]
    batch, outs = run(model, items)
    with torch.no_grad():
        outs2 = model2(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond)
        x = torch.rand(1, 6, 16, 16)
        e1, e2 = est(x, phase_planes(16, 16)[None]), est2(x, phase_planes(16, 16)[None])
    for a, b in zip(outs, outs2, strict=True):
        assert torch.allclose(a, b, atol=1e-2)  # fp16 weights
    assert torch.allclose(e1, e2, atol=1e-2)
    # Exactly the original weights rounded to fp16.
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v.half().float())
    save_model(path, model, est, None, {})
    assert load_model(path)[2] is None


def test_load_model_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
    cases = {
        "other.pt": {"format": "something-else", "model": {}},
        "list.pt": [1, 2, 3],
        "training.pt": {"model": tiny_model().state_dict(), "step": 3},  # a last.pt, not exported
    }
    for name, payload in cases.items():
        torch.save(payload, tmp_path / name)
    (tmp_path / "text.pt").write_text("definitely not a model\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in [*cases, "text.pt", "empty.pt"]:
        with pytest.raises(ValueError, match="not a vqe model file"):
            load_model(tmp_path / name)


def test_shipped_weights_load():
    model, est, pol, meta = load_model()
    assert DEFAULT_WEIGHTS.exists() and meta["version"] == "vqe-v1"
    assert pol is not None and pol.max_stages == model.cfg.stages
    assert len(pol.stages) == len(pol.edges) - 1


# ---------------------------------------------------------------- engine


def decode(path: Path):
    with open_video(path) as reader:
        return reader.info, list(reader)


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    """A 128x96 H.264 clip with I, P and B frames, decoded once with side information."""
    from tests.clips import make_clip

    path = make_clip(tmp_path_factory.mktemp("enh") / "a.mp4", size=(128, 96), frames=6)
    info, frames = decode(path)
    assert {f.side.pict_type for f in frames} == {"I", "P", "B"}
    return info, frames


def enhance(engine: Engine, info, frames):
    return list(engine.process(frames, info))


def same_planes(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def equal_frames(a: list, b: list) -> list[bool]:
    """Per frame: do two runs (lists of (frame, report) or of frames) hold the same planes?"""
    planes = lambda r: r[0].planes if isinstance(r, tuple) else r.planes  # noqa: E731
    return [same_planes(planes(x), planes(y)) for x, y in zip(a, b, strict=True)]


def test_engine_streams_frames_with_reports(h264):
    info, frames = h264
    pulled = []

    def source():
        for f in frames:
            pulled.append(f.index)
            yield f

    engine = Engine(device="cpu")
    stream = engine.process(source(), info)
    first = next(stream)
    assert pulled == [0]  # one frame in, one frame out: nothing is buffered
    results = [first, *stream]
    assert len(results) == len(frames)
    assert engine.policy is not None and engine.stages == "auto"
    for (out, rep), src in zip(results, frames, strict=True):
        assert rep.index == out.index == src.index
        assert out.side is src.side and out.av_frame is src.av_frame
        for a, b in zip(out.planes, src.planes, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert rep.side_info == "bitstream"
        assert rep.qp == pytest.approx(src.side.qp)
        assert rep.stages == engine.policy.stages_for(rep.qp)
        assert rep.seconds > 0
        if rep.stages == 0:
            assert same_planes(out.planes, src.planes)


def test_engine_fixed_stage_counts(h264):
    info, frames = h264
    one = enhance(Engine(device="cpu", stages=1), info, frames)
    three = enhance(Engine(device="cpu", stages="3"), info, frames)
    none = enhance(Engine(device="cpu", stages=0), info, frames)
    assert [r.stages for _, r in one] == [1] * len(frames)
    assert [r.stages for _, r in three] == [3] * len(frames)
    assert [r.stages for _, r in none] == [0] * len(frames)
    assert all(equal_frames(none, frames))
    assert not any(equal_frames(three, frames))
    assert not all(equal_frames(one, three))
    for (a, _), (b, _) in zip(one, three, strict=True):  # both are light touch-ups of the input
        assert np.abs(a.planes[0].astype(int) - b.planes[0].astype(int)).mean() < 3


def test_engine_rejects_bad_settings():
    with pytest.raises(ValueError, match="stages"):
        Engine(device="cpu", stages=4)
    with pytest.raises(ValueError, match="side_info"):
        Engine(device="cpu", side_info="psychic")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_engine_device_auto_is_cpu_without_cuda():
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        pick_device("cuda")
    engine = Engine(stages=1)
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert next(engine.model.parameters()).device.type == "cpu"


def test_engine_blind_reports_estimated_side_info(h264):
    info, frames = h264
    blind = enhance(Engine(device="cpu", stages=1, side_info="blind"), info, frames)
    bits = enhance(Engine(device="cpu", stages=1, side_info="bitstream"), info, frames)
    assert [r.side_info for _, r in blind] == ["estimated"] * len(frames)
    assert [r.side_info for _, r in bits] == ["bitstream"] * len(frames)
    for _, r in blind:
        assert 0.1 * 51 - 1e-3 <= r.qp <= 51 + 1e-3  # the estimator's clamped range
    assert not all(equal_frames(blind, bits))


def test_engine_tiles_large_frames_seamlessly(h264):
    info, frames = h264
    calls = {}

    def counted(engine, key):
        calls[key] = 0

        def hook(*_):
            calls[key] += 1

        engine.model.register_forward_hook(hook)
        return engine

    whole_engine = counted(Engine(device="cpu", stages=3, tile=0), "whole")
    tiled_engine = counted(Engine(device="cpu", stages=3, tile=32), "tiled")
    whole = enhance(whole_engine, info, frames)
    tiled = enhance(tiled_engine, info, frames)
    auto = enhance(counted(Engine(device="cpu", stages=3), "auto"), info, frames)
    n = len(frames)
    assert calls == {"whole": n, "tiled": 4 * n, "auto": n}  # 64x48 model grid: 2x2 tiles
    for (a, _), (b, _), (c, _) in zip(whole, tiled, auto, strict=True):
        assert same_planes(a.planes, c.planes)
        for x, y in zip(a.planes, b.planes, strict=True):
            diff = np.abs(x.astype(int) - y.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01
    # Before rounding too: the overlap hides the seams (without it they are ~4e-3, about
    # half the size of the whole correction).
    item, _ = whole_engine._inputs(frames[0], None, 8, info.sequence_qp, True)
    batch = collate([item], whole_engine.model, whole_engine.estimator)
    a, b = whole_engine._run_model(batch, 3), tiled_engine._run_model(batch, 3)
    assert float((a - b).abs().max()) < 1e-5 < float((a - batch.x).abs().max())


def test_engine_ten_bit_odd_size(clip):
    info, frames = decode(clip("ten.mp4", size=(90, 70), frames=3, pix_fmt="yuv420p10le"))
    assert info.bit_depth == 10
    results = enhance(Engine(device="cpu", stages=2), info, frames)
    assert len(results) == 3
    for (out, rep), src in zip(results, frames, strict=True):
        assert rep.side_info == "bitstream"
        assert [p.shape for p in out.planes] == [(70, 90), (35, 45), (35, 45)]
        assert all(p.dtype == np.uint16 and p.max() <= 1023 for p in out.planes)
        # 10-bit stays 10-bit: the output is near the input, not squeezed into 8 bits.
        assert np.abs(out.planes[0].astype(int) - src.planes[0].astype(int)).mean() < 12


def test_engine_hevc_takes_the_blind_path_as_in_training(clip):
    """HEVC gives only a flat slice-QP map from headers (no partitions, no motion); the
    model only ever saw HEVC through the blind path (data.frame_inputs), so the engine
    must use the estimator there too and say so."""
    path = clip("h.mp4", codec="libx265", size=(64, 48), frames=3,
                options={"x265-params": "log-level=none"})  # fmt: skip
    info, frames = decode(path)
    assert frames[0].side.sources["qp_map"] == "header"
    results = enhance(Engine(device="cpu", stages=1), info, frames)
    assert [r.side_info for _, r in results] == ["estimated"] * 3


# ---------------------------------------------------------------- training


VAL_CRFS = (17, 22, 27, 32, 37, 42, 47)


def make_footage(root: Path) -> Path:
    """Three small synthetic photos: one validation source (Kite), two for training."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    assert "Kite" in data.VALIDATION_SOURCES
    for seed, name in enumerate(["Kite", "alpha", "beta"]):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (25, 33, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((512, 384), Image.BICUBIC), np.int16)
        img = img + rng.integers(-12, 13, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(photos / f"{name}.png")
    return root


def train_args(footage: Path, work: Path, steps: int, *extra: str) -> list[str]:
    return ["--footage", str(footage), "--work", str(work), "--version", "tiny",
            "--train-count", "2", "--steps", str(steps), "--batch", "2", "--patch", "32",
            "--channels", "8", "--stages", "2", "--blocks", "1", "--val-every", "2",
            "--val-frames", "1", "--log-every", "2", "--workers", "1", "--threads", "1",
            *extra]  # fmt: skip


def fork_work(src: Path, dst: Path, files=("last.pt", "best.pt", "train.log")) -> Path:
    """A copy of a work folder's checkpoints and log, sharing the (read-only) cache."""
    dst.mkdir(parents=True)
    for name in files:
        shutil.copy2(src / name, dst / name)
    (dst / "cache").symlink_to(src / "cache")
    return dst


def log_after(path: Path, marker: str | None = None) -> str:
    text = path.read_text()
    return text[text.rindex(marker) :] if marker else text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `python -m enhancer.train` run: dataset build, 4 steps, validation, export."""
    root = tmp_path_factory.mktemp("train")
    footage = make_footage(root / "footage")
    work = root / "work"
    assert train.main(train_args(footage, work, 4)) == 0
    return root, footage, work


def test_train_builds_trains_validates_and_exports(trained):
    _, _, work = trained
    val = sorted(p.stem for p in (work / "cache" / "val").glob("*.npz"))
    assert val == sorted(f"Kite_crf{c}" for c in VAL_CRFS)  # only the validation source
    assert sorted(p.stem for p in (work / "cache" / "train").glob("*.npz")) == ["s00000", "s00001"]
    sample = data.load_cache(work / "cache" / "train")[0]
    assert sample["dec"].shape == sample["clean"].shape == (6, 384, 256)  # 6 frames 256x256
    log = (work / "train.log").read_text()
    assert "dataset val: wrote 7" in log and "dataset train: wrote 2" in log
    assert "loaded 2 train / 7 validation samples" in log
    assert "step 2 lr" in log and "step 4 lr" in log
    for step in (2, 4):
        assert f"validation at step {step}" in log
    assert "new best" in log
    header = re.findall(r"CRF\s+input\s+s1\s+s2(?:\s+blind)?\n", log)
    assert len(header) == 4  # two validations, the final one and the x265 one
    assert "x265 validation (blind path)" in log and "HEVC exit policy: stages" in log
    assert len(list((work / "cache" / "val-hevc").glob("Kite_libx265_crf*.npz"))) == 7
    for crf in VAL_CRFS:  # one row per CRF, each with 4 finite numbers
        rows = re.findall(rf"^\s+{crf} ((?:\s+[-+]?\d+\.\d+){{4}})$", log, re.M)
        assert len(rows) == 3, crf
    assert "exit policy: edges" in log and "exported" in log
    last = torch.load(work / "last.pt", weights_only=False)
    best = torch.load(work / "best.pt", weights_only=False)
    assert last["step"] == 4 and best["step"] in (2, 4)
    model, est, pol, meta = load_model(work / "tiny.pt")
    assert (model.cfg.channels, model.cfg.stages, model.cfg.blocks_per_stage) == (8, 2, 1)
    assert pol.max_stages == 2 and len(pol.stages) == len(pol.edges) - 1
    assert meta["version"] == "tiny" and meta["step"] == best["step"]
    assert sorted(float(k) for k in meta["validation"]) == list(map(float, VAL_CRFS))
    for k, v in best["model"].items():  # the export is the best checkpoint in fp16
        assert torch.equal(model.state_dict()[k], v.half().float())


def test_train_resumes_from_last_checkpoint(trained, tmp_path):
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / "w")
    assert train.main(train_args(footage, work2, 6)) == 0
    log = log_after(work2 / "train.log", "dataset val: 7 samples cached")
    assert "dataset train: 2 samples cached" in log and "wrote 2" not in log  # nothing rebuilt
    assert "resumed from step 4" in log
    assert "validation at step 6" in log and "validation at step 2" not in log
    assert "step 6 lr" in log and "step 2 lr" not in log
    assert torch.load(work2 / "last.pt", weights_only=False)["step"] == 6
    assert load_model(work2 / "tiny.pt")[3]["step"] in (2, 4, 6)


def test_train_export_only(trained, tmp_path):
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / "w")
    before = (work2 / "last.pt").read_bytes()
    assert train.main(train_args(footage, work2, 6, "--export-only", "--skip-build")) == 0
    log = log_after(work2 / "train.log", "final validation")
    assert "exported" in log
    log = log_after(work2 / "train.log")[len((work / "train.log").read_text()) :]
    assert "loaded" not in log and "validation at step" not in log and "dataset" not in log
    assert (work2 / "last.pt").read_bytes() == before  # no training happened
    best = torch.load(work2 / "best.pt", weights_only=False)
    model, _, _, meta = load_model(work2 / "tiny.pt")
    assert meta["step"] == best["step"]
    for k, v in best["model"].items():
        assert torch.equal(model.state_dict()[k], v.half().float())


@pytest.mark.parametrize("source", ["exported", "checkpoint"])
def test_train_init_from_model_file(trained, tmp_path, source):
    _, footage, work = trained
    init = work / ("tiny.pt" if source == "exported" else "best.pt")
    init_step = torch.load(work / "best.pt", weights_only=False)["step"]
    work2 = tmp_path / "w"
    work2.mkdir()
    (work2 / "cache").symlink_to(work / "cache")
    # lr 0: the weights must come out exactly as they went in.
    args = train_args(footage, work2, 2, "--skip-build", "--init", str(init), "--lr", "0")
    assert train.main(args) == 0
    log = (work2 / "train.log").read_text()
    assert f"initialised from {init} (trained {init_step} steps)" in log
    assert "resumed" not in log
    out, _, _, _ = load_model(work2 / "tiny.pt")
    ref, _, _, _ = load_model(work / "tiny.pt")
    for k, v in ref.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
