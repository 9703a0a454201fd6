"""Smart rendering: where a video can be cut into GOPs that are copied or re-encoded.

A *segment* is a run of packets (decode order) that starts at an IDR picture
and whose frames are all displayed before every frame of the next segment
(a clean boundary). Only there can a GOP of the input's packets sit next to a
re-encoded GOP:

* H.264: a boundary needs an IDR access unit (NAL type 5). A non-IDR I frame
  (x264 ``open-gop``, or a scene cut before ``min-keyint``) is not a boundary:
  the B frames after it may predict from the GOP before it, so the two GOPs
  stay one segment (copied or re-encoded together).
* HEVC: IDR (NAL 19/20) only; CRA/BLA (open GOP, x265's default) are not
  boundaries for the same reason.
* Any boundary whose display order is not clean (RADL/RASL leading pictures,
  B frames shown before the IDR they follow in decode order) is merged too.

Mixed output (copied and re-encoded GOPs in one stream) is written for H.264
in MP4/MOV/Matroska (length-prefixed NAL units, ``avcC`` extradata): the
re-encoded GOPs use their own SPS/PPS id (x264 ``sps-id``), and the output's
``avcC`` holds both parameter sets, so the copied packets stay byte for byte
the input's and every GOP finds its parameter sets out of band (the encoder
also repeats its own in band at each IDR). Other codecs are either copied
whole (nothing enhanced: a remux) or re-encoded whole.

No torch here: this is the bitstream layer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import av.error

from bitstream.errors import UnsupportedInput
from bitstream.nal import annexb_nal_units, length_prefixed, length_prefixed_nal_units

__all__ = [
    "Avcc",
    "GopScan",
    "Segment",
    "annexb_nal_units",
    "length_prefixed",
    "length_prefixed_nal_units",
    "parameter_set_id",
    "scan_gops",
]

H264_IDR = 5
H264_SPS = 7
H264_PPS = 8
HEVC_IDR = (19, 20)
# A mixed stream needs at least this many ticks per frame, so that decode
# timestamps can be nudged by a tick at a splice and stay below the pts.
MIN_TICKS_PER_FRAME = 8


# ------------------------------------------------------------------ NAL units


def _rbsp(unit: bytes) -> bytes:
    """The payload with emulation-prevention bytes removed (00 00 03 -> 00 00)."""
    return unit.replace(b"\x00\x00\x03", b"\x00\x00")


def _read_ue(bits: str, pos: int) -> tuple[int, int]:
    zeros = 0
    while pos < len(bits) and bits[pos] == "0":
        zeros += 1
        pos += 1
    value = int(bits[pos : pos + zeros + 1], 2) - 1
    return value, pos + zeros + 1


def parameter_set_id(unit: bytes) -> int:
    """``seq_parameter_set_id`` of an H.264 SPS or ``pic_parameter_set_id`` of a PPS."""
    rbsp = _rbsp(unit)
    kind = unit[0] & 31
    start = 4 if kind == H264_SPS else 1  # SPS: header, profile, constraints, level
    bits = "".join(f"{b:08b}" for b in rbsp[start : start + 8])
    return _read_ue(bits, 0)[0]


@dataclass
class Avcc:
    """An ``AVCDecoderConfigurationRecord`` (ISO/IEC 14496-15), the H.264 extradata of MP4/MKV."""

    profile: int
    compatibility: int
    level: int
    length_size: int
    sps: list[bytes]
    pps: list[bytes]
    tail: bytes = b""  # the High-profile extension (chroma format, bit depths, SPS ext)

    @classmethod
    def parse(cls, data: bytes) -> Avcc:
        if len(data) < 7 or data[0] != 1:
            raise ValueError("not an avcC record")
        length_size = (data[4] & 3) + 1
        i, sps, pps = 6, [], []
        for _ in range(data[5] & 31):
            n = int.from_bytes(data[i : i + 2], "big")
            sps.append(data[i + 2 : i + 2 + n])
            i += 2 + n
        count = data[i]
        i += 1
        for _ in range(count):
            n = int.from_bytes(data[i : i + 2], "big")
            pps.append(data[i + 2 : i + 2 + n])
            i += 2 + n
        return cls(data[1], data[2], data[3], length_size, sps, pps, data[i:])

    def to_bytes(self) -> bytes:
        out = bytearray([1, self.profile, self.compatibility, self.level])
        out += bytes([0xFC | (self.length_size - 1), 0xE0 | len(self.sps)])
        for unit in self.sps:
            out += len(unit).to_bytes(2, "big") + unit
        out.append(len(self.pps))
        for unit in self.pps:
            out += len(unit).to_bytes(2, "big") + unit
        return bytes(out + self.tail)

    def ids(self) -> set[int]:
        return {parameter_set_id(u) for u in self.sps + self.pps}

    def merged(self, sps: list[bytes], pps: list[bytes]) -> Avcc:
        """This record plus more parameter sets (another encoder's, with other ids).

        The profile/level fields take the highest of the two, so that a player
        checking them before decoding is not told less than the stream needs.
        """
        profile, level = self.profile, self.level
        for unit in sps:
            profile, level = max(profile, unit[1]), max(level, unit[3])
        compat = self.compatibility
        for unit in sps:
            compat &= unit[2]
        return Avcc(profile, compat, level, self.length_size, self.sps + sps, self.pps + pps,
                    self.tail)  # fmt: skip


# ------------------------------------------------------------------- GOP scan


@dataclass
class Segment:
    """Packets ``first..end-1`` (decode order), displayed from ``start_pts`` on."""

    first: int
    end: int
    start_pts: int
    frames: int


@dataclass
class GopScan:
    """The copyable segments of one video stream, and what stands in the way of mixing."""

    codec: str
    time_base: Fraction
    segments: list[Segment]
    packets: int
    extradata: bytes = b""
    copyable: str | None = None  # why the stream cannot be copied at all (None: it can)
    mixable: str | None = None  # why copied and re-encoded GOPs cannot be mixed (None: they can)
    _starts: list[int] = field(default_factory=list, repr=False)

    def segment_of(self, pts: int | None) -> int:
        """Index of the segment that displays the frame at ``pts`` (input time base)."""
        if pts is None or len(self.segments) == 1:
            return 0
        if not self._starts:
            self._starts = [s.start_pts for s in self.segments]
        return max(0, bisect.bisect_right(self._starts, pts) - 1)


def _is_idr(codec: str, data: bytes, length_size: int) -> bool:
    try:
        if length_size:
            units = length_prefixed_nal_units(data, length_size)
        else:
            units = annexb_nal_units(data)
    except ValueError:
        return False
    if codec == "h264":
        return any(u and (u[0] & 31) == H264_IDR for u in units)
    if codec == "hevc":
        return any(u and ((u[0] >> 1) & 63) in HEVC_IDR for u in units)
    return False


def _length_size(codec: str, extradata: bytes) -> int:
    """NAL length size of the packets (0: Annex-B start codes)."""
    if codec == "h264" and extradata[:1] == b"\x01" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 22 and extradata[:1] == b"\x01":
        return (extradata[21] & 3) + 1
    return 0


def scan_gops(source: Any, stream_index: int) -> GopScan:
    """Demux (no decoding) the video stream and cut it into segments at clean IDR boundaries."""
    try:
        container = av.open(source)
    except (OSError, av.error.FFmpegError) as exc:
        raise UnsupportedInput(f"cannot reopen {source} to scan its GOPs: {exc}") from None
    with container:
        stream = container.streams[stream_index]
        codec = stream.codec_context.name if stream.codec_context else ""
        extradata = bytes(stream.codec_context.extradata or b"") if stream.codec_context else b""
        length_size = _length_size(codec, extradata)
        pts, dts, idr = [], [], []
        for packet in container.demux(stream):
            if not packet.size:
                continue
            pts.append(packet.pts)
            dts.append(packet.dts)
            idr.append(_is_idr(codec, bytes(packet), length_size) if codec else False)
        time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 25)
        frame_rate = stream.average_rate or stream.base_rate
    n = len(pts)
    scan = GopScan(codec, time_base, [Segment(0, n, min(p for p in pts if p is not None)
                   if any(p is not None for p in pts) else 0, n)], n, extradata)  # fmt: skip
    if n == 0:
        scan.copyable = "the video stream has no packets"
        return scan
    if any(p is None for p in pts) or any(d is None for d in dts):
        scan.copyable = "the video packets have no timestamps (raw stream)"
        return scan
    if codec != "h264":
        scan.mixable = f"mixing copied and re-encoded GOPs is implemented for H.264, not {codec}"
    elif length_size != 4:
        scan.mixable = "the H.264 packets are not length-prefixed (avcC) with 4-byte lengths"
    elif frame_rate and time_base * Fraction(frame_rate) > Fraction(1, MIN_TICKS_PER_FRAME):
        scan.mixable = f"the time base {time_base} is too coarse to splice timestamps"
    suffix_min = pts[:]
    for i in range(n - 2, -1, -1):
        suffix_min[i] = min(pts[i], suffix_min[i + 1])
    starts, prefix_max = [0], pts[0]
    for i in range(1, n):
        if idr[i] and prefix_max < suffix_min[i]:
            starts.append(i)
        prefix_max = max(prefix_max, pts[i])
    bounds = starts + [n]
    scan.segments = [
        Segment(a, b, min(pts[a:b]), b - a) for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return scan
