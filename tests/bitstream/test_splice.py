"""bitstream.splice + the writer's smart rendering: copied GOPs next to re-encoded ones."""

from __future__ import annotations

from pathlib import Path

import av
import av.logging
import numpy as np
import pytest

from bitstream.reader import open_video
from bitstream.splice import Avcc, annexb_nal_units, length_prefixed, scan_gops
from bitstream.types import DecodedFrame
from bitstream.writer import VideoWriter

GOPS = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "3", "crf": "30"}


@pytest.fixture
def gop_clip(clip):
    return clip("gops.mp4", frames=30, options=GOPS, audio=True)


def _decode(path: Path) -> tuple[list[np.ndarray], list, list[str]]:
    """Luma of every frame, their pts, and FFmpeg's error messages while decoding."""
    with av.logging.Capture() as logs, av.open(str(path)) as c:
        frames = list(c.decode(c.streams.video[0]))
    errors = [msg for level, _, msg in logs if level is not None and level <= av.logging.ERROR]
    return (
        [f.to_ndarray(format="gray") for f in frames],
        [f.pts * f.time_base for f in frames],
        errors,
    )


def _video_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def _brighten(frame: DecodedFrame) -> DecodedFrame:
    y, u, v = frame.planes
    return DecodedFrame(
        (np.clip(y.astype(int) + 8, 0, 255).astype(np.uint8), u, v), frame.side, frame.av_frame
    )


def test_nal_helpers_roundtrip():
    units = [b"\x67\x64\x00\x0b\xac", b"\x68\xeb", b"\x65\x88\x00\x00\x03\x01"]
    annexb = b"\x00\x00\x00\x01" + b"\x00\x00\x01".join(units)
    assert annexb_nal_units(annexb) == units
    assert length_prefixed(units)[:4] == (5).to_bytes(4, "big")


def test_scan_cuts_at_closed_idr_gops(gop_clip):
    with open_video(gop_clip) as reader:
        index = reader.info.stream_index
    scan = scan_gops(str(gop_clip), index)
    assert scan.copyable is None and scan.mixable is None
    assert [s.frames for s in scan.segments] == [10, 10, 10]
    avcc = Avcc.parse(scan.extradata)
    assert Avcc.parse(avcc.to_bytes()) == avcc and avcc.ids() == {0}


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_nothing_enhanced_is_a_remux_with_identical_packets(gop_clip, tmp_path, ext):
    with open_video(gop_clip) as reader:
        info = reader.info
    scan = scan_gops(str(gop_clip), info.stream_index)
    out = tmp_path / f"out{ext}"
    writer = VideoWriter(out, info, source=str(gop_clip), splice=scan, copy=[True] * 3)
    writer.copy_video()
    writer.close()
    assert writer.gops_copied == 3 and writer.frames == 30
    assert _video_packets(out) == _video_packets(gop_clip)
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
@pytest.mark.parametrize("copy", [[True, False, True], [False, True, False]])
def test_mixed_gops_decode_cleanly_with_every_frame(gop_clip, tmp_path, ext, copy):
    with open_video(gop_clip) as reader:
        info = reader.info
    scan = scan_gops(str(gop_clip), info.stream_index)
    out = tmp_path / f"mixed{ext}"
    with open_video(gop_clip) as reader:
        writer = VideoWriter(out, info, crf=18, source=str(gop_clip), splice=scan, copy=copy)
        for frame in reader:
            writer.write(_brighten(frame))
        writer.close()
    assert writer.gops_copied == sum(copy)
    src_luma, src_times, _ = _decode(gop_clip)
    luma, times, errors = _decode(out)
    assert errors == []
    assert len(luma) == 30
    offset = times[0] - src_times[0]  # Matroska may shift the whole stream
    assert [t - offset for t in times] == src_times
    src_packets, packets = _video_packets(gop_clip), _video_packets(out)
    for k, copied in enumerate(copy):
        gop = slice(10 * k, 10 * k + 10)
        same = [np.array_equal(a, b) for a, b in zip(src_luma[gop], luma[gop], strict=True)]
        if copied:  # the input's packets, decoded to the input's pixels
            assert packets[gop] == src_packets[gop] and all(same)
        else:  # re-encoded from the brightened frames
            assert not any(same)
            assert (
                np.mean(
                    [b.mean() - a.mean() for a, b in zip(src_luma[gop], luma[gop], strict=True)]
                )
                > 4
            )
