"""enhancer.pipeline: enhance with the real engine; failure, cancel and bounds with doubles."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import pytest

import enhancer.pipeline as pipeline_module
import enhancer.run as run_module
from bitstream.errors import UserError
from bitstream.types import UnsupportedInput
from bitstream.writer import UnsupportedOutput
from enhancer.pipeline import Cancelled, EnhanceOptions, Pipeline, probe
from tests.clips import make_audio_only
from tests.media import fast_engine, packets, video_summary


@pytest.fixture
def engine():
    return fast_engine()


@dataclass
class Report:
    index: int
    stages: int = 1
    side_info: str = "bitstream"
    qp: float | None = None
    seconds: float = 0.0


class DoubleEngine:
    """Passes frames through; can fail, stall or corrupt a frame at a given index."""

    def __init__(self, fail_at=None, stall=0.0, bad_frame_at=None):
        self.fail_at, self.stall, self.bad_frame_at = fail_at, stall, bad_frame_at

    def process(self, frames, info, stages="auto", side_info="auto"):
        for frame in frames:
            if frame.index == self.fail_at:
                raise RuntimeError(f"model failed at frame {frame.index}")
            if frame.index == 0 and self.stall:
                time.sleep(self.stall)
            if frame.index == self.bad_frame_at:
                frame.planes = (frame.planes[0][:-2], *frame.planes[1:])
            yield frame, Report(frame.index, qp=frame.side.qp)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_enhance_keeps_everything_but_pixels(clip, tmp_path, engine):
    pts = [0, 3000, 9000, 10000, 20000, 21000, 30000, 45000]
    src = clip("vfr.mp4", frames=8, pts=pts, time_base=Fraction(1, 90000), rate=30, audio=True)
    out = tmp_path / "out.mp4"
    seen = []
    # An explicit CRF: the default would pass this clip through (its level is in the
    # weights' copy range) and the model would not run.
    options = EnhanceOptions(crf=23)
    result = Pipeline(engine).run(src, out, options, progress=seen.append)
    a, b = video_summary(src), video_summary(out)
    assert (b.frames, b.width, b.height, b.pix_fmt) == (8, 176, 144, "yuv420p")
    assert b.times == a.times
    assert [p.data for p in packets(out, "audio")[0]] == [p.data for p in packets(src, "audio")[0]]
    assert result.frames == 8 and sum(result.stages_histogram.values()) == 8
    assert result.mean_qp is not None and result.side_info["qp"] == "bitstream"
    assert result.codec == "libx264" and result.crf is not None and result.output == str(out)
    assert [p.phase for p in seen][:2] == ["probing", "enhancing"] and seen[-1].phase == "encoding"
    assert seen[-1].frames_done == 8
    assert leftovers(tmp_path) == []


def test_10bit_in_10bit_out(clip, tmp_path, engine):
    src = clip("ten.mkv", frames=5, pix_fmt="yuv420p10le", size=(64, 48))
    out = tmp_path / "out.mkv"
    Pipeline(engine).run(src, out, EnhanceOptions())
    summary = video_summary(out)
    assert summary.pix_fmt == "yuv420p10le" and summary.frames == 5


def test_model_failure_keeps_existing_output(clip, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="model failed at frame 3"):
        Pipeline(DoubleEngine(fail_at=3)).run(clip("a.mp4", audio=True, frames=10), out)
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []


def test_encoder_thread_failure_propagates(clip, tmp_path):
    out = tmp_path / "out.mkv"
    with pytest.raises(ValueError, match="does not fit"):
        Pipeline(DoubleEngine(bad_frame_at=2)).run(clip("c.mp4", frames=10), out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_cancel_removes_partial_output(clip, tmp_path):
    cancel = threading.Event()
    out = tmp_path / "out.mp4"

    def progress(p):
        if p.frames_done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        Pipeline(DoubleEngine()).run(
            clip("c.mp4", frames=20), out, progress=progress, cancel=cancel
        )
    assert not out.exists() and leftovers(tmp_path) == []


def test_decoder_runs_at_most_a_queue_ahead(clip, tmp_path, monkeypatch):
    produced = []
    real_open = pipeline_module.open_video

    class Counting:
        def __init__(self, reader):
            self.reader, self.info = reader, reader.info

        def __iter__(self):
            for frame in self.reader:
                produced.append(frame.index)
                yield frame

        def close(self):
            self.reader.close()

    monkeypatch.setattr(pipeline_module, "open_video", lambda *a, **k: Counting(real_open(*a, **k)))
    monkeypatch.setattr(run_module, "QUEUE_FRAMES", 2)
    seen_when_stalled = []

    class Stalling(DoubleEngine):
        def process(self, frames, info, stages="auto", side_info="auto"):
            for frame in frames:
                if frame.index == 0:
                    time.sleep(0.5)  # the decoder fills its queue meanwhile, then must wait
                    seen_when_stalled.append(len(produced))
                yield frame, Report(frame.index)

    Pipeline(Stalling()).run(clip("long.mp4", frames=30, size=(64, 48)), tmp_path / "o.mkv")
    assert len(produced) == 30
    assert 2 <= seen_when_stalled[0] <= 2 + 2  # queue + the frame being put + the one taken


def test_file_object_source_is_spooled(clip, tmp_path):
    src = clip("a.mp4", audio=True, frames=6)
    out = tmp_path / "out.mkv"
    Pipeline(DoubleEngine()).run(io.BytesIO(src.read_bytes()), out)
    assert video_summary(out).frames == 6
    assert [p.data for p in packets(out, "audio")[0]] == [p.data for p in packets(src, "audio")[0]]


def test_max_frames(clip, tmp_path):
    result = Pipeline(DoubleEngine()).run(
        clip("a.mp4", audio=True, frames=12), tmp_path / "o.mp4", EnhanceOptions(max_frames=4)
    )
    assert result.frames == 4 and video_summary(tmp_path / "o.mp4").frames == 4


def test_one_pipeline_loads_the_weights_once_whatever_the_options(clip, tmp_path, monkeypatch):
    """auto, blind, auto and a fixed stage count: one call of the one loader."""
    import enhancer.checkpoint
    import enhancer.engine

    loads = []
    real = enhancer.checkpoint.load_model

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    # Every importer of the one loader (the engine imports it by name).
    monkeypatch.setattr(enhancer.checkpoint, "load_model", counted)
    monkeypatch.setattr(enhancer.engine, "load_model", counted)
    src = clip("once.mp4", frames=4)
    p = Pipeline(device="cpu")
    runs = [{"side_info": "auto"}, {"side_info": "blind"}, {"side_info": "auto", "stages": 1}]
    results = [
        p.run(src, tmp_path / f"o{i}.mkv", {**kw, "codec": "ffv1"}) for i, kw in enumerate(runs)
    ]
    assert len(loads) == 1
    assert [r.side_info["engine"] for r in results] == ["bitstream", "estimated", "bitstream"]
    assert results[2].stages_histogram == {1: 4}
    with pytest.raises(UserError, match="stages"):
        p.run(src, tmp_path / "bad.mkv", {"stages": 9})  # refused by the options model
    assert len(loads) == 1


def test_the_output_is_negotiated_once(clip, tmp_path, monkeypatch):
    """The container and the codec are chosen once, before frames flow; the writer takes
    the plan as data (it used to choose them again)."""
    import bitstream.writer

    calls = []
    for name in ("choose_codec", "output_format"):
        real = getattr(bitstream.writer, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(bitstream.writer, name, counted)
        monkeypatch.setattr(pipeline_module, name, counted, raising=False)
    Pipeline(DoubleEngine()).run(clip("c.mp4", frames=3), tmp_path / "o.mp4", {"crf": 30})
    assert sorted(calls) == ["choose_codec", "output_format"]


def test_probe(clip, tmp_path):
    info = probe(clip("c.mp4", frames=3))
    assert (info.codec, info.width, info.height) == ("h264", 176, 144)
    with pytest.raises(UnsupportedInput):
        probe(make_audio_only(tmp_path / "a.m4a"))
    upload = io.BytesIO(clip("c.mp4", frames=3).read_bytes())
    assert probe(upload).codec == "h264" and upload.tell() == 0


def test_output_checks_happen_before_decoding(clip, tmp_path):
    src = clip("c.mp4", frames=3)
    p = Pipeline(DoubleEngine())
    with pytest.raises(UserError, match="folder does not exist"):
        p.run(src, tmp_path / "missing" / "o.mp4")
    with pytest.raises(UserError, match="must not be the INPUT"):
        p.run(src, src)
    with pytest.raises(UnsupportedOutput, match="cannot tell the container"):
        p.run(src, tmp_path / "o.avi")
    with pytest.raises(UserError, match="side_info"):
        p.run(src, tmp_path / "o.mp4", {"side_info": "magic"})
    with pytest.raises(UserError, match="stages must be auto or 0..3"):
        p.run(src, tmp_path / "o.mp4", {"stages": 9})
    with pytest.raises(UserError, match="tile"):
        Pipeline(tile=8)
