"""Tests for bitstream.reader: sequence info, planes, dense side info and error handling."""

from __future__ import annotations

import gc
import io
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from bitstream.reader import (
    dense_motion,
    open_video,
    parse_encoder_sei,
    partition_map,
)
from bitstream.types import (
    PARTITION_CODES,
    CorruptStream,
    DecodedFrame,
    UnsupportedInput,
)
from tests.clips import make_audio_only, make_clip
from tests.media import serve_folder

X264_FAST = {"preset": "veryfast"}


def read_all(path, **kwargs) -> tuple[list[DecodedFrame], object]:
    with open_video(path, **kwargs) as reader:
        frames = list(reader)
    return frames, reader


# ----------------------------------------------------------------- basics


def test_sequence_info_and_frames(clip):
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    with open_video(path) as reader:
        info = reader.info  # filled before iterating
        assert info.codec == "h264"
        assert info.profile == "High"
        assert (info.width, info.height) == (176, 144)
        assert info.pix_fmt == "yuv420p" and info.bit_depth == 8
        assert info.frame_rate == 25
        assert info.frames == 12
        assert info.encoder == "x264"
        assert info.rate_control.mode == "crf"
        assert info.rate_control.crf == 23.0
        assert info.sequence_qp == 23.0
        assert info.rate_control.options["bframes"] == "2"
        frames = list(reader)
    assert [f.index for f in frames] == list(range(12))
    pts = [f.side.pts for f in frames]
    assert pts == sorted(pts) and len(set(pts)) == 12
    y, u, v = frames[0].planes
    assert y.shape == (144, 176) and u.shape == (72, 88) and v.shape == (72, 88)
    assert y.dtype == np.uint8 and y.flags.c_contiguous
    assert frames[0].av_frame is not None
    assert {f.side.pict_type for f in frames} == {"I", "P", "B"}
    assert reader.errors == []


def test_side_info_grids_and_sources(clip):
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    frames, _ = read_all(path)
    for f in frames:
        s = f.side
        assert s.qp_map.shape == (9, 11) and s.qp_map.dtype == np.float32
        assert s.mv_past.shape == (18, 22, 2) and s.mv_past.dtype == np.float32
        assert s.mv_future.shape == (18, 22, 2)
        assert s.mv_past_valid.shape == s.intra.shape == (18, 22)
        assert s.partition.shape == (9, 11) and s.partition.dtype == np.uint8
        assert s.sources == {
            "pict_type": "bitstream",
            "qp": "bitstream",
            "qp_map": "bitstream",
            "motion_vectors": "bitstream",
            "partitions": "bitstream",
        }
        assert 0 < s.qp < 52
        assert s.qp == pytest.approx(float(s.qp_map.mean()))
        if s.pict_type == "I":
            assert s.mv_count == 0 and s.intra.all()
            assert (s.partition == PARTITION_CODES["intra"]).all()
            assert s.intra_fraction == 1.0
    inter = [f.side for f in frames if f.side.pict_type in "PB"]
    assert all(s.mv_count > 0 for s in inter)
    assert any(s.mv_future_valid.any() for s in inter if s.pict_type == "B")
    assert not any(s.mv_future_valid.any() for s in inter if s.pict_type == "P")
    # Partition codes seen across the clip include the 16x16 inter partition.
    codes = np.concatenate([s.partition.ravel() for s in inter])
    assert (codes == PARTITION_CODES["16x16"]).any()
    assert not (codes == PARTITION_CODES["unknown"]).any()


def test_motion_vectors_follow_the_pan(clip):
    """The scene pans by (+2, +1) px per frame: one-frame-back vectors are (dx, dy) = (2, 1)."""
    opts = {"bf": "0", "ref": "1", "qp": "20", "aq-mode": "0", **X264_FAST}
    frames, _ = read_all(clip("pan.mp4", options=opts, frames=6))
    for f in frames[1:]:
        s = f.side
        assert s.pict_type == "P"
        dx = s.mv_past[..., 0][s.mv_past_valid]
        dy = s.mv_past[..., 1][s.mv_past_valid]
        assert np.median(dx) == pytest.approx(2.0, abs=0.25)
        assert np.median(dy) == pytest.approx(1.0, abs=0.25)


def test_constant_qp(clip):
    opts = {"qp": "30", "bf": "0", **X264_FAST}
    with open_video(clip("cqp.mp4", options=opts, frames=6)) as reader:
        assert reader.info.rate_control.mode == "cqp"
        assert reader.info.rate_control.qp == 30.0
        assert reader.info.rate_control.crf is None
        frames = list(reader)
    for f in frames[1:]:
        assert f.side.pict_type == "P"
        assert (f.side.qp_map == 30).all()
        assert f.side.qp == 30.0
    assert frames[0].side.qp < 30  # ipratio lowers the I-frame QP


def test_side_info_off(clip):
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    frames, _ = read_all(path, side_info=False)
    with open_video(path, side_info=False) as reader:
        list(reader)
        assert reader.info.sequence_qp == 23.0  # the options SEI: what the blind path runs on
    assert len(frames) == 12
    s = frames[1].side
    assert s.qp is None and s.qp_map is None and s.mv_past is None
    assert s.sources["motion_vectors"] == "none" and s.sources["pict_type"] == "bitstream"


def test_streaming_does_not_keep_frames(clip):
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    with open_video(path) as reader:
        it = iter(reader)
        first = next(it)
        ref = weakref.ref(first)
        del first
        next(it)
        assert ref() is None


def test_frames_free_without_the_cycle_collector(clip):
    # Frames that wait for gc (a reference cycle) pile up: +37 MB per 300 frames at 360p.
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with open_video(path) as reader:
            for frame in reader:
                assert frame.side.mv_past is not None
        del frame
        gc.collect()
        stuck = [o for o in gc.garbage if isinstance(o, av.VideoFrame)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert stuck == []


def test_file_object_source(clip):
    path = clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    frames, _ = read_all(io.BytesIO(Path(path).read_bytes()))
    assert len(frames) == 12
    with open(path, "rb") as fh:
        frames, _ = read_all(fh)
    assert len(frames) == 12


# ---------------------------------------------------------- test matrix (issue)


@pytest.mark.parametrize(
    "name,options",
    [
        ("baseline_cavlc", {"profile": "baseline", "bf": "0"}),
        ("main_cabac_bframes", {"profile": "main", "bf": "3", "b-pyramid": "normal"}),
        ("high_cavlc", {"profile": "high", "coder": "0", "bf": "2"}),
        ("slices", {"slices": "4", "bf": "2"}),
        ("interlaced", {"x264-params": "interlaced=1:tff=1", "bf": "2"}),
    ],
)
def test_h264_variants(clip, name, options):
    path = clip(f"{name}.mp4", options={**options, **X264_FAST}, frames=10)
    frames, reader = read_all(path)
    assert len(frames) == 10
    assert reader.errors == []
    inter = [f.side for f in frames if f.side.pict_type in "PB"]
    assert inter and all(s.mv_count > 0 for s in inter)
    assert all(f.side.qp_map.shape == (9, 11) for f in frames)
    if name == "baseline_cavlc":
        assert reader.info.profile in ("Baseline", "Constrained Baseline")
        assert reader.info.rate_control.options["cabac"] == "0"
    if name == "main_cabac_bframes":
        assert reader.info.profile == "Main"
        assert reader.info.rate_control.options["b_pyramid"] == "2"
        assert any(s.pict_type == "B" for s in inter)
    if name == "interlaced":
        assert reader.info.rate_control.options["interlaced"] == "tff"
        assert frames[0].av_frame.interlaced_frame


@pytest.mark.parametrize("size", [(90, 70), (200, 120), (64, 48)])
def test_odd_sizes(clip, size):
    w, h = size
    frames, _ = read_all(clip("odd.mp4", size=size, options=X264_FAST, frames=5))
    y, u, v = frames[0].planes
    assert y.shape == (h, w) and u.shape == ((h + 1) // 2, (w + 1) // 2)
    s = frames[1].side
    assert s.qp_map.shape == (-(-h // 16), -(-w // 16))
    assert s.mv_past.shape[:2] == (-(-h // 8), -(-w // 8))
    assert s.partition.shape == s.qp_map.shape


@pytest.mark.parametrize(
    "pix_fmt,size,delivered,dtype",
    [
        ("yuv444p", (175, 97), "yuv420p", np.uint8),  # odd size, 4:4:4
        ("yuv422p10le", (90, 70), "yuv420p10le", np.uint16),
        ("yuv422p", (64, 48), "yuv420p", np.uint8),
    ],
)
def test_non_420_is_converted(clip, pix_fmt, size, delivered, dtype):
    """Other formats are converted explicitly to 4:2:0 at the source's depth class."""
    w, h = size
    frames, reader = read_all(
        clip("conv.mp4", size=size, pix_fmt=pix_fmt, options=X264_FAST, frames=4)
    )
    assert reader.info.source_pix_fmt == pix_fmt
    assert reader.info.pix_fmt == delivered
    y, u, v = frames[0].planes
    assert y.shape == (h, w) and u.shape == v.shape == ((h + 1) // 2, (w + 1) // 2)
    assert y.dtype == u.dtype == dtype
    assert frames[1].side.mv_count > 0


def test_10bit(clip):
    frames, reader = read_all(clip("10bit.mp4", pix_fmt="yuv420p10le", options=X264_FAST, frames=4))
    assert reader.info.pix_fmt == "yuv420p10le" and reader.info.bit_depth == 10
    assert reader.info.profile == "High 10"
    y, u, _ = frames[0].planes
    assert y.dtype == np.uint16 and u.dtype == np.uint16
    assert y.shape == (144, 176) and u.shape == (72, 88)
    assert 255 < int(y.max()) < 1024
    assert frames[1].side.qp_map is not None


def test_vfr_timestamps(clip):
    tb = Fraction(1, 1000)
    pts = [0, 40, 70, 150, 160, 230, 330, 340]
    for name in ("vfr.mkv", "vfr.mp4"):
        path = clip(name, frames=8, pts=pts, time_base=tb, options={"bf": "0", **X264_FAST})
        frames, _ = read_all(path)
        times = [f.side.pts * f.side.time_base for f in frames]
        assert times == [Fraction(p, 1000) for p in pts]


def test_rotation_and_audio(clip):
    path = clip("rot.mp4", rotation=90, audio=True, options=X264_FAST, frames=5)
    with open_video(path) as reader:
        assert reader.info.rotation == 90.0
        assert reader.info.stream_index == 0
        assert len(list(reader)) == 5


def test_raw_annexb(clip):
    frames, reader = read_all(clip("raw.264", options={"bf": "2", **X264_FAST}, frames=8))
    assert len(frames) == 8 and reader.info.codec == "h264"
    assert reader.info.encoder == "x264"


def test_mpeg4(clip):
    frames, reader = read_all(clip("m4.mp4", codec="mpeg4", frames=6))
    assert len(frames) == 6 and reader.info.codec == "mpeg4"
    s = frames[1].side
    assert s.pict_type == "P" and s.mv_count > 0
    assert s.sources["motion_vectors"] == "bitstream" and s.sources["qp"] == "none"
    assert s.qp is None and s.qp_native is not None


def test_vp9(clip):
    opts = {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}
    frames, reader = read_all(clip("v.webm", codec="libvpx-vp9", options=opts, frames=6))
    assert len(frames) == 6 and reader.info.codec == "vp9"
    s = frames[1].side
    assert s.sources["motion_vectors"] == "none" and s.qp is None
    assert s.qp_native is not None and 0 <= s.qp_native <= 255
    assert not s.mv_past_valid.any()
    assert (s.partition == PARTITION_CODES["unknown"]).all()


def test_av1(clip):
    frames, reader = read_all(
        clip("a.mkv", codec="libsvtav1", options={"preset": "12", "crf": "40"}, frames=4)
    )
    assert len(frames) == 4 and reader.info.codec == "av1"
    assert frames[0].side.pict_type == "I"
    assert frames[1].side.sources["qp"] == "none"


# ------------------------------------------------------------------- errors


def test_missing_and_empty(tmp_path):
    with pytest.raises(UnsupportedInput, match="no such file"):
        open_video(tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(UnsupportedInput, match="empty"):
        open_video(tmp_path / "empty.mp4")
    with pytest.raises(UnsupportedInput, match="directory"):
        open_video(tmp_path)


def test_not_video(tmp_path):
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    txt = tmp_path / "notes.txt"
    txt.write_text("hello world\nthis is not a video\n" * 20)
    audio = make_audio_only(tmp_path / "audio.m4a")
    for path in (rnd, txt, audio):
        with pytest.raises(UnsupportedInput) as err:
            open_video(path)
        assert "\n" not in str(err.value)


def test_truncated_mp4(clip, tmp_path):
    data = Path(
        clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12)
    ).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # x264 mp4: moov is at the end
    with pytest.raises(CorruptStream) as err:
        open_video(cut)
    assert "\n" not in str(err.value)


def test_truncated_annexb(clip, tmp_path):
    data = Path(clip("raw.264", options={"bf": "2", **X264_FAST}, frames=8)).read_bytes()
    cut = tmp_path / "cut.264"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    frames, reader = read_all(cut)
    assert 0 < len(frames) < 8
    head = tmp_path / "head.264"
    head.write_bytes(data[:40])  # only part of the parameter sets
    with pytest.raises(CorruptStream):
        open_video(head)


def test_damaged_middle_keeps_going(clip, tmp_path):
    data = bytearray(Path(clip("raw.264", options={"bf": "2", **X264_FAST}, frames=8)).read_bytes())
    rng = np.random.default_rng(3)
    mid = len(data) // 2
    data[mid : mid + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.264"
    bad.write_bytes(bytes(data))
    frames, reader = read_all(bad)
    assert len(frames) >= 4
    assert isinstance(reader.errors, list)


# -------------------------------------------------------------- unit: helpers


def _mvs(rows):
    dtype = np.dtype(
        [
            ("source", "<i4"),
            ("w", "u1"),
            ("h", "u1"),
            ("src_x", "<i2"),
            ("src_y", "<i2"),
            ("dst_x", "<i2"),
            ("dst_y", "<i2"),
            ("flags", "<u8"),
            ("motion_x", "<i4"),
            ("motion_y", "<i4"),
            ("motion_scale", "<u2"),
        ]
    )
    return np.array(
        [(s, w, h, 0, 0, x, y, 0, mx, my, sc) for s, w, h, x, y, mx, my, sc in rows], dtype=dtype
    )


def test_dense_motion_painting():
    mvs = _mvs(
        [
            (-1, 16, 16, 8, 8, 8, -4, 4),  # MB (0,0): 2x2 cells, (2, -1)
            (1, 8, 8, 20, 4, 3, 0, 4),  # cell (0,2) future, (0.75, 0)
            (-1, 16, 8, 24, 20, 2, 2, 2),  # MB (1,1) top half: cells (2,2),(2,3)
            (-1, 16, 16, 40, 40, 4, 4, 4),  # partly outside a 40x40 frame: clipped
        ]
    )
    past, past_ok, fut, fut_ok, has = dense_motion(mvs, 40, 40)
    assert past.shape == (5, 5, 2)
    assert past_ok[:2, :2].all() and (past[:2, :2] == [2, -1]).all()
    assert fut_ok[0, 2] and fut[0, 2].tolist() == [0.75, 0.0] and fut_ok.sum() == 1
    assert past_ok[2, 2] and past_ok[2, 3] and not past_ok[3, 2]
    assert past[2, 3].tolist() == [1.0, 1.0]
    assert past_ok[4, 4] and past_ok.sum() == 4 + 2 + 1
    assert has.sum() == 8


def test_partition_map_codes():
    mvs = _mvs(
        [
            (-1, 16, 16, 8, 8, 0, 0, 4),  # MB 0: 16x16
            (-1, 16, 8, 24, 4, 0, 0, 4),
            (-1, 16, 8, 24, 12, 0, 0, 4),  # MB 1: 16x8
            (-1, 8, 16, 36, 8, 0, 0, 4),
            (1, 8, 16, 44, 8, 0, 0, 4),  # MB 2: 8x16
            (-1, 8, 8, 52, 4, 0, 0, 4),  # MB 3: 8x8
        ]
    )
    part = partition_map(mvs, 32, 80)
    assert part.shape == (2, 5)
    codes = PARTITION_CODES
    assert part[0].tolist() == [
        codes["16x16"],
        codes["16x8"],
        codes["8x16"],
        codes["8x8"],
        codes["intra"],
    ]
    assert (part[1] == codes["intra"]).all()


X264_SEI = (
    b"\xdcE\xe9\xbd\xe6\xd9H\xb7\x96,\xd8 \xd9#\xee\xef"
    b"x264 - core 165 - H.264/MPEG-4 AVC codec - Copyleft 2003-2025 - "
    b"http://www.videolan.org/x264.html - options: cabac=1 ref=3 deblock=1:0:0 "
    b"analyse=0x3:0x113 rc=%s mbtree=1 %s qcomp=0.60\x00"
)


@pytest.mark.parametrize(
    "rc,extra,mode,crf,qp,bitrate",
    [
        (b"crf", b"crf=18.5", "crf", 18.5, None, None),
        (b"cqp", b"qp=30", "cqp", None, 30.0, None),
        (b"abr", b"bitrate=500 ratetol=1.0", "abr", None, None, 500.0),
        (b"cbr", b"bitrate=800 vbv_maxrate=800", "cbr", None, None, 800.0),
        (b"2pass", b"bitrate=300", "2pass", None, None, 300.0),
    ],
)
def test_parse_x264_sei(rc, extra, mode, crf, qp, bitrate):
    encoder, rcs = parse_encoder_sei(X264_SEI % (rc, extra))
    assert encoder == "x264"
    assert (rcs.mode, rcs.crf, rcs.qp, rcs.bitrate) == (mode, crf, qp, bitrate)
    assert rcs.options["deblock"] == "1:0:0" and rcs.options["qcomp"] == "0.60"


def test_parse_x265_sei():
    text = (
        b"\x00" * 16 + b"x265 (build 215) - 4.1:[Linux][GCC 14.2.1][64 bit] 8bit+10bit+12bit"
        b" - H.265/HEVC codec - Copyright 2013-2018 (c) Multicoreware, Inc - "
        b"http://x265.org - options: cpuid=1111039 frame-threads=1 no-wpp rc=crf crf=28.0 "
        b"qcomp=0.60 ipratio=1.40 aq-mode=2 cutree"
    )
    encoder, rcs = parse_encoder_sei(text)
    assert encoder == "x265" and rcs.mode == "crf" and rcs.crf == 28.0
    assert rcs.options["wpp"] == "0" and rcs.options["cutree"] == "1"
    _, rcs = parse_encoder_sei(text.replace(b"rc=crf crf=28.0", b"rc=2 pass bitrate=700"))
    assert rcs.mode == "2pass" and rcs.bitrate == 700.0
    assert parse_encoder_sei(b"\x00" * 16 + b"Lavc60 libx264") is None


def test_make_clip_helper_writes_requested_codec(tmp_path):
    path = make_clip(tmp_path / "tiny.mp4", size=(64, 48), frames=3, options=X264_FAST)
    with open_video(path) as reader:
        assert (reader.info.width, reader.info.height) == (64, 48)
        assert len(list(reader)) == 3


def test_http_url(clip):
    path = Path(clip("basic.mp4", options={"crf": "23", "bf": "2", **X264_FAST}, frames=12))
    with serve_folder(path.parent) as base:
        frames, reader = read_all(f"{base}/{path.name}")
        assert len(frames) == 12 and reader.info.encoder == "x264"
        with pytest.raises(UnsupportedInput, match="404"):
            open_video(f"{base}/missing.mp4")


def test_stream_index(clip):
    path = clip("rot.mp4", rotation=90, audio=True, options=X264_FAST, frames=5)
    with open_video(path, stream_index=0) as reader:
        assert reader.info.stream_index == 0
    with pytest.raises(UnsupportedInput, match="not a video stream"):
        open_video(path, stream_index=1)
