"""enhancer.training.recalibrate: engine records -> the H.264 and HEVC exit policies."""

from __future__ import annotations

import json

import pytest

from enhancer.checkpoint import load_model
from enhancer.policy import ExitTable
from enhancer.training import recalibrate
from enhancer.training.recalibrate import (
    BLIND_OFFSETS,
    EXIT_BUDGET,
    PRICE,
    SCALES,
    _mean_costs,
    budgeted_policy,
    exit_ratio,
    mean_gain,
    policy_from,
)
from tests.enhancer.tiny import tiny_policy, write_weights


def _rec(codec, crf, qp, source, deltas, ms=(10.0, 20.0, 30.0), weak=None):
    """A frame's record; ``weak``: its Δ at strength 0.5 (else every strength gains alike)."""
    table = [[d * (1 - abs(s - 1.0)) for d in deltas] for s in SCALES]
    if weak is not None:
        table[SCALES.index(0.5)] = weak
    return {"codec": codec, "crf": crf, "qp": qp, "source": source, "deltas": table, "ms": ms}


def test_policy_from_engine_records_bins_h264_by_qp_and_hevc_by_crf():
    records = [_rec("libx264", 22, 22.0, s, [0.1, 0.2, 0.3]) for s in "ab" * 4]
    # At QP 38 source b loses with any depth: its bin is passed through.
    records += [_rec("libx264", 37, 38.0, "a", [0.5, 0.6, 0.7])] * 4
    records += [_rec("libx264", 37, 38.0, "b", [-0.2, -0.2, -0.2])] * 4
    # HEVC records are binned by the stream's CRF, not by their frame QP.
    records += [_rec("libx265", 37, 20.0, s, [0.3, 0.3, 0.3]) for s in "ab" * 4]
    # At QP 17 the full correction loses for source b, half of it gains for both.
    records += [_rec("libx264", 15, 17.0, "a", [0.1, 0.1, 0.1], weak=[0.2, 0.2, 0.2])] * 4
    records += [_rec("libx264", 15, 17.0, "b", [-0.1, -0.1, -0.1], weak=[0.1, 0.1, 0.1])] * 4
    pol = policy_from(records, 3, tolerance=0.0)
    assert pol.stages_for(22.0) == 3 and pol.strength_for(22.0) == 1.0
    assert pol.stages_for(38.0) == 0
    assert pol.stages_for(17.0) == 1 and pol.strength_for(17.0) == 0.5
    assert pol.stages_for(37.0, "hevc") == 1 and pol.tables["hevc"].stages[1] == 1
    assert pol.strength_for(37.0, "hevc") == 1.0
    assert _mean_costs(records, 3) == [1.0, 2.0, 3.0]


def test_stages_go_where_early_exit_costs_least_until_it_fits_the_budget():
    # CRF 22 frames (QP 26) run all 3 stages at PRICE, as costly as CRF 37 (QP 38); taking
    # a stage from QP 26 loses less gain per ratio saved than from QP 38, so it goes first.
    records = [_rec("libx264", 22, 26.0, s, [0.10, 0.18, 0.26]) for s in "ab" * 4]
    records += [_rec("libx264", 37, 38.0, s, [0.5, 0.8, 1.0]) for s in "ab" * 4]
    costs = _mean_costs(records, 3)
    full = policy_from(records, 3, tolerance=0.0, price=PRICE)
    assert full.stages_for(26.0) == 3 and exit_ratio(records, full, costs) == 1.0
    policy = budgeted_policy(records, 3)
    assert exit_ratio(records, policy, costs) <= EXIT_BUDGET
    assert policy.stages_for(26.0) == 1 and policy.stages_for(38.0) == 3
    assert mean_gain(records, policy) == pytest.approx((0.10 + 1.0) / 2)


def test_coarsely_coded_streams_get_a_table_outside_the_budget():
    """CRF 27 streams' frames at QP 26 share a bin with CRF 22's, where the budget takes
    stages away: streams that say CRF 25 or more get "h264_coarse", fitted on them alone."""
    records = [_rec("libx264", 22, 26.0, s, [0.10, 0.18, 0.26]) for s in "ab" * 4]
    records += [_rec("libx264", 27, 26.0, s, [0.10, 0.18, 0.26]) for s in "ab" * 4]
    records += [_rec("libx264", 37, 38.0, s, [0.5, 0.8, 1.0]) for s in "ab" * 4]
    costs = _mean_costs(records, 3)
    policy = budgeted_policy(records, 3)
    assert policy.coarse_crf == recalibrate.COARSE_CRF == 25.0
    assert policy.stages_for(26.0, policy.h264_kind(22.0)) == 1  # under the budget
    assert policy.stages_for(26.0, policy.h264_kind(27.0)) == 3
    assert policy.stages_for(26.0, policy.h264_kind(None)) == 1  # a stream that says no CRF
    assert exit_ratio(records, policy, costs) <= EXIT_BUDGET
    assert mean_gain(records, policy) == pytest.approx((0.10 + 0.26 + 1.0) / 3)
    # Without coarse records the table is not made and every stream keeps "h264".
    fine = budgeted_policy([r for r in records if r["crf"] < 25], 3)
    assert fine.coarse_crf is None and fine.h264_kind(37.0) == "h264"


def test_finely_coded_streams_spend_the_budget_on_their_own_frames():
    """In the table of every stream, CRF 27's frames at QP 26 (which gain most from depth)
    win CRF 22's budget for that bin; "h264_fine", fitted on CRF 22's frames alone within the
    same budget, spends it where those gain most (QP 30). Bins none of its frames fall in
    take the every-stream table's counts, not the nearest measured bin's."""
    records = [_rec("libx264", 22, 26.0, s, [0.05, 0.10, 0.15]) for s in "ab" * 2]
    records += [_rec("libx264", 22, 30.0, s, [0.10, 0.30, 0.50]) for s in "ab" * 2]
    records += [_rec("libx264", 27, 26.0, s, [0.30, 0.60, 0.90]) for s in "ab" * 2]
    records += [_rec("libx264", 37, 38.0, s, [0.5, 0.8, 1.0]) for s in "ab" * 2]
    costs = _mean_costs(records, 3)
    policy = budgeted_policy(records, 3)
    fine, nocrf = policy.h264_kind(22.0), policy.h264_kind(None)
    assert (fine, nocrf, policy.h264_kind(27.0)) == ("h264_fine", "h264", "h264_coarse")
    assert [policy.stages_for(q, nocrf) for q in (26.0, 30.0)] == [3, 0]
    assert [policy.stages_for(q, fine) for q in (26.0, 30.0)] == [0, 3]
    assert policy.stages_for(15.0, fine) == policy.stages_for(15.0, nocrf) == 3
    assert exit_ratio(records, policy, costs) <= EXIT_BUDGET
    assert mean_gain(records, policy) == pytest.approx((2 * 0.50 + 2 * 0.90 + 2 * 1.0) / 8)


def test_blind_records_get_their_own_table_by_the_pixel_estimate():
    """Blind records are binned by the CRF the engine estimated from the pixels (their
    "qp") and never feed the aware tables: where a source loses on the blind path its bin
    is passed through there only."""
    aware = [_rec("libx264", 22, 22.0, s, [0.1, 0.2, 0.3]) for s in "ab" * 4]
    blind = []
    for s, d in (("a", [0.3, 0.3, 0.3]), ("b", [-0.5, -0.5, -0.5])):
        for _ in range(4):  # CRF 22, but the pixels say 38
            blind.append(_rec("libx264", 22, 38.0, s, d) | {"path": "blind"})
    blind += [_rec("libx264", 37, 45.0, s, [0.4, 0.5, 0.6]) | {"path": "blind"} for s in "ab" * 4]
    pol = policy_from(aware + blind, 3, tolerance=0.0)
    assert pol.stages_for(22.0) == 3  # the aware table saw no blind record
    assert pol.stages_for(38.0, "blind") == 0
    assert pol.stages_for(45.0, "blind") == 3
    assert pol.stages_for(38.0) == 3  # nearest calibrated aware bin, not the blind one
    alone = policy_from(aware, 3, tolerance=0.0)
    assert not alone.has("blind") and alone.stages_for(38.0, "blind") == 3
    # x265 streams the estimate reads differently: their own table, H.264's unchanged.
    hevc = [_rec("libx265", 22, 45.0, s, [-0.4, -0.4, -0.4]) | {"path": "blind"} for s in "ab" * 4]
    both = policy_from(aware + blind + hevc, 3, tolerance=0.0)
    assert both.stages_for(45.0, "blind_hevc") == 0 and both.stages_for(45.0, "blind") == 3


def test_blind_tables_pick_the_offset_of_the_told_crf_at_full_depth():
    """Blind records measured told the estimate plus BLIND_OFFSETS at full depth: a bin
    takes the offset that gains most there; records made before offsets were fit as
    before (no offsets)."""

    def told(gain_at):  # full-depth gains per offset, alike at every strength
        return {str(o): [gain_at.get(o, 0.0)] * len(SCALES) for o in BLIND_OFFSETS if o}

    low = [_rec("libx264", 22, 22.0, s, [0.1, 0.2, 0.3]) for s in "ab" * 4]
    high = [_rec("libx264", 37, 38.0, s, [0.1, 0.2, 0.3]) for s in "ab" * 4]
    blind = [r | {"path": "blind", "told_deltas": told({-6.0: 0.5})} for r in low]
    blind += [r | {"path": "blind", "told_deltas": told({3.0: 0.4})} for r in high]
    pol = policy_from(low + blind, 3, tolerance=0.0)
    table = pol.table("blind")
    assert pol.offset_for(22.0, "blind") == -6.0 and pol.offset_for(38.0, "blind") == 3.0
    assert pol.stages_for(22.0, "blind") == 3 and table.gains[1] == [0.1, 0.2, 0.3]
    assert pol.table("h264").offsets == []  # the aware tables tell no estimate
    old = [{k: v for k, v in r.items() if k != "told_deltas"} for r in blind]
    assert policy_from(low + old, 3, tolerance=0.0).table("blind").offsets == []


def test_a_path_not_measured_keeps_all_its_tables(tmp_path):
    """Calibrating from codec-aware records only rewrites the aware tables: the blind
    path's, its "_clean" twins included, stay as the model file has them."""
    blind = ExitTable(stages=[1] * 9, strengths=[0.5] * 9)
    blind_clean = ExitTable(stages=[2] * 9, strengths=[0.75] * 9)
    weights = write_weights(
        tmp_path / "w.pt",
        tiny_policy(blind=blind, blind_clean=blind_clean, blind_hevc=blind),
    )
    records = [_rec("libx264", c, float(c), s, [0.1, 0.2, 0.3]) for c in (22, 37) for s in "ab"]
    path = tmp_path / "records.json"
    path.write_text(json.dumps([r | {"grain": 0.3} for r in records]))
    out = tmp_path / "out.pt"
    args = ["--weights", str(weights), "--records", str(path), "--reuse", "--write", str(out)]
    assert recalibrate.main(args) == 0
    policy = load_model(out).policy
    assert policy.tables["h264"] != tiny_policy().tables["h264"]  # the aware one was fitted
    for kind, table in (("blind", blind), ("blind_clean", blind_clean), ("blind_hevc", blind)):
        assert policy.tables[kind] == table, kind
