"""enhancer.grain and the exit policy's "_clean" tables: grainy frames are looked up in
the kind's own table, frames without grain in the one calibrated on such frames."""

from __future__ import annotations

import numpy as np
import pytest

import enhancer.engine as engine_module
from enhancer.engine import Engine
from enhancer.grain import grain_level
from enhancer.policy import CLEAN, KINDS, ExitPolicy, ExitTable
from enhancer.training.recalibrate import GRAIN_LIMIT, budgeted_policy, policy_from
from tests.enhancer.test_recalibrate import _rec
from tests.enhancer.tiny import decode, write_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def h264(clip):
    return decode(clip("a.mp4", size=(128, 96), frames=8))


def _ramp(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return 60 + 30 * xx / w + 20 * yy / h


def _noisy(h: int, w: int, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, (h, w))
    return np.clip(np.round(_ramp(h, w) + noise), 0, 255).astype(np.uint8)


def test_grain_level_reads_the_noise_not_the_picture():
    # A smooth ramp reads only its rounding to 8 bits (well below GRAIN_LIMIT).
    assert grain_level(np.round(_ramp(96, 128)).astype(np.uint8)) < 0.25
    for sigma in (1.0, 2.0, 4.0):
        assert grain_level(_noisy(96, 128, sigma)) == pytest.approx(sigma, rel=0.12)
    # Edges and texture are not noise: 8x8 blocks of 60 and 180 levels read as clean.
    blocks = ((np.indices((96, 128)) // 8).sum(0) % 2 * 120 + 60).astype(np.uint8)
    assert grain_level(blocks) < 0.1
    # 10-bit pictures read in 8-bit levels; a large picture is read in bands, alike.
    ten = _noisy(96, 128, 2.0).astype(np.uint16) * 4
    assert grain_level(ten, bit_depth=10) == pytest.approx(grain_level(_noisy(96, 128, 2.0)))
    assert grain_level(_noisy(1080, 1920, 2.0)) == pytest.approx(2.0, rel=0.12)
    assert grain_level(np.zeros((2, 2), np.uint8)) == 0.0


def test_policy_looks_a_frame_up_by_its_grain():
    pol = ExitPolicy(
        {
            "h264": ExitTable(stages=[0] * 9),
            "h264" + CLEAN: ExitTable(stages=[2] * 9, strengths=[0.75] * 9),
            "hevc": ExitTable(stages=[1] * 9),
        },
        grain_limit=0.5,
    )
    base = ("h264", "h264_coarse", "h264_fine", "hevc", "blind", "blind_hevc")
    assert set(KINDS) == set(base) | {k + CLEAN for k in base}
    assert pol.stages_for(30.0, "h264", 0.4) == 2 and pol.strength_for(30.0, "h264", 0.4) == 0.75
    assert pol.stages_for(30.0, "h264", 0.6) == 0 and pol.strength_for(30.0, "h264", 0.6) == 1.0
    assert pol.stages_for(30.0) == 0  # grain not measured: the kind's own table
    assert pol.grain_decides(30.0, "h264") and not pol.grain_decides(30.0, "hevc")
    # A kind without a "_clean" table keeps its own for clean frames too (not h264_clean).
    assert pol.stages_for(30.0, "hevc", 0.1) == 1
    assert ExitPolicy.from_dict(pol.to_dict()) == pol
    assert not ExitPolicy({"h264": ExitTable(stages=[0] * 9)}).grain_decides(30.0)


def test_recalibrate_fits_clean_tables_on_frames_without_grain():
    # At QP 22 the grainy source g loses with any depth and the clean ones gain.
    records = [_rec("libx264", 22, 22.0, s, [0.1, 0.2, 0.3]) | {"grain": 0.2} for s in "ab" * 4]
    records += [_rec("libx264", 22, 22.0, "g", [-0.2, -0.3, -0.4]) | {"grain": 1.0}] * 4
    records += [_rec("libx264", 37, 38.0, s, [0.5, 0.6, 0.7]) | {"grain": 0.1} for s in "abg" * 4]
    pol = policy_from(records, 3, tolerance=0.0)
    assert pol.grain_limit == GRAIN_LIMIT
    assert pol.stages_for(22.0) == 0  # the grainy source is guarded in the kind's table
    assert pol.stages_for(22.0, "h264", 0.2) == 3 and pol.stages_for(22.0, "h264", 1.0) == 0
    # The budget sees each frame in its own table: CRF 22's clean frames now cost time.
    budgeted = budgeted_policy(records, 3, budget=0.5)
    assert budgeted.stages_for(22.0, "h264", 0.2) == 2  # 8 of 12 frames at 2 of 3 stages
    assert budgeted.stages_for(38.0, "h264", 0.1) == 3
    # Records without grain (older ones) give no clean tables.
    old = policy_from([{k: v for k, v in r.items() if k != "grain"} for r in records], 3)
    assert old.grain_limit is None and not old.has("h264" + CLEAN)


def test_engine_measures_grain_and_picks_the_table(h264, tmp_path):
    info, frames = h264
    levels = [grain_level(f.planes[0]) for f in frames]

    def run(limit: float):
        tables = {"h264": ExitTable(stages=[0] * 9), "h264" + CLEAN: ExitTable(stages=[1] * 9)}
        policy = ExitPolicy(tables, max_stages=3, grain_limit=limit)
        engine = Engine(write_weights(tmp_path / f"g{limit}.pt", policy), device="cpu")
        return engine, [r.stages for _, r in engine.process(frames, info)]

    engine, clean = run(max(levels) + 0.1)
    assert clean == [1] * len(frames)
    assert engine.plan_stages(frames[0].side, info) is None  # the pixels decide
    assert engine.plan_stages(frames[0].side, info, stages=2) == 2
    _, grainy = run(min(levels) - 0.1)
    assert grainy == [0] * len(frames)


def test_engine_measures_grain_only_where_it_decides(h264, tmp_path, monkeypatch):
    """Where the clean and the grainy table agree (stages and strength), no frame is
    measured; where only the strength differs, every frame is."""
    info, frames = h264
    measured = []
    monkeypatch.setattr(
        engine_module, "grain_level", lambda y, bd=8: measured.append(1) or grain_level(y, bd)
    )
    for name, strengths, want in (("same", [1.0] * 9, 0), ("weaker", [0.5] * 9, len(frames))):
        tables = {
            "h264": ExitTable(stages=[1] * 9),
            "h264" + CLEAN: ExitTable(stages=[1] * 9, strengths=strengths),
        }
        policy = ExitPolicy(tables, max_stages=3, grain_limit=100.0)
        engine = Engine(write_weights(tmp_path / f"{name}.pt", policy), device="cpu")
        measured.clear()
        assert [r.stages for _, r in engine.process(frames, info)] == [1] * len(frames)
        assert len(measured) == want
