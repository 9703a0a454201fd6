"""enhancer.engine: streaming order, reference plans, stage counts, precision, tiling.

The engine runs a tiny exported model (8 channels, 3 stages, a known exit
policy, see tests/enhancer/tiny.py) on small real encodes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import enhancer.engine as engine_module
from bitstream.types import RateControl
from enhancer.batch import FrameInputs, collate
from enhancer.checkpoint import load_model
from enhancer.engine import CONTEXT, LARGE_TILE_QP, TILE, Engine, pick_device, transfer_tile
from enhancer.features import cpu_has_bf16, planes_to_tensor, qp_plane
from enhancer.policy import ExitPolicy, ExitTable
from enhancer.references import ANCHOR_TYPES, MAX_PENDING, input_plan, reference_indices
from enhancer.training.data import EncodeSettings, encode_planes
from tests.enhancer.tiny import (
    HEVC_STAGES,
    POLICY_STAGES,
    constant_pixel_qp,
    decode,
    same_planes,
    tiny_policy,
    write_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("w") / "tiny.pt", tiny_policy())


@pytest.fixture(scope="module")
def h264(clip):
    """A 128x96 H.264 clip with I, P and B frames, decoded once with side information."""
    info, frames = decode(clip("a.mp4", size=(128, 96), frames=8))
    assert {f.side.pict_type for f in frames} == {"I", "P", "B"}
    return info, frames


def enhance(engine: Engine, info, frames, **options):
    return list(engine.process(frames, info, **options))


def equal_frames(a: list, b: list) -> list[bool]:
    """Per frame: do two runs (lists of (frame, report) or of frames) hold the same planes?"""
    planes = lambda r: r[0].planes if isinstance(r, tuple) else r.planes  # noqa: E731
    return [same_planes(planes(x), planes(y)) for x, y in zip(a, b, strict=True)]


def spy_alignments(monkeypatch) -> list[tuple[int, int, bool]]:
    """Record (frame index, reference index, bitstream seeds) of every alignment."""
    calls = []
    original = engine_module.align_reference

    def spy(cur, ref, side, distance, bitstream):
        calls.append((side.index, side.index + distance, bitstream))
        return original(cur, ref, side, distance, bitstream)

    monkeypatch.setattr(engine_module, "align_reference", spy)
    return calls


def planned_pairs(frames, plan) -> set[tuple[int, int]]:
    past, future = reference_indices([f.side.pict_type for f in frames], plan)
    return {(t, j) for t in range(len(frames)) for j in (past[t], future[t]) if j >= 0}


# ---------------------------------------------------------------- streaming


def test_engine_streams_in_display_order_with_reports(h264, weights, monkeypatch):
    info, frames = h264
    pulled = []

    def source():
        for f in frames:
            pulled.append(f.index)
            yield f

    calls = spy_alignments(monkeypatch)
    engine = Engine(weights, device="cpu")
    assert engine.policy is not None
    results = []
    for out, rep in engine.process(source(), info):
        results.append((out, rep))
        assert len(pulled) - len(results) <= MAX_PENDING
        if out.side.pict_type in ANCHOR_TYPES:
            assert pulled[-1] == out.index  # an anchor comes out as soon as it is in
        else:  # a B-frame is held back until its next anchor has arrived
            later = [f.index for f in frames[out.index + 1 :] if f.side.pict_type in ANCHOR_TYPES]
            assert not later or later[0] in pulled
    assert pulled == [f.index for f in frames]  # everything consumed, once
    assert [out.index for out, _ in results] == [f.index for f in frames]  # display order kept
    # The codec-aware path: the quality-peak anchors, seeded by the bitstream's vectors;
    # a frame the stream's QP gives 0 stages is not aligned at all.
    ran = {rep.index for _, rep in results if rep.stages}
    pairs = planned_pairs(frames, input_plan("h264"))
    assert {(t, j) for t, j, _ in calls} == {(t, j) for t, j in pairs if t in ran} != pairs
    assert all(bits for _, _, bits in calls)
    for (out, rep), src in zip(results, frames, strict=True):
        assert rep.index == out.index == src.index
        assert out.side is src.side and out.av_frame is src.av_frame
        for a, b in zip(out.planes, src.planes, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert rep.side_info == "bitstream"
        assert rep.qp == pytest.approx(src.side.qp)
        assert rep.stages == engine.policy.stages_for(rep.qp)
        assert rep.stages == engine.plan_stages(src.side, info)  # known before the pixels
        assert rep.seconds > 0
        assert same_planes(out.planes, src.planes) == (rep.stages == 0)
    assert {0, 1, 2} <= {rep.stages for _, rep in results}  # the policy really decides


def test_engine_holds_back_at_most_max_pending_frames(clip, weights):
    info, frames = decode(clip("b.mp4", size=(64, 48), frames=MAX_PENDING + 4))
    # A stream whose B-frames never see a future anchor.
    frames = [frames[0]] + [replace(f, side=replace(f.side, pict_type="B")) for f in frames[1:]]
    pulled, lags = [], []

    def source():
        for f in frames:
            pulled.append(f.index)
            yield f

    results = []
    for out, _ in Engine(weights, device="cpu").process(source(), info, stages=1):
        results.append(out.index)
        lags.append(len(pulled) - len(results))
    assert results == [f.index for f in frames]
    assert max(lags) == MAX_PENDING  # they wait, but no longer than that
    assert lags[-1] == 0


def test_engine_fixed_stage_counts(h264, weights):
    info, frames = h264
    engine = Engine(weights, device="cpu")
    one = enhance(engine, info, frames, stages=1)
    three = enhance(engine, info, frames, stages="3")
    none = enhance(engine, info, frames, stages=0)
    assert [r.stages for _, r in one] == [1] * len(frames)
    assert [r.stages for _, r in three] == [3] * len(frames)
    assert [r.stages for _, r in none] == [0] * len(frames)
    assert all(equal_frames(none, frames))  # 0 stages: exactly the decoded planes
    assert not any(equal_frames(three, frames))
    assert not all(equal_frames(one, three))
    assert engine.plan_stages(frames[0].side, info, stages=1) == 1
    # The engine can be used again, for the same result.
    assert all(equal_frames(enhance(engine, info, frames, stages=1), one))


def test_engine_recurrence_borrows_the_enhanced_anchors(h264, weights):
    info, frames = h264
    recurrent, engine = Engine(weights, device="cpu", recurrent=True), Engine(weights, device="cpu")
    rec = enhance(recurrent, info, frames, stages=3)
    plain = enhance(engine, info, frames, stages=3)
    same = equal_frames(rec, plain)
    assert same[0]  # the first I-frame has nothing to borrow
    assert not any(same[1:])  # every other frame borrows the (enhanced or decoded) frame 0 on
    # With no stages nothing is enhanced, so there is nothing different to borrow.
    a = enhance(recurrent, info, frames, stages=0)
    b = enhance(engine, info, frames, stages=0)
    assert all(equal_frames(a, b))


def test_engine_hands_the_network_the_references_its_model_file_names(h264, tmp_path):
    """meta "references": "enhanced" makes the engine recurrent by default (what such a
    network was trained and measured with); "decoded" or none, not; an explicit
    ``recurrent`` wins; an unknown value is refused."""
    info, frames = h264
    plain = load_model(write_weights(tmp_path / "plain.pt", tiny_policy()))
    for refs in ("enhanced", "decoded", "sideways"):
        replace(plain, meta=plain.meta | {"references": refs}).save(tmp_path / f"{refs}.pt")
    assert Engine(tmp_path / "enhanced.pt", device="cpu").recurrent
    assert not Engine(tmp_path / "decoded.pt", device="cpu").recurrent
    assert not Engine(tmp_path / "plain.pt", device="cpu").recurrent
    assert not Engine(tmp_path / "enhanced.pt", device="cpu", recurrent=False).recurrent
    by_file = enhance(Engine(tmp_path / "enhanced.pt", device="cpu"), info, frames, stages=3)
    asked = enhance(
        Engine(tmp_path / "plain.pt", device="cpu", recurrent=True), info, frames, stages=3
    )
    assert all(equal_frames(by_file, asked))
    decoded = enhance(Engine(tmp_path / "decoded.pt", device="cpu"), info, frames, stages=3)
    assert not all(equal_frames(by_file, decoded))
    with pytest.raises(ValueError, match="references must be one of"):
        Engine(tmp_path / "sideways.pt", device="cpu")
    # A codec's own network says its own.
    other = load_model(write_weights(tmp_path / "other.pt", tiny_policy(), seed=2))
    meta = plain.meta | {"references": "enhanced", "hevc_references": "decoded"}
    networks = {"hevc": (other.network, other.estimator)}
    replace(plain, meta=meta, own_networks=networks).save(tmp_path / "both.pt")
    both = Engine(tmp_path / "both.pt", device="cpu")
    assert both.recurrent and not both.own_networks["hevc"].recurrent
    assert Engine(tmp_path / "both.pt", device="cpu", recurrent=True).own_networks["hevc"].recurrent


def test_engine_rejects_bad_settings(weights, tmp_path):
    engine = Engine(weights, device="cpu")
    # Per-call options are refused when called, before any frame is pulled.
    with pytest.raises(ValueError, match="stages"):
        engine.process(iter(()), None, stages=4)
    with pytest.raises(ValueError, match="stages"):
        engine.plan_stages(None, None, stages=-1)
    with pytest.raises(ValueError, match="side_info"):
        engine.process(iter(()), None, side_info="psychic")
    with pytest.raises(ValueError, match="precision"):
        Engine(weights, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    with pytest.raises(FileNotFoundError):
        Engine(tmp_path / "missing.pt", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_engine_device_and_precision_on_cpu(weights):
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        pick_device("cuda")
    engine = Engine(weights)
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert next(engine.model.parameters()).device.type == "cpu"
    assert engine.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert engine.autocast == cpu_has_bf16()
    fp32 = Engine(weights, device="cpu", precision="fp32")
    assert fp32.precision == "fp32" and not fp32.autocast
    bf16 = Engine(weights, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.autocast


def test_engine_without_a_policy_runs_every_stage(h264, tmp_path):
    info, frames = h264
    engine = Engine(write_weights(tmp_path / "nopol.pt"), device="cpu")
    assert engine.policy is None
    reports = [r for _, r in enhance(engine, info, frames[:3])]
    assert [r.stages for r in reports] == [3, 3, 3]
    assert engine.plan_stages(frames[0].side, info) == 3


def test_engine_gives_streams_of_a_coarse_crf_their_table(h264, tmp_path):
    """An H.264 stream that says a CRF of at least the policy's ``coarse_crf`` is looked up
    in "h264_coarse", one below it in "h264_fine" (in "h264" where the file has none), one
    that says none in "h264"."""
    info, frames = h264
    assert info.sequence_qp is not None  # x264's options SEI
    side = frames[0].side
    below = info.sequence_qp + 1
    fine = {"h264_fine": ExitTable(stages=[3] * 9)}
    for coarse_crf, kind, more in (
        (info.sequence_qp, "h264_coarse", fine),
        (below, "h264_fine", fine),
        (below, "h264", {}),
    ):
        policy = tiny_policy(h264_coarse=ExitTable(stages=[2] * 9), **more)
        policy.coarse_crf = coarse_crf
        engine = Engine(write_weights(tmp_path / f"{kind}.pt", policy), device="cpu")
        want = policy.stages_for(side.qp, kind)
        assert engine.plan_stages(side, info) == want
        assert [r.stages for _, r in enhance(engine, info, frames[:1])] == [want]
    assert want == POLICY_STAGES[ExitTable().bin(side.qp)] not in (2, 3)
    nocrf = replace(info, rate_control=replace(info.rate_control, crf=None, qp=None))
    policy.coarse_crf = 0.0
    engine = Engine(write_weights(tmp_path / "any.pt", policy), device="cpu")
    assert engine.plan_stages(side, info) == 2 and engine.plan_stages(side, nocrf) == want


# ---------------------------------------------------------------- side information


def test_engine_blind_uses_adjacent_frames_and_reports_estimated(h264, weights, monkeypatch):
    info, frames = h264
    calls = spy_alignments(monkeypatch)
    engine = Engine(weights, device="cpu")
    blind_opts = {"stages": 2, "side_info": "blind"}
    pulled, lags = [], []

    def source(fs):
        for f in fs:
            pulled.append(f.index)
            yield f

    blind = []
    for r in engine.process(source(frames), info, **blind_opts):
        blind.append(r)
        lags.append(len(pulled) - len(blind))
    assert max(lags) == 1  # one frame of look-ahead
    assert [out.index for out, _ in blind] == [f.index for f in frames]
    n = len(frames)
    assert {(t, j) for t, j, _ in calls} == {(t, j) for t in range(n) for j in (t - 1, t + 1)
                                             if 0 <= j < n}  # fmt: skip
    assert not any(bits for _, _, bits in calls)  # aligned by search only
    bits = enhance(engine, info, frames, stages=2, side_info="bitstream")
    assert [r.side_info for _, r in blind] == ["estimated"] * n
    assert [r.side_info for _, r in bits] == ["bitstream"] * n
    for _, r in blind:
        assert 0.1 * 51 - 1e-3 <= r.qp <= 51 + 1e-3  # the estimator's clamped range
    assert not all(equal_frames(blind, bits))
    assert engine.plan_stages(frames[0].side, info, **blind_opts) == 2
    # On auto the blind path's QP is estimated: unknown before the pixels.
    assert engine.plan_stages(frames[0].side, info, side_info="blind") is None
    # Only the neighbours matter: change frame 4 and frames 3-5 change, the others do not.
    altered = list(frames)
    altered[4] = replace(frames[4], planes=tuple(255 - p for p in frames[4].planes))
    changed = enhance(engine, info, altered, **blind_opts)
    assert equal_frames(changed, blind) == [True, True, True, False, False, False, True, True]


def test_engine_gives_each_route_the_files_network_for_it(clip, h264, tmp_path):
    """A model file with networks of their own for HEVC and for the blind path: HEVC streams
    on the codec-aware path run HEVC's (as if it were the file's only network), every stream
    on the blind path the blind one, H.264 streams on the codec-aware path the main one."""
    main = load_model(write_weights(tmp_path / "main.pt", tiny_policy(), seed=1))
    nets = {
        name: load_model(write_weights(tmp_path / f"{name}.pt", tiny_policy(), seed=seed))
        for name, seed in (("hevc", 2), ("blind", 3))
    }
    both = tmp_path / "both.pt"
    own = {name: (m.network, m.estimator) for name, m in nets.items()}
    replace(main, own_networks=own).save(both)
    path = clip("h27.mp4", codec="libx265", size=(64, 48), frames=6,
                options={"crf": "27", "x265-params": "log-level=none"})  # fmt: skip
    hevc = decode(path)
    engines = {name: Engine(tmp_path / f"{name}.pt", device="cpu") for name in ("main", *nets)}
    combined = Engine(both, device="cpu")
    assert set(combined.own_networks) == {"hevc", "blind"} and engines["main"].own_networks == {}
    for (info, frames), opts, same_as in (
        (hevc, {"stages": 3}, "hevc"),
        (hevc, {"stages": 3, "side_info": "blind"}, "blind"),
        (h264, {"stages": 3}, "main"),
        (h264, {"stages": 3, "side_info": "blind"}, "blind"),
    ):
        got = enhance(combined, info, frames, **opts)
        assert all(equal_frames(got, enhance(engines[same_as], info, frames, **opts)))
    assert not all(equal_frames(enhance(engines["main"], *hevc, stages=3),
                                enhance(engines["hevc"], *hevc, stages=3)))  # fmt: skip
    blind = {"stages": 3, "side_info": "blind"}
    assert not all(equal_frames(enhance(engines["main"], *h264, **blind),
                                enhance(engines["blind"], *h264, **blind)))  # fmt: skip


def test_engine_hevc_takes_the_peaks_plan_with_header_qp(clip, weights, monkeypatch):
    """HEVC: picture types and QP from the slice headers, quality-peak anchors aligned by
    search (no vectors), an estimated QP map; stages from the HEVC table by CRF."""
    path = clip("h27.mp4", codec="libx265", size=(64, 48), frames=6,
                options={"crf": "27", "x265-params": "log-level=none"})  # fmt: skip
    info, frames = decode(path)
    assert info.codec == "hevc" and info.sequence_qp == 27
    assert frames[0].side.sources["qp_map"] == "header"
    assert "B" in {f.side.pict_type for f in frames}
    calls = spy_alignments(monkeypatch)
    engine = Engine(weights, device="cpu")
    results = enhance(engine, info, frames)
    assert [out.index for out, _ in results] == [f.index for f in frames]
    assert {(t, j) for t, j, _ in calls} == planned_pairs(frames, input_plan("hevc"))
    assert not any(bits for _, _, bits in calls)
    want = HEVC_STAGES[2]  # CRF 27 is in the [24, 28) bin of the HEVC table
    assert want == engine.policy.stages_for(27.0, "hevc") != engine.policy.stages_for(27.0)
    # Neither table at the frames' own QP would answer the same: the CRF is what counts.
    reports = [rep for _, rep in results]
    assert any(engine.policy.stages_for(r.qp, "hevc") != want for r in reports)
    assert any(engine.policy.stages_for(r.qp) != want for r in reports)
    for (out, rep), src in zip(results, frames, strict=True):
        assert rep.side_info == "estimated"
        assert rep.qp == pytest.approx(src.side.qp)  # the slice header's QP
        assert rep.stages == want == engine.plan_stages(src.side, info)
        assert not same_planes(out.planes, src.planes)


# ---------------------------------------------------------------- sizes


def test_engine_tiles_large_frames_seamlessly(h264, weights):
    info, frames = h264
    calls = {}

    def counted(engine, key):
        calls[key] = 0

        def hook(*_):
            calls[key] += 1

        engine.model.register_forward_hook(hook)
        return engine

    # Without transfer, which would run the network on changed tiles only.
    kw = {"device": "cpu", "transfer": False}
    whole_engine = counted(Engine(weights, tile=0, **kw), "whole")
    tiled_engine = counted(Engine(weights, tile=32, **kw), "tiled")
    whole = enhance(whole_engine, info, frames, stages=3)
    tiled = enhance(tiled_engine, info, frames, stages=3)
    auto = enhance(counted(Engine(weights, **kw), "auto"), info, frames, stages=3)
    n = len(frames)
    assert calls == {"whole": n, "tiled": 4 * n, "auto": n}  # 64x48 model grid: 2x2 tiles
    for (a, _), (b, _), (c, _) in zip(whole, tiled, auto, strict=True):
        assert same_planes(a.planes, c.planes)
        for x, y in zip(a.planes, b.planes, strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    # Before rounding, in fp32: the overlap hides the seams entirely.
    whole_fp32 = Engine(weights, device="cpu", tile=0, precision="fp32")
    tiled_fp32 = Engine(weights, device="cpu", tile=32, precision="fp32")
    cur = planes_to_tensor(frames[0].planes)
    qmap = qp_plane(frames[0].side.qp_map, *cur.shape[1:])
    it = FrameInputs(cur=cur, qmap=qmap, frame_qp=frames[0].side.qp, pict_type="I")
    batch = collate([it], whole_fp32.model, whole_fp32.estimator)
    a, b = whole_fp32._run_model(batch, 3), tiled_fp32._run_model(batch, 3)
    assert float((a - b).abs().max()) < 1e-5 < float((a - batch.x).abs().max())


def test_engine_tiles_a_coarse_network_with_one_context_a_frame(h264, tmp_path):
    """The coarse branch runs once on the whole frame, however many tiles, and the
    tiles see its whole-frame context: fp32 tiles match the whole frame."""
    info, frames = h264
    weights = write_weights(tmp_path / "coarse.pt", tiny_policy(), coarse=8)
    whole = Engine(weights, device="cpu", tile=0, precision="fp32")
    tiled = Engine(weights, device="cpu", tile=32, precision="fp32")
    calls = []
    tiled.model.coarse.register_forward_hook(lambda *_: calls.append(1))
    cur = planes_to_tensor(frames[0].planes)
    qmap = qp_plane(frames[0].side.qp_map, *cur.shape[1:])
    it = FrameInputs(cur=cur, qmap=qmap, frame_qp=frames[0].side.qp, pict_type="I")
    batch = collate([it], whole.model, whole.estimator)
    a, b = whole._run_model(batch, 3), tiled._run_model(batch, 3)
    assert len(calls) == 1  # 2x2 tiles
    assert float((a - b).abs().max()) < 1e-5 < float((a - batch.x).abs().max())


def test_engine_ten_bit_odd_size(clip, weights):
    info, frames = decode(clip("ten.mp4", size=(90, 70), frames=3, pix_fmt="yuv420p10le"))
    assert info.bit_depth == 10
    results = enhance(Engine(weights, device="cpu"), info, frames, stages=2)
    assert len(results) == 3
    for (out, rep), src in zip(results, frames, strict=True):
        assert rep.side_info == "bitstream"
        assert [p.shape for p in out.planes] == [(70, 90), (35, 45), (35, 45)]
        assert all(p.dtype == np.uint16 and p.max() <= 1023 for p in out.planes)
        assert not same_planes(out.planes, src.planes)
        # 10-bit stays 10-bit: the output is near the input, not squeezed into 8 bits.
        assert out.planes[0].max() > 255
        assert np.abs(out.planes[0].astype(int) - src.planes[0].astype(int)).mean() < 60


def _static_clip(tmp_path):
    """Eight frames of a still background where one square moves in the top-left corner."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    chroma = np.full((96, 128), 128, np.uint8)
    planes = []
    for t in range(8):
        y = base.copy()
        y[16:48, 8 + 4 * t : 40 + 4 * t] = 255
        planes.append((y, chroma, chroma))
    path = tmp_path / "static.mp4"
    path.write_bytes(encode_planes(planes, EncodeSettings(crf=30)))
    return decode(path)


# The still region of _static_clip: far from the square and its context.
STILL = (slice(96, None), slice(128, None))


def test_engine_transfers_what_the_encoder_copied(tmp_path, weights):
    """A static background: its blocks take the enhanced anchor's pixels; only changed tiles run."""
    info, frames = _static_clip(tmp_path)
    computed = {}

    def counting(engine, key):
        computed[key] = 0

        def hook(_, args):
            computed[key] += args[0].shape[-2] * args[0].shape[-1]

        engine.model.register_forward_pre_hook(hook)
        return engine

    fast = enhance(counting(Engine(weights, device="cpu"), "transfer"), info, frames, stages=3)
    full = enhance(
        counting(Engine(weights, device="cpu", transfer=False), "full"), info, frames, stages=3
    )
    assert fast[0][1].transferred == 0 and same_planes(fast[0][0].planes, full[0][0].planes)
    assert all(r.transferred > 0.5 for _, r in fast[1:])
    assert all(r.transferred == 0 for _, r in full)
    assert computed["transfer"] < 0.6 * computed["full"]
    first = fast[0][0].planes[0][STILL]
    for (f, _), (g, _) in zip(fast[1:], full[1:], strict=True):
        assert np.array_equal(f.planes[0][STILL], first)  # the enhanced anchor, carried on
        assert not np.array_equal(g.planes[0][STILL], first)  # enhanced again from the decode


def test_engine_transfers_from_anchors_the_policy_passed_through(tmp_path):
    """Where the policy passes the anchors through and runs the B-frames between them, the
    B-frames' blocks that match an anchor take its output, its decode, as the policy judged
    the anchor's frame: they are not computed (without this they all were, and such a
    stream cost 3x the network time of one whose every frame ran)."""
    info, frames = _static_clip(tmp_path)
    side = [f.side for f in frames]
    anchor_qps = [s.qp for s in side if s.pict_type in ANCHOR_TYPES]
    b_qps = [s.qp for s in side if s.pict_type == "B"]
    lo, hi = min(b_qps) - 0.5, max(b_qps) + 0.5
    assert b_qps and not any(lo <= q < hi for q in anchor_qps)
    policy = ExitPolicy({"h264": ExitTable([0.0, lo, hi, 99.0], [0, 3, 0])}, max_stages=3)
    engine = Engine(write_weights(tmp_path / "b.pt", policy), device="cpu")
    results = enhance(engine, info, frames)
    for (out, r), src in zip(results, frames, strict=True):
        if src.side.pict_type == "B":
            assert r.stages == 3 and r.transferred > 0.5
            assert np.array_equal(out.planes[0][STILL], src.planes[0][STILL])
        else:
            assert r.stages == 0 and same_planes(out.planes, src.planes)


def test_engine_weakens_the_correction_by_the_policy_strength(h264, tmp_path):
    """Each QP bin's strength scales what the network adds to the frame (transfer off, so
    every pixel is computed): half strength lands half-way between input and full."""
    info, frames = h264
    runs = {}
    for s in (1.0, 0.5):
        pol = ExitPolicy({"h264": ExitTable(stages=[3] * 9, strengths=[s] * 9)}, max_stages=3)
        engine = Engine(write_weights(tmp_path / f"s{s}.pt", pol), device="cpu", transfer=False)
        assert engine.policy.strength_for(30.0) == s
        runs[s] = enhance(engine, info, frames)
    for (full, _), (half, rep), src in zip(runs[1.0], runs[0.5], frames, strict=True):
        x, f, h = (np.asarray(p.planes[0], np.float64) for p in (src, full, half))
        assert rep.stages == 3 and np.abs(f - x).max() >= 2
        assert np.abs(h - (x + 0.5 * (f - x))).max() <= 1.0  # rounding to 8 bits


def test_engine_tells_the_network_a_pixel_crf_estimate_without_a_crf(h264, tmp_path):
    """With no CRF in the stream, the blind path tells the network the CRF its pixel
    estimate gives (here read QP 27.5 less 8) as if the stream had said it, and picks
    stages by it (its bin passes through). The blind path reads no CRF from the stream
    either (x264's options SEI); the codec-aware path uses the stream's and no estimate."""
    info, frames = h264
    assert info.sequence_qp is not None
    no_crf = replace(info, rate_control=RateControl(), encoder=None)
    told = replace(info, rate_control=RateControl(mode="crf", crf=19.5))
    pol = tiny_policy(blind=ExitTable(stages=[0, 3, 3, 3, 3, 3, 3, 3, 3], strengths=[1.0] * 9))
    weights = write_weights(tmp_path / "blind.pt", pol, pixel_qp=constant_pixel_qp(27.5))
    engine = Engine(weights, device="cpu")
    blind = enhance(engine, no_crf, frames, side_info="blind")
    assert [r.stages for _, r in blind] == [0] * len(frames)
    assert [r.qp for _, r in blind] == [19.5] * len(frames)
    assert all(equal_frames(blind, frames))
    known = enhance(engine, info, frames, side_info="blind")  # the stream's CRF is not read
    assert [r.qp for _, r in known] == [19.5] * len(frames)
    assert all(equal_frames(known, frames))
    estimated = [
        f.planes[0] for f, _ in enhance(engine, no_crf, frames, side_info="blind", stages=3)
    ]
    # A codec with no side information takes the blind plan on ``auto`` and reads the
    # stream's CRF: told 19.5, the network gives what it gave on the estimate.
    vp9 = replace(told, codec="vp9")
    said = [f.planes[0] for f, _ in enhance(engine, vp9, frames, stages=3)]
    plain = write_weights(tmp_path / "plain.pt", tiny_policy())
    unknown = enhance(Engine(plain, device="cpu"), no_crf, frames, side_info="blind", stages=3)
    assert all((a == b).all() for a, b in zip(estimated, said, strict=True))
    assert any((a != f.planes[0]).any() for a, (f, _) in zip(estimated, unknown, strict=True))
    aware = enhance(engine, no_crf, frames)
    assert [r.stages for _, r in aware] == [pol.stages_for(r.qp) for _, r in aware]
    assert any(r.stages for _, r in aware)


def test_engine_tells_the_network_the_estimate_plus_the_tables_offset(h264, tmp_path):
    """A blind table's offset in the estimate's bin is added to the CRF the network is
    told: told 27.5 - 8 + 4, it gives what it gives on a stream that says CRF 23.5; the
    report and the table's bin keep the estimate."""
    info, frames = h264
    no_crf = replace(info, rate_control=RateControl(), encoder=None, codec="vp9")
    said = replace(no_crf, rate_control=RateControl(mode="crf", crf=23.5))
    pol = tiny_policy(blind=ExitTable(stages=[3] * 9, offsets=[4.0] + [0.0] * 8))
    weights = write_weights(tmp_path / "o.pt", pol, pixel_qp=constant_pixel_qp(27.5))
    engine = Engine(weights, device="cpu")
    offset = enhance(engine, no_crf, frames[:3], side_info="blind", stages=3)
    assert [r.qp for _, r in offset] == [19.5] * 3
    told = enhance(engine, said, frames[:3], stages=3)
    untold = enhance(engine, replace(said, rate_control=RateControl(mode="crf", crf=19.5)),
                     frames[:3], stages=3)  # fmt: skip
    pairs = list(zip(offset, told, untold, strict=True))
    assert all((a.planes[0] == b.planes[0]).all() for (a, _), (b, _), _ in pairs)
    assert any((a.planes[0] != c.planes[0]).any() for (a, _), _, (c, _) in pairs)


def test_engine_blind_hevc_without_a_crf_takes_its_own_table(clip, tmp_path):
    """x265 streams without a CRF follow the HEVC blind table (the estimate reads x265
    otherwise than x264), H.264 ones the blind table."""
    path = clip("h27nocrf.mp4", codec="libx265", size=(64, 48), frames=4,
                options={"crf": "27", "x265-params": "log-level=none"})  # fmt: skip
    info, frames = decode(path)
    no_crf = replace(info, rate_control=RateControl(), encoder=None)
    pol = tiny_policy(blind=ExitTable(stages=[3] * 9, strengths=[1.0] * 9),
                      blind_hevc=ExitTable(stages=[2] * 9, strengths=[1.0] * 9))  # fmt: skip
    weights = write_weights(tmp_path / "hevc.pt", pol, pixel_qp=constant_pixel_qp(40.0))
    engine = Engine(weights, device="cpu")
    reports = [r for _, r in enhance(engine, no_crf, frames, side_info="blind")]
    assert [r.stages for r in reports] == [2] * len(frames)
    assert all(r.qp == pytest.approx(32.0, abs=0.1) for r in reports)


def test_changed_rectangles_run_as_one_call_per_crop_height(tmp_path, weights, monkeypatch):
    """Two squares moving apart: several changed rectangles, one network call per height."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (12, 16), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    chroma = np.full((96, 128), 128, np.uint8)
    planes = []
    for t in range(6):
        y = base.copy()
        y[16:48, 8 + 4 * t : 40 + 4 * t] = 255
        y[16:48, 200 - 4 * t : 232 - 4 * t] = 0
        planes.append((y, chroma, chroma))
    path = tmp_path / "two.mp4"
    path.write_bytes(encode_planes(planes, EncodeSettings(crf=30)))
    info, frames = decode(path)
    engine = Engine(weights, device="cpu")
    calls: list = []  # per transferred frame: the shapes the network ran on
    rects: list = []  # and its changed rectangles
    inside = [False]
    engine.model.register_forward_pre_hook(
        lambda _, args: calls[-1].append(args[0].shape) if inside[0] else None
    )
    run_changed = engine._run_changed

    def counted(batch, stages, strength, runs, source, model=None):
        rects.append(runs)
        calls.append([])
        inside[0] = True
        try:
            return run_changed(batch, stages, strength, runs, source, model)
        finally:
            inside[0] = False

    monkeypatch.setattr(engine, "_run_changed", counted)
    results = enhance(engine, info, frames, stages=3)
    assert sum(r.transferred > 0 for _, r in results) >= 3
    h = frames[0].planes[0].shape[0] // 2
    for found, made in zip(rects, calls, strict=True):
        heights = {min(y1 + CONTEXT, h) - max(y0 - CONTEXT, 0) for y0, y1, _, _ in found}
        assert sorted(s[-2] for s in made) == sorted(heights)
    assert any(len(found) > len(made) for found, made in zip(rects, calls, strict=True))


def test_transfer_tile_grows_at_high_qp():
    assert transfer_tile(None) == transfer_tile(LARGE_TILE_QP - 1) == TILE
    assert transfer_tile(LARGE_TILE_QP) == 2 * TILE
