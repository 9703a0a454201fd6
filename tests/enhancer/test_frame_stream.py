"""enhancer.frames(): the enhanced frames as arrays, the same bits as --codec ffv1."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import enhancer
from bitstream.errors import VqeError
from bitstream.reader import open_video
from enhancer.pipeline import Pipeline
from tests.media import fast_engine


def _ffv1_planes(src, out, options) -> list[tuple[np.ndarray, ...]]:
    Pipeline(fast_engine()).run(src, out, {**options, "codec": "ffv1"})
    with open_video(out, side_info=False) as reader:
        return [f.planes for f in reader]


@pytest.mark.parametrize("side_info", ["auto", "blind"])
def test_frames_are_the_ffv1_output_bit_for_bit(clip, tmp_path, side_info):
    src = clip("frames.mp4", frames=9, options={"crf": "34", "bf": "2"})
    want = _ffv1_planes(src, tmp_path / "o.mkv", {"side_info": side_info})
    with open_video(src) as reader:
        picts = [f.side.pict_type for f in reader]
    with enhancer.frames(src, {"side_info": side_info}, engine=fast_engine()) as video:
        got = list(video)
    assert [f.index for f in got] == list(range(9))
    assert [f.pict_type for f in got] == picts and "B" in picts
    assert [f.stages for f in got] == [1] * 9
    for f, planes in zip(got, want, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(f.planes, planes, strict=True))
    times = [f.time for f in got]
    assert times == sorted(times) and times[1] == pytest.approx(1 / 25, abs=1e-3)
    side = got[2].side
    assert side.sources["qp_map"] == ("none" if side_info == "blind" else "bitstream")


def test_frames_convert_to_rgb_and_tensors(clip):
    src = clip("frames.mp4", frames=9, options={"crf": "34", "bf": "2"})
    first = next(iter(enhancer.frames(src, {"max_frames": 1}, engine=fast_engine())))
    rgb = first.to_rgb()
    assert rgb.shape == (*first.y.shape, 3) and rgb.dtype == np.uint8
    yuv = first.to_tensor()
    assert tuple(yuv.shape) == (3, *first.y.shape) and str(yuv.device) == "cpu"
    assert np.array_equal(yuv[0].mul(255).round().numpy(), first.y.astype(np.float32))
    rgb_t = first.to_tensor("rgb")
    assert float(rgb_t.min()) >= 0.0 and float(rgb_t.max()) <= 1.0
    assert np.abs(rgb_t.mul(255).round().numpy().transpose(1, 2, 0) - rgb).max() == 0
    with pytest.raises(ValueError, match="format"):
        first.to_tensor("hsv")


def test_closing_early_releases_the_decoder(clip):
    src = clip("frames.mp4", frames=9, options={"crf": "34", "bf": "2"})
    threads = threading.active_count()
    video = enhancer.frames(src, engine=fast_engine())
    taken = [next(video), next(video)]
    assert [f.index for f in taken] == [0, 1]
    video.close()
    assert video._reader._container is None  # the file is closed
    with pytest.raises(StopIteration):
        next(video)
    video.close()  # idempotent
    assert threading.active_count() == threads
    with enhancer.frames(src, engine=fast_engine()) as again:
        next(again)
    assert again._reader._container is None


def test_ten_bit_frames_are_uint16_and_match_ffv1(clip, tmp_path):
    src = clip("ten.mkv", frames=5, pix_fmt="yuv420p10le", size=(64, 48))
    want = _ffv1_planes(src, tmp_path / "ten.mkv", {})
    got = list(enhancer.frames(src, engine=fast_engine()))
    assert len(got) == 5 and all(f.bit_depth == 10 and f.y.dtype == np.uint16 for f in got)
    for f, planes in zip(got, want, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(f.planes, planes, strict=True))
    assert got[0].to_rgb().dtype == np.uint8


def test_bad_input_and_options_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VqeError):
        enhancer.frames(bad, engine=fast_engine())
    with pytest.raises(VqeError, match="stages"):
        enhancer.frames(bad, {"stages": 9}, engine=fast_engine())
