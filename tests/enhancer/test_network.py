"""enhancer v2 model, batch assembly, features, exit policy and model files.

Tiny 8-channel models on 16x24 half-resolution tensors (see tests/enhancer/tiny.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitstream.types import PARTITION_CODES
from enhancer.batch import COST_SCALE, FrameInputs, Reference, collate, cost_plane
from enhancer.checkpoint import DEFAULT_WEIGHTS, FORMAT, load_model, save_model
from enhancer.features import (
    PARTITION_CHANNELS,
    PHASE_CHANNELS,
    cpu_has_bf16,
    flow_plane_full,
    mask_plane,
    partition_planes,
    phase_planes,
    planes_to_tensor,
    qp_plane,
    tensor_to_planes,
    warp_reference,
)
from enhancer.network import FRAME_COND, REFERENCES, ModelConfig, QPEstimator, VQENet
from enhancer.policy import DEFAULT_EDGES, KINDS, ExitPolicy, ExitTable, calibrate
from enhancer.training import train
from tests.enhancer.tiny import H, W, item, reference, run, same_planes, tiny_cfg, tiny_model

FLAGS = ("references", "qp_map", "partitions", "phase", "frame_cond")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- model


def test_forward_one_output_per_stage_shaped_like_input():
    model = tiny_model()
    batch, outs = run(model, [item(0), item(1)])
    assert len(outs) == model.cfg.stages == 3
    for o in outs:
        assert o.shape == batch.x.shape == (2, 6, H, W)
        assert torch.isfinite(o).all()
        assert not torch.equal(o, batch.x)  # the heads do correct something
    assert not torch.equal(outs[0], outs[2])
    # Early exit: asking for fewer stages gives exactly the first outputs of the full run.
    with torch.no_grad():
        two = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 2)
        assert len(two) == 2
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(two, outs[:2], strict=True))
        # Out-of-range requests are clamped to 1..S.
        assert len(model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 0)) == 1
        assert len(model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 9)) == 3
        # Inference wants only the last exit: the other heads are skipped, the output is the same.
        for n in (1, 2, 3):
            last = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, n, True)
            assert len(last) == 1
            assert torch.equal(last[0], outs[n - 1] if n == 3 else two[n - 1])


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_inference_convolutions_match_the_plain_ones(monkeypatch, bf16):
    import enhancer.network as network

    if bf16 and not cpu_has_bf16():
        pytest.skip("no bf16 on this CPU")
    torch.manual_seed(0)
    model = VQENet(ModelConfig(channels=16, stages=2)).eval()
    for p in model.parameters():  # heads start near zero: make every path count
        p.data.normal_(0, 0.05)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 6, 20, 28)
    inputs = torch.rand(2, model.cfg.in_channels(), 20, 28)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    seq, frame = torch.rand(2, 2), torch.rand(2, FRAME_COND)

    def outputs():
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return [o.float() for o in model(x, inputs, seq, frame)]

    calls = []
    fused_op = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_convolution_pointwise", lambda *a: calls.append(1) or fused_op(*a)
    )
    fused = outputs()
    assert calls, "the fused oneDNN convolutions did not run"
    monkeypatch.setattr(network, "_onednn_dtype", lambda x: None)
    plain = outputs()
    for a, b in zip(fused, plain, strict=True):
        assert torch.allclose(a, b, atol=2e-2 if bf16 else 1e-5)
    # Training (autograd on) takes the plain path and still back-propagates.
    model.train()
    model(x, inputs, seq, frame)[-1].sum().backward()
    assert model.inp.weight.grad is not None


def test_fused_weights_follow_updates_and_replaced_parameters():
    from enhancer.network import conv3x3

    conv = nn.Conv2d(4, 4, 3, 1, 1)
    x = torch.rand(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = conv3x3(conv, x)
    assert conv.__dict__["_onednn_weights"][1].is_mkldnn  # packed once, not per call
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place: the cast copy is renewed
    with torch.inference_mode():
        assert torch.allclose(conv3x3(conv, x), conv(x), atol=1e-5)
    conv.weight = nn.Parameter(torch.zeros_like(conv.weight))  # replaced
    with torch.inference_mode():
        out = conv3x3(conv, x)
    assert torch.allclose(out, conv.bias[None, :, None, None].expand_as(out), atol=1e-6)
    assert not torch.allclose(out, first)


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
    [("references", 2 * 7), ("qp_map", 1), ("partitions", PARTITION_CHANNELS),
     ("phase", PHASE_CHANNELS), ("frame_cond", 0)],
)  # fmt: skip
def test_each_ablation_is_one_flag_and_still_runs(flag, fewer):
    full, cfg = tiny_cfg(), tiny_cfg(**{flag: False})
    differing = [f.name for f in fields(ModelConfig)
                 if getattr(full, f.name) != getattr(cfg, f.name)]  # fmt: skip
    assert differing == [flag]
    assert full.in_channels() == 6 + 2 * (6 + 1) + 1 + 4 + 4 == 29
    assert cfg.in_channels() == full.in_channels() - fewer
    model = tiny_model(**{flag: False})
    assert model.inp.in_channels == cfg.in_channels()
    missing = item(1, refs=[None, None], qmap=None, parts=None, pict_type="I")
    batch, outs = run(model, [item(0), missing])
    assert batch.inputs.shape == (2, cfg.in_channels(), H, W)
    assert len(outs) == 3 and all(o.shape == (2, 6, H, W) for o in outs)
    assert all((s.film is None) == (flag == "frame_cond") for s in model.stages)


PERTURB = {  # flag -> a change of one input that only that flag lets into the model
    "references": dict(refs=[reference(7, 28.0), reference(8, 32.0)]),
    "qp_map": dict(qmap=torch.full((1, H, W), 45 / 51)),
    "partitions": dict(parts=torch.zeros(PARTITION_CHANNELS, H, W)),
    "frame_cond": dict(pict_type="P"),
}


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("flag", sorted(PERTURB))
def test_disabled_input_no_longer_affects_the_output(flag, enabled):
    model = tiny_model(**{flag: enabled})
    _, a = run(model, [item(3)])
    _, b = run(model, [item(3, **PERTURB[flag])])
    assert torch.equal(a[-1], b[-1]) != enabled


@pytest.mark.parametrize("which", [0, 1])
def test_each_reference_and_its_cost_reach_the_model(which):
    model = tiny_model()
    base = item(4)
    _, a = run(model, [base])
    moved = item(4)
    moved.refs[which] = Reference(moved.refs[which].pixels + 0.1, moved.refs[which].cost)
    _, b = run(model, [moved])
    assert not torch.equal(a[-1], b[-1])
    costed = item(4)
    costed.refs[which] = Reference(costed.refs[which].pixels, torch.ones(1, H, W), 28.0)
    _, c = run(model, [costed])
    assert not torch.equal(a[-1], c[-1])


def test_assemble_feeds_each_reference_as_its_difference_and_cost():
    model = tiny_model()
    it = item(5)
    batch = collate([it], model, None)
    inp = batch.inputs[0]
    assert inp.shape[0] == 29
    # x 0-5, past - x 6-11, past cost 12, future - x 13-18, future cost 19,
    # QP 20, partitions 21-24, phase 25-28
    assert torch.equal(inp[0:6], it.cur)
    assert torch.allclose(inp[6:12], it.refs[0].pixels - it.cur)
    assert torch.equal(inp[12:13], it.refs[0].cost)
    assert torch.allclose(inp[13:19], it.refs[1].pixels - it.cur)
    assert torch.equal(inp[19:20], it.refs[1].cost)
    assert torch.equal(inp[20:21], it.qmap)
    assert torch.equal(inp[21:25], it.parts)
    assert torch.equal(inp[25:29], phase_planes(H, W))
    # A reference identical to the frame is an all-zero difference.
    refs = torch.stack([it.cur, it.cur])[None]
    costs = torch.zeros(1, REFERENCES, 1, H, W)
    qmap, parts = it.qmap[None], it.parts[None]
    out = model.assemble(it.cur[None], refs, costs, qmap, parts, phase_planes(H, W)[None])
    assert out[0, 6:20].abs().sum() == 0


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


# ---------------------------------------------------------------- batch


def test_collate_fills_missing_side_info_and_references():
    model = tiny_model()
    est = QPEstimator().eval()
    with pytest.raises(ValueError, match="estimator"):
        collate([item(0, qmap=None)], model, None)
    blind = item(0, qmap=None, refs=[None, None], parts=None, frame_qp=None,
                 pict_type="?", seq_qp=None, seq_known=False)  # fmt: skip
    batch = collate([item(1), blind], model, est)
    assert batch.est_qmap.shape == (2, 1, H // 8, W // 8)
    assert ((batch.est_qmap >= 0.1) & (batch.est_qmap <= 1.0)).all()
    qp_est = F.interpolate(batch.est_qmap[1:], scale_factor=8, mode="nearest")[0]
    assert torch.equal(batch.inputs[1, 20:21], qp_est)
    assert torch.equal(batch.inputs[0, 20:21], item(1).qmap)  # a known map wins
    # A missing reference is the frame itself (a zero difference) with the worst cost, 1.
    assert batch.inputs[1, 6:12].abs().sum() == 0 and batch.inputs[1, 13:19].abs().sum() == 0
    assert torch.equal(batch.inputs[1, 12], torch.ones(H, W))
    assert torch.equal(batch.inputs[1, 19], torch.ones(H, W))
    assert batch.inputs[1, 21:25].abs().sum() == 0  # unknown partitions: all zero
    assert batch.frame_qp[0] == 30.0
    assert float(batch.frame_qp[1]) == pytest.approx(float(qp_est.mean()) * 51, rel=1e-5)
    # seq_cond: (seq QP / 51, known)
    assert torch.allclose(batch.seq_cond[0], torch.tensor([28 / 51, 1.0]))
    assert batch.seq_cond[1, 1] == 0.0  # unknown CRF: the estimated QP stands in
    assert batch.seq_cond[1, 0] == pytest.approx(float(batch.frame_qp[1]) / 51, rel=1e-5)
    # frame_cond: QP/51, (QP - seq)/10, I, P, B, has_past, has_future, past and future
    # QP - frame QP (/10), reference QPs known
    assert batch.frame_cond.shape == (2, FRAME_COND)
    want = torch.tensor([30 / 51, 0.2, 0, 0, 1, 1, 1, -0.2, 0.2, 1])
    assert torch.allclose(batch.frame_cond[0], want)
    assert batch.frame_cond[1, 1] == 0.0 and batch.frame_cond[1, 2:].abs().sum() == 0


def test_frame_cond_reference_flags_and_qp_deltas():
    model = tiny_model()

    def cond(**kw):
        return collate([item(2, **kw)], model, QPEstimator().eval()).frame_cond[0].tolist()

    # A P-frame with only its past anchor: the missing future counts as known.
    p = cond(refs=[reference(1, 26.0), None], pict_type="P")
    assert p[2:] == pytest.approx([0, 1, 0, 1, 0, -0.4, 0, 1])
    # An I-frame with no references at all.
    assert cond(refs=[None, None], pict_type="I")[2:] == pytest.approx([1, 0, 0, 0, 0, 0, 0, 1])
    # A reference without a QP (or a frame without one) voids every delta.
    unknown = cond(refs=[reference(1, None), reference(2, 33.0)])
    assert unknown[5:] == pytest.approx([1, 1, 0, 0, 0])
    no_fqp = cond(frame_qp=None)
    assert no_fqp[5:] == pytest.approx([1, 1, 0, 0, 0])


def test_cost_plane_expands_blocks_and_saturates():
    cost = torch.tensor([[0.0, 0.01], [0.05, 1.0]])
    plane = cost_plane(cost, 7, 6)  # crops to the half-res frame
    assert plane.shape == (1, 7, 6)
    assert plane[0, 0, 0] == 0 and plane[0, 3, 3] == 0
    assert float(plane[0, 0, 4]) == pytest.approx(0.01 * COST_SCALE)
    assert float(plane[0, 4, 0]) == 1.0 and float(plane[0, 6, 5]) == 1.0  # clamped to 1
    assert plane.dtype == torch.float32
    assert cost_plane(torch.full((2, 2), -1.0), 8, 8).min() == 0


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
    # The same in bicubic (what apply_flow uses): integer shifts stay exact.
    flow = flow_plane_full(mv, valid, h, w)
    y, _, _ = tensor_to_planes(warp_reference(ref, flow, "bicubic")[0], h, w)
    assert np.array_equal(y[:, :-2], planes[0][:, 2:])
    # Invalid blocks carry no motion.
    assert flow_plane_full(mv, np.zeros(grid, bool), h, w).abs().sum() == 0


def test_qp_partition_and_mask_planes_expand_blocks_to_the_model_grid():
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
    # 8x8 luma blocks are 4x4 model pixels; a short grid is edge-padded to the frame.
    valid = np.array([[True, False], [False, True]])
    m = mask_plane(valid, 10, 8)
    assert m.shape == (1, 10, 8)
    assert m[0, 0, 0] == 1 and m[0, 0, 4] == 0 and m[0, 4, 0] == 0 and m[0, 9, 7] == 1


def test_phase_planes_mark_block_edges():
    ph = phase_planes(16, 16)
    assert ph.shape == (PHASE_CHANNELS, 16, 16)
    # 8x8 luma blocks are 4 model pixels: columns 0, 3, 4, 7, ... are edges.
    assert ph[0, 0].tolist() == [1.0 if x % 4 in (0, 3) else 0.0 for x in range(16)]
    assert ph[1, :, 0].tolist() == ph[0, 0].tolist()
    assert ph[2, 0].tolist() == [1.0 if x % 8 in (0, 7) else 0.0 for x in range(16)]


def test_cpu_has_bf16_follows_cpuinfo():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    assert cpu_has_bf16() is ("amx_bf16" in flags or "avx512_bf16" in flags)


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
    table = pol.tables["h264"]
    assert list(pol.tables) == ["h264"] and table.edges == DEFAULT_EDGES and pol.max_stages == 3
    # Empty bins borrow the nearest calibrated bin.
    assert table.stages == [2, 2, 2, 1, 1, 0, 0, 2, 2]
    assert table.gains[1] == [0.1, 0.28, 0.3] and table.gains[0] == []
    assert calibrate(records, 3, tolerance=0.001).table().stages[1] == 3
    assert pol.stages_for(21.5) == 2 and pol.stages_for(33.0) == 1 and pol.stages_for(39) == 0
    assert pol.stages_for(-5) == 2 and pol.stages_for(200) == 2  # clamped to the end bins
    assert pol.stages_for(None) == 3 and pol.stages_for(float("nan")) == 3
    assert all(type(s) is int for s in table.stages)  # stored in a weights_only model file


def test_calibrate_guards_the_worst_source_and_prices_depth():
    # Bin [20, 24): source a gains, source b loses with every count but 1.
    records = [(22.0, [0.30, 0.40, 0.45])] * 4 + [(22.5, [0.0, -0.05, -0.20])] * 4
    # Bin [36, 40): depth adds 0.10 dB per stage for both sources.
    records += [(38.0, [0.30, 0.40, 0.50])] * 8
    sources = ["a"] * 4 + ["b"] * 4 + ["a", "b"] * 4
    stages = lambda **kw: calibrate(records, 3, tolerance=0.0, **kw).table().stages  # noqa: E731
    plain = stages()
    assert plain[1] == 2 and plain[5] == 3  # the mean alone: b loses 0.05
    guarded = stages(sources=sources, guard=0.03)
    assert guarded[1] == 1 and guarded[5] == 3
    # A source with too few frames in a bin does not veto it.
    assert stages(sources=sources, min_frames=5)[1] == 2
    # Priced: a stage must earn 0.12 dB per unit of time (here one per stage).
    priced = stages(sources=sources, costs=[1, 2, 3], price=0.12)
    assert priced[5] == 1 and priced[1] == 1
    # Every count loses for some source: the frames are passed through.
    lost = [(30.0, [0.2, 0.2, 0.2])] * 4 + [(30.0, [-0.1, -0.1, -0.1])] * 4
    assert calibrate(lost, 3, sources=["a"] * 4 + ["b"] * 4).table().stages[3] == 0


def test_calibrate_picks_the_told_crf_offset_that_gains_most():
    """With ``offsets`` each record holds, per offset, its strengths' gains; a bin keeps
    the (offset, strength) that gains most at its stage count, and the guard holds across
    both (here offset -4 gains most in the mean at QP 22 but loses for source b)."""

    def rec(at_0, at_minus4):  # strengths (0.5, 1.0) x 2 stages, at offsets (-4, 0)
        return [[[d * 0.5 for d in at_minus4], at_minus4], [[d * 0.5 for d in at_0], at_0]]

    records = [(22.0, rec([0.1, 0.2], [0.5, 0.7]))] * 4 + [
        (22.0, rec([0.1, 0.2], [-0.1, -0.1]))
    ] * 4
    records += [(38.0, rec([0.2, 0.4], [0.3, 0.6]))] * 8
    sources = ["a"] * 4 + ["b"] * 4 + ["a", "b"] * 4
    fit = calibrate(records, 2, tolerance=0.0, sources=sources, strengths=[0.5, 1.0],
                    offsets=[-4.0, 0.0]).table()  # fmt: skip
    assert fit.stages[1] == 2 and fit.offsets[1] == 0.0 and fit.strengths[1] == 1.0
    assert fit.stages[5] == 2 and fit.offsets[5] == -4.0
    assert fit.gains[5] == [0.2, 0.4]  # the told estimate's, at full strength
    # A lead smaller than ``offset_margin`` (here 0.2 dB at QP 38) keeps the estimate.
    kept = calibrate(records, 2, tolerance=0.0, sources=sources, strengths=[0.5, 1.0],
                     offsets=[-4.0, 0.0], offset_margin=0.25).table()  # fmt: skip
    assert kept.offsets[5] == 0.0 and kept.stages[5] == 2 and kept.strengths[5] == 1.0
    pol = ExitPolicy({"blind": fit})
    assert pol.offset_for(38.0, "blind") == -4.0 and pol.offset_for(None, "blind") == 0.0
    assert ExitPolicy().offset_for(38.0, "blind") == 0.0
    assert ExitPolicy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol


def test_policy_without_data_runs_everything_and_round_trips():
    empty = calibrate([], max_stages=2)
    assert not empty.has("h264") and empty.stages_for(30.0) == 2
    assert ExitPolicy().stages_for(30.0) == 3 and ExitPolicy().strength_for(30.0) == 1.0
    pol = calibrate([(30.0, [0.2, 0.3]), (45.0, [0.4, 0.4])], max_stages=2, tolerance=0.02)
    d = json.loads(json.dumps(pol.to_dict()))
    back = ExitPolicy.from_dict(d)
    assert back == pol and back.tolerance == 0.02
    assert isinstance(back.tables["h264"], ExitTable)
    assert [back.stages_for(q) for q in (None, 10, 30, 45)] == [2, 2, 2, 1]
    # HEVC has its own table when calibrated, else falls back to the H.264 one.
    assert not back.has("hevc") and back.stages_for(45, "hevc") == 1
    back.set_table("hevc", ExitTable(stages=[0] * 9))
    assert back.stages_for(45, "hevc") == 0 and back.stages_for(45) == 1
    back.set_table("hevc", ExitTable(stages=[0] * 9, strengths=[0.5] * 9))
    assert back.strength_for(45, "hevc") == 0.5 and back.strength_for(45) == 1.0
    back.set_table("blind", pol)  # a policy as calibrate returns it: its H.264 table
    assert back.tables["blind"] == pol.tables["h264"] and back.has("blind")
    assert ExitPolicy.from_dict(json.loads(json.dumps(back.to_dict()))) == back


def test_policy_reads_the_flat_layout_of_model_format_2():
    """vqe-v3.pt's policy: the kind as a prefix of flat fields, one ``edges`` for all."""
    edges = [0.0, 30.0, 99.0]
    flat = {"edges": edges, "stages": [1, 2], "gains": [[0.1], [0.2]], "strengths": [],
            "tolerance": 0.0, "max_stages": 2, "hevc_stages": [0, 1], "hevc_gains": [],
            "hevc_strengths": [0.5, 1.0], "blind_stages": [], "blind_gains": [],
            "blind_strengths": []}  # fmt: skip
    pol = ExitPolicy.from_dict(flat)
    assert pol == ExitPolicy(
        {"h264": ExitTable(edges, [1, 2], [], [[0.1], [0.2]]),
         "hevc": ExitTable(edges, [0, 1], [0.5, 1.0], [])},
        tolerance=0.0, max_stages=2,
    )  # fmt: skip
    assert pol.stages_for(20.0, "blind") == 1 and pol.strength_for(20.0, "hevc") == 0.5
    assert ExitPolicy.from_dict(pol.to_dict()) == pol  # written in the new layout


def test_policy_refuses_what_it_does_not_know():
    """A table or field of a newer vqe is an error, not dropped."""
    good = calibrate([(30.0, [0.2, 0.3])], max_stages=2).to_dict()
    bad = {
        "unknown kind": good | {"tables": good["tables"] | {"av1": good["tables"]["h264"]}},
        "unknown policy field": good | {"price": 0.1},
        "unknown table field": good | {"tables": {"h264": good["tables"]["h264"] | {"caps": []}}},
        "unknown flat field": {"stages": [1], "av1_stages": [2]},
    }
    for d in bad.values():
        with pytest.raises(ValueError, match="unknown .*newer vqe"):
            ExitPolicy.from_dict(d)
    with pytest.raises(ValueError, match="unknown exit table kind"):
        ExitPolicy().set_table("vp9", ExitTable())
    with pytest.raises(ValueError, match="unknown exit table kind"):
        ExitPolicy().stages_for(30.0, "h266")
    with pytest.raises(ValueError, match="blind_qp"):  # the loader takes it out first
        ExitPolicy.from_dict({"stages": [1], "blind_qp": {}})
    assert {"h264", "hevc", "blind", "blind_hevc"} < set(KINDS)


# ---------------------------------------------------------------- model files


def test_save_and_load_model_round_trip(tmp_path):
    model = tiny_model(seed=5, partitions=False)
    est = QPEstimator().eval()
    pol = calibrate([(30.0, [0.1, 0.2, 0.2])], max_stages=3)
    path = tmp_path / "sub" / "m.pt"
    save_model(path, model, est, pol, {"version": "t", "step": 7})
    assert path.exists() and not path.with_suffix(".tmp").exists()
    assert torch.load(path, weights_only=True)["format"] == FORMAT == "vqe-model/3"
    loaded = load_model(path)
    model2, est2, pol2, meta = loaded.network, loaded.estimator, loaded.policy, loaded.meta
    assert model2.cfg == model.cfg and not model2.training and not est2.training
    assert pol2 == pol and meta == {"version": "t", "step": 7}
    items = [item(0, parts=None), item(1, qmap=None, refs=[None, reference(3, 30.0)])]
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
    save_model(str(path), model, est, None, {})  # a str path as well as a Path
    assert load_model(path).policy is None and not load_model(path).pixel_qp


def test_model_file_round_trips_a_network_of_a_routes_own(tmp_path):
    model, other, est = tiny_model(seed=5), tiny_model(seed=6), QPEstimator().eval()
    path = tmp_path / "m.pt"
    save_model(path, model, est, None, {}, own_networks={"hevc": (other, est)})
    assert "hevc_model" in torch.load(path, weights_only=True)  # vqe-v5.pt's keys
    loaded = load_model(path)
    assert set(loaded.own_networks) == {"hevc"}
    network, estimator = loaded.own_networks["hevc"]
    for k, v in other.state_dict().items():
        assert torch.equal(network.state_dict()[k], v.half().float())
    assert network.cfg == model.cfg and not network.training and not estimator.training
    loaded.save(tmp_path / "again.pt")  # kept on the way back
    assert set(load_model(tmp_path / "again.pt").own_networks) == {"hevc"}
    save_model(path, model, est, None, {})
    assert load_model(path).own_networks == {}
    wider = tiny_model(seed=6, partitions=False)  # another config
    with pytest.raises(ValueError, match="main network's config"):
        save_model(path, model, est, None, {}, own_networks={"hevc": (wider, est)})
    with pytest.raises(ValueError, match="unknown route 'av1'"):
        save_model(path, model, est, None, {}, own_networks={"av1": (other, est)})


def test_load_model_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
    cases = {
        "other.pt": {"format": "something-else", "model": {}},
        "v1.pt": {"format": "vqe-model/1", "config": {}, "model": {}},  # the old format
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
    # A newer format is refused as such (written by a later vqe), not read half-way.
    model, est = tiny_model(), QPEstimator()
    save_model(tmp_path / "now.pt", model, est, None, {})
    newer = torch.load(tmp_path / "now.pt", weights_only=True) | {"format": "vqe-model/4"}
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match="format vqe-model/4, newer than this vqe reads"):
        load_model(tmp_path / "newer.pt")


def test_shipped_model_file_saves_and_loads_unchanged(tmp_path):
    """The shipped weights loaded, saved in the current format and loaded again: the same weights,
    policy, decisions and pixel CRF estimate (format 2's reader: test_checkpoint.py)."""
    shipped = load_model()
    shipped.save(tmp_path / "again.pt")
    blob = torch.load(tmp_path / "again.pt", weights_only=True)
    assert blob["format"] == FORMAT and "blind_qp" not in (blob["policy"] or {})
    again = load_model(tmp_path / "again.pt")
    assert again.policy == shipped.policy and again.meta == shipped.meta
    pairs = [(shipped.network, again.network), (shipped.estimator, again.estimator)]
    assert set(again.own_networks) == set(shipped.own_networks)
    for codec, networks in shipped.own_networks.items():
        pairs += zip(networks, again.own_networks[codec], strict=True)
    for a, b in pairs:
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    if shipped.policy is not None:
        for kind in KINDS:
            for qp in (None, 5.0, 21.0, 27.5, 33.0, 47.0, 80.0):
                assert again.policy.stages_for(qp, kind) == shipped.policy.stages_for(qp, kind)
                assert again.policy.strength_for(qp, kind) == shipped.policy.strength_for(qp, kind)
    assert bool(again.pixel_qp) == bool(shipped.pixel_qp)
    if shipped.pixel_qp:
        assert again.pixel_qp.offset == shipped.pixel_qp.offset
        y = np.random.default_rng(0).integers(0, 256, (144, 176), dtype=np.uint8)
        assert again.pixel_qp.frame_qp(y) == shipped.pixel_qp.frame_qp(y)


def test_shipped_weights_load_and_run():
    """Holds for the placeholder and for trained weights alike."""
    assert DEFAULT_WEIGHTS.name == "vqe-v5.pt" and DEFAULT_WEIGHTS.exists()
    assert torch.load(DEFAULT_WEIGHTS, weights_only=True)["format"] in ("vqe-model/2", FORMAT)
    shipped = load_model()
    model, est, pol, meta = shipped.network, shipped.estimator, shipped.policy, shipped.meta
    assert isinstance(model, VQENet) and isinstance(est, QPEstimator)
    assert isinstance(meta, dict) and isinstance(meta.get("version"), str)
    assert model.cfg.in_channels() == model.inp.in_channels
    if pol is not None:
        assert pol.max_stages == model.cfg.stages
        for table in pol.tables.values():
            assert len(table.stages) in (0, len(table.edges) - 1)
            assert all(0 <= s <= model.cfg.stages for s in table.stages)
    it = FrameInputs(cur=torch.rand(6, 16, 16), frame_qp=30.0, pict_type="I")
    batch = collate([it], model, est)
    with torch.no_grad():
        outs = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond)
    assert len(outs) == model.cfg.stages and all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("preset", [None, "512"])
def test_importing_enhancer_widens_onednns_kernel_cache_unless_set(preset):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, enhancer; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True
    )
    assert out.stdout.strip() == (preset or "4096"), out.stderr
