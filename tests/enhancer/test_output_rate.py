"""The output keeps the gain (issue 11): the rate table, untouched GOPs copied, remuxes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import av
import av.logging
import numpy as np
import pytest

from enhancer.options import EnhanceOptions
from enhancer.output_rate import DEFAULT_TABLE, OutputRate, RateEntry, choose_rate
from enhancer.pipeline import Pipeline
from enhancer.training.rate_calibration import build_tables

GOPS = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "3", "crf": "30"}


@dataclass
class Report:
    index: int
    stages: int
    side_info: str = "bitstream"
    qp: float | None = None
    seconds: float = 0.0


def _table(copy: bool) -> dict:
    entry = RateEntry(30, 10, copy, 0.2, 0.01, 1.5, 0.3)
    rate = OutputRate({"balanced": [entry], "compact": [entry]})
    return {"output_rate": rate.to_dict()}


class GopEngine:
    """Enhances (brightens) the frames of the GOPs in ``enhanced`` (10 frames each)."""

    def __init__(self, enhanced: set[int], copy: bool = False):
        self.enhanced = enhanced
        self.meta = _table(copy)

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


def test_choice_follows_the_table():
    meta = _table(False)
    assert choose_rate(meta, 30, "balanced", "libx264", None).crf == 20
    assert choose_rate(meta, 30, "balanced", "libx265", None).crf == 25
    assert choose_rate(meta, 30, "balanced", "libx264", 18).source == "explicit"
    assert choose_rate(None, 30, "balanced", "libx264", None).source == "default"
    assert OutputRate.from_dict(DEFAULT_TABLE).tables["balanced"]


def test_build_tables_picks_the_smallest_file_that_keeps_the_gain():
    margins = (0, 4, 8)
    records = [
        {
            "source": s,
            "crf": 30,
            "input_psnr": 40.0,
            "lossless_gain": 0.4,
            "mean_qp": 32.0,
            "untouched": False,
            "net": {0: -0.5, 4: 0.15 + d, 8: 0.3 + d},
            "size": {0: 1.0, 4: 1.5, 8: 2.2},
        }
        for s, d in (("a", 0.0), ("b", 0.02))
    ]
    rate = build_tables(records, margins)
    assert rate.tables["balanced"][0].margin == 4  # 0.16 >= half of the 0.31 reachable
    assert rate.tables["compact"][0].margin == 4
    assert rate.qp_offset == 2.0
    records[0]["net"] = {0: -0.5, 4: -0.2, 8: -0.1}
    rate = build_tables(records, margins)
    assert rate.tables["balanced"][0].copy


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
