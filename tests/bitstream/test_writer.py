"""bitstream.writer: the output keeps everything but the pixels (decoded frames passed through)."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from bitstream.reader import open_video
from bitstream.types import RateControl, SequenceInfo
from bitstream.writer import (
    CRF_FLOOR,
    OutputPlan,
    UnsupportedOutput,
    VideoWriter,
    choose_codec,
    default_crf,
    frame_from_planes,
    input_level,
    output_format,
    y4m_header,
)
from tests.media import container_metadata, packets, retag, video_summary

ROOT = Path(__file__).resolve().parents[2]


def passthrough(src: Path, dst: Path | str, max_frames: int | None = None, **kw) -> VideoWriter:
    """Decode ``src`` and write its frames unchanged to ``dst``."""
    with open_video(src) as reader, VideoWriter(dst, reader.info, source=str(src), **kw) as w:
        for i, frame in enumerate(reader):
            if max_frames is not None and i >= max_frames:
                w.close(truncated=True)
                break
            w.write(frame)
    return w


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".mov"])
def test_audio_packets_identical(clip, tmp_path, ext):
    src = clip("a.mp4", audio=True, frames=10)
    out = tmp_path / f"out{ext}"
    w = passthrough(src, out)
    assert w.codec == "libx264" and w.warnings == []
    before, after = packets(src, "audio"), packets(out, "audio")
    assert len(after) == 1 and len(after[0]) == len(before[0]) > 3
    assert [p.data for p in after[0]] == [p.data for p in before[0]]
    if ext != ".mkv":  # Matroska shifts all streams so that nothing starts below 0
        assert [p.seconds for p in after[0]] == [p.seconds for p in before[0]]
    assert video_summary(out).frames == video_summary(src).frames == 10


def test_vfr_timestamps_identical(clip, tmp_path):
    pts = [0, 3000, 9000, 10000, 20000, 21000, 30000, 45000, 46500, 60000]
    src = clip("vfr.mp4", frames=10, pts=pts, time_base=Fraction(1, 90000), rate=30)
    out = tmp_path / "out.mp4"
    w = passthrough(src, out)
    assert w.missing_pts == w.reordered_pts == 0 and w.warnings == []
    assert video_summary(out).times == video_summary(src).times == [Fraction(p, 90000) for p in pts]


def test_10bit_colour_tags_kept(clip, tmp_path):
    hdr = "colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc"
    src = clip("hdr.mkv", frames=5, pix_fmt="yuv420p10le", options={"x264-params": hdr})
    out = tmp_path / "out.mp4"
    passthrough(src, out)
    a, b = video_summary(src), video_summary(out)
    assert a.colour[:3] == (9, 16, 9)  # BT.2020, PQ, BT.2020 NCL
    assert b.colour == a.colour
    assert b.pix_fmt == "yuv420p10le" and (b.width, b.height) == (176, 144)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_rotation_sar_metadata_kept(clip, tmp_path, ext):
    base = clip("rot.mp4", rotation=90, audio=True, frames=6)
    src = retag(
        base,
        tmp_path / "tagged.mp4",
        stream_metadata={0: {"language": "fra", "title": "picture"}, 1: {"language": "eng"}},
        container_metadata={"title": "My clip", "comment": "hello"},
        sample_aspect_ratio=Fraction(4, 3),
    )
    out = tmp_path / f"out{ext}"
    passthrough(src, out)
    a, b = video_summary(src), video_summary(out)
    assert a.rotation == b.rotation == 90
    assert a.sample_aspect_ratio == b.sample_aspect_ratio == Fraction(4, 3)
    assert b.metadata["language"] == "fra" and b.metadata.get("title", b.metadata.get("name"))
    meta = container_metadata(out)
    assert meta["title"] == "My clip" and meta["comment"] == "hello"
    with av.open(str(out)) as c:
        assert c.streams.audio[0].metadata["language"] == "eng"


def test_subtitles_copied(clip, tmp_path):
    src = retag(
        clip("s.mkv", audio=True, frames=10), tmp_path / "subs.mkv", subtitles=["hello", "world"]
    )
    out = tmp_path / "out.mkv"
    passthrough(src, out)
    cues = packets(out, "subtitle")
    assert (
        [(p.seconds, p.data) for p in cues[0]]
        == [(p.seconds, p.data) for p in packets(src, "subtitle")[0]]
        == [(0, b"hello"), (Fraction(1, 5), b"world")]
    )


def test_stream_the_container_cannot_hold_is_reported(clip, tmp_path):
    src = retag(clip("s.mkv", frames=5), tmp_path / "subs.mkv", subtitles=["hi"])
    w = passthrough(src, tmp_path / "out.mp4")  # SubRip does not go into MP4
    assert any("subtitle" in note and "not copied" in note for note in w.warnings)


def test_attachments_and_timecode_tracks(clip, tmp_path):
    base = clip("s.mkv", frames=4)
    src = retag(base, tmp_path / "att.mkv", attachment=("notes.txt", "text/plain", b"hello"))
    w = passthrough(src, tmp_path / "out.mkv")
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert [bytes(s.data) for s in c.streams if s.type == "attachment"] == [b"hello"]
    w = passthrough(src, tmp_path / "out.mp4")
    assert w.warnings == ["stream 1 (attachment) not copied: attachments only fit in Matroska"]
    # A QuickTime timecode track is rebuilt by the muxer from the tag, not copied twice.
    src = retag(base, tmp_path / "tc.mov", stream_metadata={0: {"timecode": "01:00:00:00"}})
    w = passthrough(src, tmp_path / "out.mov")
    with av.open(str(tmp_path / "out.mov")) as c:
        assert [s.type for s in c.streams] == ["video", "data"]
        assert c.streams[1].metadata["timecode"] == "01:00:00:00"


def test_max_frames_cuts_other_streams(clip, tmp_path):
    src = clip("a.mp4", audio=True, frames=20)
    out = tmp_path / "out.mp4"
    passthrough(src, out, max_frames=5)
    assert video_summary(out).frames == 5
    audio = packets(out, "audio")[0]
    assert 0 < len(audio) < len(packets(src, "audio")[0])
    assert max(p.seconds for p in audio) <= Fraction(5, 25)


def test_odd_size_auto_is_lossless_ffv1(clip, tmp_path):
    src = clip("odd.mkv", codec="ffv1", size=(175, 143), frames=4)
    out = tmp_path / "out.mp4"
    w = passthrough(src, out)
    assert w.codec == "ffv1" and any("odd size" in n for n in w.warnings)
    a, b = video_summary(src), video_summary(out)
    assert (b.width, b.height, b.frames) == (175, 143, 4)
    np.testing.assert_array_equal(a.first_luma, b.first_luma)


def test_odd_size_explicit_x264_fails_clearly(clip):
    src = clip("odd.mkv", codec="ffv1", size=(175, 143), frames=4)
    with open_video(src) as reader:
        info = reader.info
    with pytest.raises(UnsupportedOutput, match="odd size 175x143.*ffv1"):
        choose_codec("libx264", info, "mp4")


def test_frame_from_planes_round_trip_10bit_odd():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 1024, (143, 175), dtype=np.uint16)
    u = rng.integers(0, 1024, (72, 88), dtype=np.uint16)
    v = rng.integers(0, 1024, (72, 88), dtype=np.uint16)
    frame = frame_from_planes((y, u, v), "yuv420p10le")
    assert (frame.width, frame.height) == (175, 143)
    for plane, want in zip(frame.planes, (y, u, v), strict=True):
        row = plane.line_size // 2
        got = np.frombuffer(plane, "<u2", count=row * plane.height).reshape(plane.height, row)
        np.testing.assert_array_equal(got[:, : plane.width], want)
    with pytest.raises(ValueError, match="does not fit"):
        frame_from_planes((y[:-1], u, v), "yuv420p10le")


def test_stdout_is_matroska(clip, tmp_path):
    src = clip("a.mp4", audio=True, frames=6)
    code = (
        "import sys; from tests.bitstream.test_writer import passthrough; "
        f"passthrough(__import__('pathlib').Path({str(src)!r}), '-')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120, check=True
    )
    out = tmp_path / "piped.mkv"
    out.write_bytes(result.stdout)
    assert video_summary(out).frames == 6
    assert [p.data for p in packets(out, "audio")[0]] == [p.data for p in packets(src, "audio")[0]]


@pytest.mark.parametrize("name", ["out.avi", "out", "out.webm"])
def test_unknown_container(name):
    with pytest.raises(UnsupportedOutput, match="cannot tell the container"):
        output_format(name)


def _info(codec="h264", crf=None, qp=None, encoder=None) -> SequenceInfo:
    return SequenceInfo(
        codec=codec,
        profile=None,
        width=64,
        height=48,
        pix_fmt="yuv420p",
        bit_depth=8,
        frame_rate=Fraction(25),
        time_base=Fraction(1, 25),
        encoder=encoder,
        rate_control=RateControl(crf=crf, qp=qp),
    )


def test_default_crf_rule():
    assert default_crf("libx264", _info(crf=28, encoder="x264"), 25.0, "I") == 16
    assert default_crf("libx264", _info(crf=35, encoder="x264"), None, "?") == 23
    assert default_crf("libx264", _info(crf=12, encoder="x264"), None, "?") == CRF_FLOOR
    # No SEI: the first frame's QP; an I frame's QP sits below the sequence CRF.
    assert default_crf("libx264", _info(), 30.0, "I") == 21
    assert default_crf("libx264", _info(), 30.0, "P") == 18
    assert default_crf("libx264", _info(codec="mpeg4"), None, "?") == 18
    # x265 scale: CRF 33 in x265 ~ 28 in x264 -> 16 in x264 -> 21 in x265.
    assert default_crf("libx265", _info("hevc", crf=33, encoder="x265"), None, "?") == 21


def test_input_level_is_one_answer_in_order_of_trust():
    """The SEI, else a mean QP less the calibration's offset, else a first frame's QP."""
    x265 = _info("hevc", crf=33, encoder="x265")
    assert input_level(x265, 40.0, "I", mean_qp=50.0, qp_offset=2.0) == 28  # x264 scale
    assert input_level(_info(qp=30, encoder="x264"), 40.0, mean_qp=50.0) == 30
    assert input_level(_info(), 40.0, "I", mean_qp=30.5, qp_offset=2.5) == 28
    assert input_level(_info(), 40.0, "I") == 43 and input_level(_info(), 40.0, "P") == 40
    assert input_level(_info()) is None


def test_a_plan_is_taken_as_data(clip, tmp_path, monkeypatch):
    """Given an OutputPlan the writer decides nothing again: no codec choice, no format."""
    src = clip("c.mp4", frames=3)
    with open_video(src) as reader:
        info = reader.info
    plan = OutputPlan.negotiate(info, "matroska", "auto", "fast").with_crf(30)
    assert (plan.codec, plan.pix_fmt, plan.crf, plan.preset) == ("libx264", "yuv420p", 30, "fast")
    with pytest.raises(UnsupportedOutput, match="lossless"):
        OutputPlan.negotiate(info, "matroska", "ffv1").with_crf(20)

    def refused(*_a, **_k):
        raise AssertionError("decided again")

    import bitstream.writer

    monkeypatch.setattr(bitstream.writer, "choose_codec", refused)
    monkeypatch.setattr(bitstream.writer, "output_format", refused)
    w = passthrough(src, tmp_path / "o.mkv", plan=plan.with_notes(["a note"]))
    assert (w.codec, w.crf, w.preset) == ("libx264", 30, "fast") and w.warnings == ["a note"]
    assert video_summary(tmp_path / "o.mkv").frames == 3


def test_a_deeper_plan_writes_8_bit_frames_at_10_bits(clip, tmp_path):
    """``bits=10`` (``--quality high``): the plan carries yuv420p10le for an 8-bit source,
    the samples go in shifted by 2 (exact, as bench and calibration score them)."""
    src = clip("c.mp4", frames=3, size=(64, 48))
    with open_video(src) as reader:
        info, planes = reader.info, [f.planes for f in reader]
    assert OutputPlan.negotiate(info, "mp4", "libx265").pix_fmt == "yuv420p"
    assert OutputPlan.negotiate(info, "mp4", "libx265", bits=10).pix_fmt == "yuv420p10le"
    plan = OutputPlan.negotiate(info, "matroska", "ffv1", bits=10)  # lossless: exact read-back
    assert plan.pix_fmt == "yuv420p10le"
    passthrough(src, tmp_path / "o.mkv", plan=plan)
    with av.open(str(tmp_path / "o.mkv")) as c:
        frames = list(c.decode(video=0))
    assert [f.format.name for f in frames] == ["yuv420p10le"] * 3
    for f, (y, _, v) in zip(frames, planes, strict=True):
        got = f.to_ndarray()
        assert np.array_equal(got[:48], y.astype(np.uint16) << 2)
        assert np.array_equal(got[48:].reshape(2, 24, 32)[1], v.astype(np.uint16) << 2)


@pytest.mark.parametrize(
    ("pix_fmt", "sar", "color_range", "tags"),
    [
        ("yuv420p", Fraction(4, 3), None, "A4:3 C420jpeg XYSCSS=420JPEG"),
        ("yuv420p10le", Fraction(1, 1), 2, "A1:1 C420p10 XYSCSS=420P10 XCOLORRANGE=FULL"),
        ("yuv420p", None, 1, "A0:0 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED"),
    ],
)
def test_y4m_header_carries_the_sample_aspect_ratio_and_range(
    clip, tmp_path, pix_fmt, sar, color_range, tags
):
    """The input's SAR (FFmpeg's muxer wrote A0:0 whatever it was) and colour range reach
    the YUV4MPEG2 header, which PyAV's demuxer reads back; the frames are the input's."""
    base = clip(f"y4m-{pix_fmt}.mp4", frames=3, size=(64, 48), pix_fmt=pix_fmt)
    src = retag(base, tmp_path / "tagged.mp4", sample_aspect_ratio=sar) if sar else base
    with open_video(src) as reader:
        info, decoded = reader.info, list(reader)
    assert info.sample_aspect_ratio == sar
    info.color_range = color_range
    out = tmp_path / "o.y4m"
    with VideoWriter(out, info, source=str(src)) as w:
        for frame in decoded:
            w.write(frame)
    planes = [f.planes for f in decoded]
    header = out.read_bytes().split(b"\n", 1)[0].decode()
    assert header == f"YUV4MPEG2 W64 H48 F25:1 Ip {tags}"
    assert header.encode() + b"\n" == y4m_header(64, 48, Fraction(25), pix_fmt, sar, color_range)
    with av.open(str(out), format="yuv4mpegpipe") as c:
        stream = c.streams.video[0]
        assert stream.sample_aspect_ratio == sar and stream.format.name == pix_fmt
        if color_range:
            assert stream.codec_context.color_range == color_range
        frames = list(c.decode(stream))
    assert len(frames) == 3
    for f, (y, _, _) in zip(frames, planes, strict=True):
        assert np.array_equal(f.to_ndarray()[:48], y)


def test_auto_codec_follows_family(clip):
    with open_video(clip("c.mp4", frames=2)) as reader:
        info = reader.info
    assert choose_codec("auto", info, "mp4") == ("libx264", [])
    info.codec = "hevc"
    assert choose_codec("auto", info, "matroska") == ("libx265", [])
    with pytest.raises(UnsupportedOutput, match="lossless"):
        VideoWriter("/nonexistent/x.mkv", info, codec="ffv1", crf=20)
