"""The output keeps the gain (issue 11): the rate table, untouched GOPs copied, remuxes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import av
import av.logging
import numpy as np
import pytest

from bitstream.errors import UnsupportedOutput, UserError
from enhancer.options import QUALITIES, EnhanceOptions, parse_options
from enhancer.output_rate import DEFAULT_TABLE, OutputRate, RateEntry, choose_rate
from enhancer.pipeline import Pipeline
from enhancer.training.rate_calibration import (
    REENCODES,
    build_tables,
    format_tables,
    merged,
    stored_records,
)

GOPS = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "3", "crf": "30"}


@dataclass
class Report:
    index: int
    stages: int
    side_info: str = "bitstream"
    qp: float | None = None
    seconds: float = 0.0


def _table(copy: bool, high: bool = True) -> dict:
    entry = RateEntry(30, 10, copy, 0.2, 0.01, 1.5, 0.3)
    tables = {"balanced": [entry], "compact": [entry]}
    if high:
        tables["high"] = [RateEntry(30, 16, copy, 0.3, 0.0, 2.5, 0.3)]
    return {"output_rate": OutputRate(tables).to_dict()}


class GopEngine:
    """Enhances (brightens) the frames of the GOPs in ``enhanced`` (10 frames each)."""

    def __init__(self, enhanced: set[int], copy: bool = False, high: bool = True):
        self.enhanced = enhanced
        self.meta = _table(copy, high)

    def plan_stages(self, side, info, stages="auto", side_info="auto"):
        return 1 if side.index // 10 in self.enhanced else 0

    def process(self, frames, info, stages="auto", side_info="auto"):
        for frame in frames:
            n = self.plan_stages(frame.side, info)
            if n:
                y, u, v = frame.planes
                frame = replace(
                    frame, planes=(np.clip(y.astype(int) + 8, 0, 255).astype(np.uint8), u, v)
                )
            yield frame, Report(frame.index, n, qp=frame.side.qp)


def _video_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def _decode(path):
    with av.logging.Capture() as logs, av.open(str(path)) as c:
        frames = list(c.decode(c.streams.video[0]))
    errors = [m for level, _, m in logs if level is not None and level <= av.logging.ERROR]
    return frames, errors


@pytest.fixture
def gop_clip(clip):
    return clip("gops.mp4", frames=30, options=GOPS, audio=True)


def test_nothing_enhanced_gives_identical_video_packets(gop_clip, tmp_path):
    out = tmp_path / "out.mp4"
    result = Pipeline(engine=GopEngine(set())).run(gop_clip, out)
    assert result.passthrough and result.gops == result.gops_copied == 3
    assert result.frames == 30 and result.stages_histogram == {0: 30}
    assert result.expected_gain_db == 0.0 and result.codec == "copy"
    assert _video_packets(out) == _video_packets(gop_clip)
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1


def test_stages_zero_with_the_real_engine_is_a_remux(gop_clip, tmp_path):
    out = tmp_path / "out.mkv"
    result = Pipeline(device="cpu").run(gop_clip, out, {"stages": 0})
    assert result.passthrough
    assert _video_packets(out) == _video_packets(gop_clip)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_mixed_gops_keep_frames_and_timestamps(gop_clip, tmp_path, ext):
    out = tmp_path / f"out{ext}"
    result = Pipeline(engine=GopEngine({1})).run(gop_clip, out)
    assert (result.gops, result.gops_copied, result.passthrough) == (3, 2, False)
    assert result.crf == 20 and result.rate_source == "calibrated"
    assert result.expected_gain_db == pytest.approx(0.2 / 3, abs=1e-3)
    src, _ = _decode(gop_clip)
    frames, errors = _decode(out)
    assert errors == [] and len(frames) == 30
    offset = frames[0].pts * frames[0].time_base - src[0].pts * src[0].time_base
    assert [f.pts * f.time_base - offset for f in frames] == [f.pts * f.time_base for f in src]
    packets, src_packets = _video_packets(out), _video_packets(gop_clip)
    assert packets[:10] == src_packets[:10] and packets[20:] == src_packets[20:]
    assert packets[10:20] != src_packets[10:20]


def test_table_says_copy_passes_through_but_crf_wins(gop_clip, tmp_path):
    engine = GopEngine({0, 1, 2}, copy=True)
    result = Pipeline(engine=engine).run(gop_clip, tmp_path / "a.mp4")
    assert result.passthrough and result.frames == 30
    result = Pipeline(engine=engine).run(gop_clip, tmp_path / "b.mp4", {"crf": 24})
    assert not result.passthrough and result.crf == 24 and result.rate_source == "explicit"


def test_archive_is_lossless_and_refuses_a_crf():
    assert EnhanceOptions(quality="archive").output_codec == "ffv1"
    with pytest.raises(ValueError):
        EnhanceOptions(quality="archive", crf=20)
    with pytest.raises(ValueError):
        EnhanceOptions(quality="archive", codec="libx264")


def test_high_is_x265_main10_and_refuses_another_codec():
    """``--quality high``: x265 at 10 bits; ``--codec`` only auto or libx265 with it."""
    assert "high" in QUALITIES
    high = EnhanceOptions(quality="high")
    assert (high.output_codec, high.output_bits) == ("libx265", 10)
    assert EnhanceOptions(quality="high", codec="libx265", crf=20).output_codec == "libx265"
    assert EnhanceOptions(quality="balanced").output_bits is None
    with pytest.raises(UserError, match="quality high is x265 Main10 .*, not libx264$"):
        parse_options({"quality": "high", "codec": "libx264"})
    with pytest.raises(UserError, match="quality high is x265 Main10 .*, not ffv1$"):
        parse_options({"quality": "high", "codec": "ffv1"})


def test_high_writes_hevc_main10_at_its_calibrated_crf(gop_clip, tmp_path):
    """8-bit H.264 in, HEVC 10-bit out at the high table's CRF (on x265's scale); an
    untouched GOP cannot be spliced into another codec, so the whole video is re-encoded,
    and where the table says copy the input is passed through as balanced does."""
    out = tmp_path / "high.mp4"
    result = Pipeline(engine=GopEngine({1})).run(gop_clip, out, {"quality": "high"})
    assert (result.quality, result.codec, result.passthrough) == ("high", "libx265", False)
    assert result.crf == 30 - 16 + 5 and result.rate_source == "calibrated"
    assert result.expected_gain_db == pytest.approx(0.3)  # every GOP re-encoded
    assert any("untouched GOPs are re-encoded" in w for w in result.warnings)
    frames, errors = _decode(out)
    assert errors == [] and len(frames) == 30
    assert {f.format.name for f in frames} == {"yuv420p10le"}
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "hevc" and len(c.streams.audio) == 1
    passed = Pipeline(engine=GopEngine({0, 1, 2}, copy=True)).run(
        gop_clip, tmp_path / "copy.mp4", {"quality": "high"}
    )
    assert passed.passthrough and _video_packets(tmp_path / "copy.mp4") == _video_packets(gop_clip)
    with pytest.raises(UnsupportedOutput, match="raw enhanced frames"):
        Pipeline(engine=GopEngine({1})).run(gop_clip, tmp_path / "o.y4m", {"quality": "high"})


def test_a_table_without_high_takes_the_default_one():
    """Weights calibrated before ``high`` existed: its entry is DEFAULT_TABLE's, and the
    expected gain is unknown (nothing of these weights was measured at x265 Main10)."""
    meta = _table(False, high=False)
    choice = choose_rate(meta, 37, "high", "libx265", None)
    assert choice.source == "default" and choice.expected_gain is None
    assert choose_rate(meta, 30, "balanced", "libx264", None).source == "calibrated"
    assert choose_rate(_table(False), 30, "high", "libx265", None).source == "calibrated"
    assert set(DEFAULT_TABLE["tables"]) == {"balanced", "compact", "high"}


def test_choice_follows_the_table():
    meta = _table(False)
    assert choose_rate(meta, 30, "balanced", "libx264", None).crf == 20
    assert choose_rate(meta, 30, "balanced", "libx265", None).crf == 25
    assert choose_rate(meta, 30, "balanced", "libx264", 18).source == "explicit"
    assert choose_rate(None, 30, "balanced", "libx264", None).source == "default"
    assert OutputRate.from_dict(DEFAULT_TABLE).tables["balanced"]


def _two_sources(crf: int, net: dict, size: dict, da: float, db: float) -> list[dict]:
    """Calibration records of sources "a" and "b" at one input CRF: the mean net gain per
    margin, each source off it by its own amount, and the sizes."""
    return [
        {
            "source": s,
            "crf": crf,
            "input_psnr": 40.0,
            "lossless_gain": 0.4,
            "mean_qp": crf + 2.0,
            "untouched": False,
            "net": {m: v + d for m, v in net.items()},
            "size": dict(size),
        }
        for s, d in (("a", da), ("b", db))
    ]


def test_build_tables_picks_the_smallest_file_that_keeps_the_gain():
    margins = (0, 4, 8)
    records = _two_sources(30, {0: -0.5, 4: 0.15, 8: 0.3}, {0: 1.0, 4: 1.5, 8: 2.2}, 0.0, 0.02)
    rate = build_tables(records, margins)
    assert rate.tables["balanced"][0].margin == 4  # 0.16 >= half of the 0.31 reachable
    assert rate.tables["compact"][0].margin == 4
    assert rate.qp_offset == 2.0
    records[0]["net"] = {0: -0.5, 4: -0.2, 8: -0.1}
    rate = build_tables(records, margins)
    assert rate.tables["balanced"][0].copy


def test_a_margin_must_meet_the_promise_with_headroom():
    """A margin that meets the promise (worst source -0.05 dB, 3x) only just, on the
    calibration's crops, is not taken; the gain reachable is still the promise's."""
    margins = (4, 8, 12)
    records = _two_sources(27, {4: 0.05, 8: 0.16, 12: 0.3}, {4: 1.4, 8: 2.0, 12: 2.8}, -0.08, 0.08)
    # Worst source: -0.03 / +0.08 / +0.22; sizes 1.4 / 2.0 / 2.8 (over 0.9 x 3).
    entry = build_tables(records, margins).tables["balanced"][0]
    assert not entry.copy and entry.margin == 8  # 0.16 >= half of the 0.3 at margin 12
    records[0]["net"][8] = -0.04  # its worst source now -0.04: within -0.05, not -0.025
    assert build_tables(records, margins).tables["balanced"][0].copy


def test_build_tables_measures_high_with_x265_main10_and_keeps_more():
    """The high grid (``high_net``/``high_size``) makes the high table, by balanced's rule
    with HIGH_KEEP: the smallest margin keeping 90 % of the best within 3x; merging a
    high-only calibration into the weights' table keeps balanced and compact."""
    high = next(h for h in REENCODES if "high" in h.qualities)
    assert (high.codec, high.pix_fmt, high.bits) == ("libx265", "yuv420p10le", 10)
    margins = high.margins
    net = {m: min(0.5, 0.05 * (m - 10)) for m in margins}  # keeps growing to +0.5 at 20
    size = {m: 1.0 + 0.12 * (m - 8) for m in margins}  # 3x at margin 24-25
    records = [
        {
            "source": s,
            "crf": 37,
            "input_psnr": 33.0,
            "lossless_gain": 0.55,
            "mean_qp": 39.5,
            "untouched": False,
            "high_net": {m: v + d for m, v in net.items()},
            "high_size": size,
        }
        for s, d in (("a", 0.0), ("b", 0.02))
    ]
    rate = build_tables(records, reencodes=(high,))
    assert set(rate.tables) == {"high"}
    entry = rate.tables["high"][0]
    assert entry.margin == 20 and not entry.copy  # 0.46 >= 0.9 x 0.51 (18 keeps 0.41)
    assert entry.net_gain == pytest.approx(0.51) and entry.size_ratio == pytest.approx(2.44)
    assert rate.measured["a@37"]["high_net"]["20"] == 0.5
    assert (
        rate.measured["a@37"]["high_lossless"] == 0.55 and "lossless" not in rate.measured["a@37"]
    )
    rebuilt = build_tables(stored_records(rate.measured), reencodes=(high,))  # --rebuild
    assert rebuilt.tables == rate.tables
    assert "high             37          22" in format_tables(rate)  # x265's CRF: 37 - 20 + 5
    old = OutputRate.from_meta(_table(False, high=False))
    both = merged(old, rate)
    assert set(both.tables) == {"balanced", "compact", "high"} and not both.defaulted
    assert both.tables["balanced"] == old.tables["balanced"] and both.qp_offset == old.qp_offset
    both = merged(replace(old, measured={"a@37": {"lossless": 0.4, "net": {}}}), rate)
    assert both.measured["a@37"]["lossless"] == 0.4  # x264's own, next to high's
    records[0]["high_net"] = {m: -0.1 for m in margins}  # a source that loses everywhere
    assert build_tables(records, reencodes=(high,)).tables["high"][0].copy


def test_the_gop_plan_decodes_one_frame_per_enhanced_gop(gop_clip, tmp_path, monkeypatch):
    """A GOP whose first frame will be enhanced is settled: the plan demuxes the rest of
    it without decoding (the stream states its CRF), so enhancing everything does not
    cost a second decode; a GOP that may be copied is decoded to its end."""
    import enhancer.pipeline as pipeline_module
    import enhancer.plan as plan_module

    decoded: list[int] = []
    real = plan_module.open_video

    class Counting:
        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.reader.close()

        def __iter__(self):
            for frame in self.reader:
                decoded.append(frame.index)
                yield frame

    def planner(source, **kw):
        return Counting(real(source, **kw))

    monkeypatch.setattr(plan_module, "open_video", planner)  # the planning pass
    monkeypatch.setattr(pipeline_module, "stream_frames", lambda *a, **k: pytest.skip("planned"))
    # Each enhanced GOP: its first frame, and the B-frames the decoder held (3 B-frames).
    for enhanced, most in (({0, 1, 2}, 3 * 3), ({1}, 10 + 3 + 10)):
        decoded.clear()
        with pytest.raises(pytest.skip.Exception):
            Pipeline(engine=GopEngine(enhanced)).run(gop_clip, tmp_path / "o.mp4")
        assert len(decoded) <= most and {i // 10 for i in decoded} == {0, 1, 2}, decoded
