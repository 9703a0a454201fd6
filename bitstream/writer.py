"""Encode enhanced frames and remux every other stream of the source untouched.

:class:`VideoWriter` is the output side of the pipeline (PyAV + numpy, no torch):

* the container follows OUTPUT's extension (``.mp4``/``.m4v``, ``.mkv``,
  ``.mov``); ``-`` writes Matroska to stdout;
* the video stream is encoded with ``libx264``, ``libx265`` or ``ffv1``
  (``auto``: the input's family, see :func:`choose_codec`), same size, same
  pixel format family (10-bit stays 10-bit), same time base and frame rate;
  every frame keeps its pts (VFR stays VFR); colour primaries/transfer/matrix/
  range, sample aspect ratio and the display matrix (rotation, flips) are set
  on the output; the stream's metadata (language, title...) and disposition
  are copied;
* audio, subtitle, data and attachment streams are copied packet for packet
  (``add_stream_from_template``), interleaved with the video by time, from a
  second demuxer opened on the same source (independent of the reader);
  container metadata is copied.

Odd sizes: libx264 and libx265 refuse 4:2:0 (and 4:2:2 for odd widths) at an
odd width or height, and H.264/HEVC cannot crop by one luma pixel in 4:2:0,
so no padding trick can keep the size either. ``auto`` then falls back to
lossless FFV1 (same size, same pixels, bigger file) and says so in
``warnings``; an explicit ``--codec libx264`` fails with a one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import io
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import av
import av.error
import numpy as np

from bitstream.errors import BitstreamError, UnsupportedInput, UnsupportedOutput
from bitstream.reader import side_data
from bitstream.splice import Avcc, GopScan, annexb_nal_units, length_prefixed
from bitstream.types import DecodedFrame, SequenceInfo

__all__ = [
    "CODECS",
    "CRF_RANGE",
    "CONTAINER_FORMATS",
    "PRESETS",
    "OutputPlan",
    "UnsupportedOutput",
    "VideoWriter",
    "choose_codec",
    "crf_on_scale",
    "deeper_pix_fmt",
    "default_crf",
    "frame_from_planes",
    "input_level",
    "muxer_codecs",
    "output_format",
    "output_pix_fmt",
    "splice_problem",
]

STDOUT = "-"
CONTAINER_FORMATS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mkv": "matroska",
    ".mov": "mov",
    ".y4m": "yuv4mpegpipe",
}
# What ``--format`` names for stdout (``-``): Matroska by default, or YUV4MPEG2 for an
# encoder of the user's choice (``vqe enhance in.mp4 - --format y4m | x265 --y4m -``).
STDOUT_FORMATS = {"mkv": "matroska", "y4m": "yuv4mpegpipe"}
# Containers of raw pictures and the codec that carries them: no encoder runs, and
# nothing but the video fits (YUV4MPEG2 has no audio or subtitles).
RAW_FORMATS = {"yuv4mpegpipe": "wrapped_avframe"}
CODECS = ("auto", "libx264", "libx265", "ffv1")
CRF_RANGE = (0, 51)  # what x264 and x265 accept (8-bit)
FAMILY_ENCODER = {"h264": "libx264", "hevc": "libx265"}
PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
LOSSLESS = frozenset({"ffv1", "wrapped_avframe"})
# Encoders that need even dimensions for chroma-subsampled formats.
EVEN_SIZE_ENCODERS = frozenset({"libx264", "libx265"})

# Metadata the muxer regenerates, or that describes the old encode of the video.
STALE_KEYS = frozenset({"encoder", "duration", "major_brand", "minor_version", "compatible_brands"})
STALE_VIDEO_KEYS = STALE_KEYS | {"bps", "number_of_frames", "number_of_bytes", "vendor_id"}

# --- default CRF ---------------------------------------------------------------
# The product's output rate is calibrated per weights file and chosen by
# enhancer.output_rate (the pipeline always passes an explicit CRF). What is
# left here is the writer's own fallback for library callers that give none,
# and the input's compression level on the x264 CRF scale (``input_level``).
# The old rule "input CRF - 12" was measured on a proxy that removes 1 dB of
# error; the real model removes 0.05-0.4 dB, less than such a re-encode costs
# (-0.07 dB at 2.2x the size on a real clip): the pipeline no longer uses it.
CRF_MARGIN = 12.0
CRF_FLOOR = 6.0
CRF_CEIL = 30.0
# x265's CRF scale sits about 5 above x264's for the same quality (x265's
# default 28 ~ x264's 23); sequences are compared on the x264 scale.
X265_CRF_OFFSET = 5.0
# Without any hint of the input's quality: x264's "visually transparent" CRF.
FALLBACK_CRF = 18.0
# An I frame's QP sits about 3 below the sequence CRF (x264 ipratio 1.4).
I_FRAME_QP_OFFSET = 3.0


# ------------------------------------------------------------------- choices


def output_format(output: str | Path, stdout_format: str = "mkv") -> str:
    """FFmpeg muxer name for OUTPUT: from its extension; ``-`` is ``stdout_format``
    (see STDOUT_FORMATS) on stdout."""
    if str(output) == STDOUT:
        try:
            return STDOUT_FORMATS[stdout_format]
        except KeyError:
            known = ", ".join(STDOUT_FORMATS)
            raise UnsupportedOutput(
                f"unknown format {stdout_format!r} for stdout: use one of {known}"
            ) from None
    suffix = Path(output).suffix.lower()
    try:
        return CONTAINER_FORMATS[suffix]
    except KeyError:
        known = ", ".join(sorted(CONTAINER_FORMATS))
        raise UnsupportedOutput(
            f"cannot tell the container from {str(output)!r}: use one of {known} (or - for stdout)"
        ) from None


def _canonical_yuv(name: str) -> str | None:
    """Planar YUV/gray format with the same chroma subsampling and bit depth, or None."""
    try:
        fmt = av.VideoFormat(name)
    except (ValueError, av.error.FFmpegError):
        return None
    if fmt.is_rgb or fmt.has_palette or fmt.is_bayer:
        return None
    bits = max(c.bits for c in fmt.components)
    suffix = "" if bits <= 8 else f"{bits}le"
    chroma = [c for c in fmt.components if c.is_chroma]
    if not chroma:
        return f"gray{suffix}"
    sub = {(0, 0): "444", (1, 0): "422", (1, 1): "420"}.get(
        (int(fmt.chroma_width(64) == 32), int(fmt.chroma_height(64) == 32))
    )
    return f"yuv{sub}p{suffix}" if sub else None


def output_pix_fmt(info: SequenceInfo, codec: str) -> str:
    """The pixel format to encode: the source's own family when ``codec`` can store it.

    The reader delivers 4:2:0 (``info.pix_fmt``); a 4:2:2/4:4:4/gray/12-bit
    source goes back to its own layout (chroma upsampled, depth kept) so that
    the output plays wherever the input did. Otherwise ``info.pix_fmt``.
    """
    supported = {f.name for f in (av.Codec(codec, "w").video_formats or [])}
    source = _canonical_yuv(info.source_pix_fmt or info.pix_fmt)
    if source in supported:
        return source
    return info.pix_fmt


def deeper_pix_fmt(pix_fmt: str, bits: int, codec: str) -> str:
    """``pix_fmt`` with at least ``bits`` bits per sample, same layout (``yuv420p`` ->
    ``yuv420p10le``); UnsupportedOutput where ``codec`` cannot encode it."""
    fmt = av.VideoFormat(pix_fmt)
    if max(c.bits for c in fmt.components) >= bits:
        return pix_fmt
    base = _canonical_yuv(pix_fmt) or pix_fmt
    deeper = f"{base}{bits}le"
    supported = {f.name for f in (av.Codec(codec, "w").video_formats or [])}
    if deeper not in supported:
        raise UnsupportedOutput(f"{codec} cannot encode {pix_fmt} at {bits} bits")
    return deeper


def _size_problem(codec: str, pix_fmt: str, width: int, height: int) -> str | None:
    if codec not in EVEN_SIZE_ENCODERS:
        return None
    fmt = av.VideoFormat(pix_fmt)
    odd_w = width % 2 and fmt.chroma_width(2) != 2
    odd_h = height % 2 and fmt.chroma_height(2) != 2
    if odd_w or odd_h:
        return f"{codec} cannot encode {pix_fmt} at the odd size {width}x{height}"
    return None


def _codec_problem(codec: str, info: SequenceInfo, fmt: str) -> str | None:
    """Why ``codec`` cannot carry this sequence in container ``fmt``, or None."""
    pix_fmt = output_pix_fmt(info, codec)
    supported = {f.name for f in (av.Codec(codec, "w").video_formats or [])}
    if pix_fmt not in supported:
        return f"{codec} cannot encode {pix_fmt}"
    if codec not in muxer_codecs(fmt):
        return f"the {fmt} container cannot hold {codec}"
    return _size_problem(codec, pix_fmt, info.width, info.height)


@functools.cache
def muxer_codecs(fmt: str) -> frozenset[str]:
    """Codec names the muxer ``fmt`` accepts (asked of a throwaway in-memory muxer)."""
    with av.open(io.BytesIO(), "w", format=fmt) as out:
        return frozenset(out.supported_codecs)


def choose_codec(requested: str, info: SequenceInfo, fmt: str) -> tuple[str, list[str]]:
    """The encoder to use and notes for the user.

    ``auto`` is the input's family (h264 -> libx264, hevc -> libx265, else
    libx264), then the other of the two, then lossless ffv1, in that order of
    preference, skipping any that cannot carry the size/format/container.
    """
    if requested not in CODECS:
        raise UnsupportedOutput(f"unknown codec {requested!r}: use one of {', '.join(CODECS)}")
    if fmt in RAW_FORMATS:
        if requested not in ("auto", "ffv1"):  # ffv1: --quality archive, the same frames
            raise UnsupportedOutput(f"a {fmt} output holds raw frames: --codec {requested} "
                                    "does not apply")  # fmt: skip
        return RAW_FORMATS[fmt], []
    if requested != "auto":
        problem = _codec_problem(requested, info, fmt)
        if problem:
            hint = "; try --codec ffv1 (lossless, keeps any size)" if requested != "ffv1" else ""
            raise UnsupportedOutput(problem + hint)
        return requested, []
    first = FAMILY_ENCODER.get(info.codec, "libx264")
    notes: list[str] = []
    for codec in dict.fromkeys((first, "libx264", "libx265", "ffv1")):
        problem = _codec_problem(codec, info, fmt)
        if problem is None:
            return codec, notes
        notes.append(f"{problem}; using the next codec")
    raise UnsupportedOutput("no encoder can write this video: " + "; ".join(notes))


def input_level(
    info: SequenceInfo,
    first_qp: float | None = None,
    first_type: str = "?",
    *,
    mean_qp: float | None = None,
    qp_offset: float = 0.0,
) -> float | None:
    """How compressed the input is: its level on the x264 CRF scale, None when nothing tells.

    The one answer for the writer, the pipeline and the output rate, in order of trust:
    the encoder's SEI (x264/x265 CRF or constant QP; x265's CRF moved to the x264
    scale); else ``mean_qp``, a mean frame QP over the video, less ``qp_offset`` (how far
    the calibration encodes' frame QPs sat above their CRF); else a first frame's QP
    ``first_qp`` (an I frame's raised by ``I_FRAME_QP_OFFSET`` to estimate the sequence's
    CRF; type ``?`` takes it as it is).
    """
    if info.encoder == "x265" and info.rate_control.crf is not None:
        return info.rate_control.crf - X265_CRF_OFFSET  # to the x264 scale; QPs match
    if info.sequence_qp is not None:
        return info.sequence_qp
    if mean_qp is not None:
        return mean_qp - qp_offset
    if first_qp is not None:
        return first_qp + (I_FRAME_QP_OFFSET if first_type == "I" else 0.0)
    return None


def crf_on_scale(codec: str, crf: float) -> float:
    """A CRF on the x264 scale as ``codec`` reads it (x265's sits ``X265_CRF_OFFSET`` above)."""
    return crf + X265_CRF_OFFSET if codec == "libx265" else crf


def default_crf(codec: str, info: SequenceInfo, first_qp: float | None, first_type: str) -> float:
    """The writer's fallback CRF when the caller gives none (see CRF_MARGIN above)."""
    quality = input_level(info, first_qp, first_type)
    crf = FALLBACK_CRF if quality is None else quality - CRF_MARGIN
    crf = min(max(crf, CRF_FLOOR), CRF_CEIL)
    return round(crf_on_scale(codec, crf), 1)


def splice_problem(
    scan: GopScan, copy: list[bool], codec: str, pix_fmt: str, info: SequenceInfo
) -> str | None:
    """Why the GOPs marked in ``copy`` cannot be copied into this output, or None."""
    if len(copy) != len(scan.segments):
        return "the copy plan does not match the GOP scan"
    if scan.copyable:
        return scan.copyable
    if all(copy):
        return None
    if scan.mixable:
        return scan.mixable
    if FAMILY_ENCODER.get(scan.codec) != codec or codec != "libx264":
        return f"re-encoded GOPs must use the input's codec ({scan.codec}), not {codec}"
    if pix_fmt != info.pix_fmt or _canonical_yuv(info.source_pix_fmt or info.pix_fmt) != pix_fmt:
        return f"re-encoded GOPs must keep the input's pixel format, not {pix_fmt}"
    return None


@dataclass(frozen=True)
class OutputPlan:
    """How the video is written, negotiated once before frames flow; the writer takes it
    as data and decides nothing again.

    ``negotiate`` picks the encoder for the container and the pixel format it keeps;
    ``with_crf`` sets the rate; ``with_copy`` marks the source's GOPs (``splice``) that
    are copied as they are (``copy[k]``).
    """

    format: str  # the FFmpeg muxer
    codec: str  # the encoder (``wrapped_avframe`` for raw pictures)
    pix_fmt: str
    crf: float | None = None  # None: lossless, or the writer's default_crf
    preset: str = "medium"
    notes: tuple[str, ...] = ()  # for the user: codec fallbacks, what could not be copied
    splice: GopScan | None = None
    copy: tuple[bool, ...] = ()

    @classmethod
    def negotiate(
        cls,
        info: SequenceInfo,
        fmt: str,
        codec: str = "auto",
        preset: str = "medium",
        bits: int | None = None,
    ) -> OutputPlan:
        """The encoder (``choose_codec``) and pixel format for ``info`` in container ``fmt``;
        ``bits``: at least that depth (10: an 8-bit source is written 10-bit, samples << 2)."""
        chosen, notes = choose_codec(codec, info, fmt)
        if preset not in PRESETS:
            raise UnsupportedOutput(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        pix_fmt = output_pix_fmt(info, chosen)
        if bits is not None and fmt not in RAW_FORMATS:
            pix_fmt = deeper_pix_fmt(pix_fmt, bits, chosen)
        return cls(fmt, chosen, pix_fmt, preset=preset, notes=tuple(notes))

    @property
    def lossless(self) -> bool:
        return self.codec in LOSSLESS

    def with_crf(self, crf: float | None) -> OutputPlan:
        if crf is not None and self.lossless:
            raise UnsupportedOutput(f"--crf does not apply to {self.codec} (lossless)")
        if crf is not None and not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
            raise UnsupportedOutput(f"crf must be within {CRF_RANGE[0]}..{CRF_RANGE[1]}, not {crf}")
        return replace(self, crf=crf)

    def with_notes(self, notes: Sequence[str]) -> OutputPlan:
        return replace(self, notes=(*self.notes, *notes))

    def splice_problem(self, scan: GopScan, copy: Sequence[bool], info: SequenceInfo) -> str | None:
        """Why the GOPs marked in ``copy`` cannot be copied into this output, or None."""
        return splice_problem(scan, list(copy), self.codec, self.pix_fmt, info)

    def with_copy(self, scan: GopScan | None, copy: Sequence[bool] | None) -> OutputPlan:
        """Segment k of ``scan`` copied from the source where ``copy[k]`` (checked by the caller
        with ``splice_problem``)."""
        return replace(self, splice=scan, copy=tuple(copy or ()))

    @property
    def copies(self) -> bool:
        """Some GOPs are copied: the output video stream is a copy with GOPs spliced in."""
        return self.splice is not None and any(self.copy)

    @property
    def copy_all(self) -> bool:
        """Every GOP is copied: a remux, nothing is encoded."""
        return self.copies and all(self.copy)


# -------------------------------------------------------------------- frames


def frame_from_planes(planes: tuple[np.ndarray, ...], pix_fmt: str) -> av.VideoFrame:
    """A new ``av.VideoFrame`` of ``pix_fmt`` filled from numpy planes (visible size).

    Each plane is copied row by row into PyAV's buffer, which may be wider
    than the picture (line size padding). 16-bit samples are little-endian.
    """
    height, width = planes[0].shape[:2]
    frame = av.VideoFrame(width, height, pix_fmt)
    for plane, data in zip(frame.planes, planes, strict=False):
        dtype = np.dtype("<u2") if data.dtype.itemsize == 2 else np.dtype(np.uint8)
        if data.shape != (plane.height, plane.width):
            raise ValueError(
                f"plane of shape {data.shape} does not fit {pix_fmt} {plane.width}x{plane.height}"
            )
        row = plane.line_size // dtype.itemsize
        dst = np.frombuffer(plane, dtype=dtype, count=row * plane.height).reshape(plane.height, row)
        dst[:, : plane.width] = data
    return frame


def _display_matrix(av_frame: Any) -> list[int] | None:
    """The 9 int32 of the frame's DISPLAYMATRIX side data (rotation and flips), if any."""
    if av_frame is None:
        return None
    for sd in side_data(av_frame):
        if sd.type.name == "DISPLAYMATRIX":
            raw = bytes(sd)
            if len(raw) == 36:
                return list(struct.unpack("<9i", raw))
    return None


def _copy_metadata(src: dict[str, str], stale: frozenset[str]) -> dict[str, str]:
    """Tags worth copying; MP4's track name reads back as ``name`` but is written from ``title``."""
    tags = {
        k: v
        for k, v in src.items()
        if k.lower() not in stale and not k.lower().startswith("_statistics")
    }
    if "name" in tags and "title" not in tags:
        tags["title"] = tags.pop("name")
    return tags


# ------------------------------------------------------------------ remuxing

REGENERATED = "regenerated by the muxer"


def _cannot_copy(stream: Any, fmt: str) -> str | None:
    """Why ``stream`` cannot be copied into a ``fmt`` container, or None if it can."""
    ctx = stream.codec_context
    if ctx is not None:
        return None if ctx.name in muxer_codecs(fmt) else f"{fmt} cannot hold {ctx.name}"
    if stream.type == "attachment":
        return None if fmt == "matroska" else "attachments only fit in Matroska"
    if "timecode" in stream.metadata and fmt in ("mp4", "mov"):
        return REGENERATED  # a QuickTime tmcd track, rebuilt from the video's timecode tag
    return None if _header_accepts(stream, fmt) else f"{fmt} cannot hold this data stream"


def _header_accepts(stream: Any, fmt: str) -> bool:
    """Whether a ``fmt`` muxer writes a header with a copy of this codec-less stream."""
    try:
        with av.open(io.BytesIO(), "w", format=fmt) as trial:
            trial.add_stream_from_template(stream)
            trial.start_encoding()
    except (ValueError, av.error.FFmpegError):
        return False
    return True


class StreamCopier:
    """Copies every stream but the enhanced video from a second demuxer of the source.

    :meth:`pump` muxes the packets up to a time so that the output stays
    interleaved while the video is written; memory holds one packet.
    """

    def __init__(self, source: Any, video_index: int, options: dict[str, str] | None) -> None:
        self.video_index = video_index
        self.dropped: list[str] = []
        self._map: dict[int, Any] = {}
        self._pending: Any = None
        self._packets: Iterator[Any] | None = None
        try:
            self.container = av.open(source, mode="r", options=options or {})
        except (OSError, av.error.FFmpegError) as exc:
            raise UnsupportedInput(f"cannot reopen {source} to copy its streams: {exc}") from None
        self.streams = [s for s in self.container.streams if s.index != video_index]

    @property
    def video_stream(self) -> Any:
        return self.container.streams[self.video_index]

    def add_to(self, out: Any) -> None:
        """Create the copied streams in ``out`` (before its header is written)."""
        fmt = out.format.name
        for stream in self.streams:
            reason = _cannot_copy(stream, fmt)
            if reason == REGENERATED:
                continue
            if reason is None:
                try:
                    copy = out.add_stream_from_template(stream)
                except (ValueError, av.error.FFmpegError) as exc:
                    reason = str(exc)
            if reason is not None:
                self.dropped.append(f"stream {stream.index} ({stream.type}) not copied: {reason}")
                continue
            copy.metadata.update(_copy_metadata(stream.metadata, STALE_KEYS))
            copy.disposition = stream.disposition
            self._map[stream.index] = copy
        if self._map:
            self._packets = self.container.demux(*[s for s in self.streams if s.index in self._map])

    def pump(self, until: Fraction | None, *, drop_after: bool = False) -> None:
        """Mux packets whose time is at most ``until`` seconds (all when None).

        With ``drop_after`` the packets past ``until`` are discarded (the
        video was cut short with max_frames).
        """
        while self._packets is not None:
            packet = self._pending or next(self._packets, None)
            self._pending = None
            if packet is None:
                self._packets = None
                break
            if not packet.size:  # end-of-stream marker of the demuxer
                continue
            stamp = packet.dts if packet.dts is not None else packet.pts
            if until is not None and stamp is not None and stamp * packet.time_base > until:
                if drop_after:
                    continue
                self._pending = packet
                break
            out = self._map[packet.stream.index]
            packet.stream = out
            out.container.mux_one(packet)

    def close(self) -> None:
        self._packets = None
        self._pending = None
        self.container.close()


# ----------------------------------------------------------------- YUV4MPEG2

# The C tag (and FFmpeg's XYSCSS twin) of each pixel format the reader delivers; 4:2:0 8-bit
# as FFmpeg's muxer writes it for an unknown chroma siting. Deeper formats are FFmpeg's
# unofficial extension, which x264, x265 and SvtAv1EncApp read.
Y4M_COLORSPACES = {
    "yuv420p": "C420jpeg XYSCSS=420JPEG",
    "yuv420p10le": "C420p10 XYSCSS=420P10",
}
Y4M_RANGES = {1: "LIMITED", 2: "FULL"}  # AVCOL_RANGE_MPEG / _JPEG


def y4m_header(
    width: int,
    height: int,
    rate: Fraction,
    pix_fmt: str,
    sample_aspect_ratio: Fraction | None = None,
    color_range: int | None = None,
) -> bytes:
    """The stream header line: ``YUV4MPEG2 W.. H.. F.. Ip A.. C.. [XCOLORRANGE=..]``.

    Written here, not by FFmpeg's yuv4mpegpipe muxer, which takes the aspect ratio from
    the AVStream (PyAV sets only the codec's) and so always wrote ``A0:0`` (unknown).
    """
    try:
        colorspace = Y4M_COLORSPACES[pix_fmt]
    except KeyError:
        raise UnsupportedOutput(f"YUV4MPEG2 output cannot hold {pix_fmt}") from None
    sar = Fraction(sample_aspect_ratio) if sample_aspect_ratio else None
    aspect = f"{sar.numerator}:{sar.denominator}" if sar else "0:0"
    rate = Fraction(rate).limit_denominator((1 << 31) - 1)
    tags = [f"W{width}", f"H{height}", f"F{rate.numerator}:{rate.denominator}", "Ip",
            f"A{aspect}", colorspace]  # fmt: skip
    if color_range in Y4M_RANGES:
        tags.append(f"XCOLORRANGE={Y4M_RANGES[color_range]}")
    return ("YUV4MPEG2 " + " ".join(tags) + "\n").encode("ascii")


class Y4mMuxer:
    """Writes YUV4MPEG2: the header line, then ``FRAME`` and the planes of each frame
    (rows without padding; 16-bit samples little-endian)."""

    def __init__(self, target: str | IO[bytes]) -> None:
        self._own = isinstance(target, str)
        self._file: IO[bytes] | None = open(target, "wb") if isinstance(target, str) else target  # noqa: SIM115
        self.started = False

    def start(self, header: bytes) -> None:
        assert self._file is not None
        self._file.write(header)
        self.started = True

    def write(self, planes: Sequence[np.ndarray]) -> None:
        assert self._file is not None
        self._file.write(b"FRAME\n")
        for plane in planes:
            dtype = np.dtype("<u2") if plane.dtype.itemsize == 2 else np.dtype(np.uint8)
            self._file.write(np.ascontiguousarray(plane, dtype=dtype).data)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        if self._own:
            f.close()
        else:
            f.flush()


# -------------------------------------------------------------------- writer


class VideoWriter:
    """Encodes DecodedFrames to OUTPUT and copies the source's other streams.

    ``plan`` (an :class:`OutputPlan`) says how the video is written; without one it is
    negotiated here from ``codec``, ``crf``, ``preset``, ``format``, ``splice`` and ``copy``.
    The encoder is configured on the first :meth:`write` (its QP helps pick
    the default CRF). Call :meth:`close` to flush, or use it as a context
    manager: leaving with an exception calls :meth:`abort` instead.
    """

    def __init__(
        self,
        output: str | Path | IO[bytes],
        info: SequenceInfo,
        *,
        codec: str = "auto",
        crf: float | None = None,
        preset: str = "medium",
        source: Any = None,
        source_options: dict[str, str] | None = None,
        format: str | None = None,
        splice: GopScan | None = None,
        copy: list[bool] | None = None,
        plan: OutputPlan | None = None,
    ) -> None:
        if plan is None:  # a library caller's keywords: negotiated here
            fmt = format or output_format(output if isinstance(output, str | Path) else "-")
            plan = OutputPlan.negotiate(info, fmt, codec, preset).with_crf(crf)
            if copy and any(copy):
                problem = plan.splice_problem(splice, copy, info) if splice else None
                if problem:
                    raise UnsupportedOutput(problem)
            plan = plan.with_copy(splice, copy)
        self.plan = plan
        self.info = info
        self.format, self.codec, self.pix_fmt = plan.format, plan.codec, plan.pix_fmt
        self.crf, self.preset = plan.crf, plan.preset
        self.warnings = list(plan.notes)
        self.frames = 0
        self.missing_pts = 0  # frames without pts (all of them for raw Annex-B input)
        self.reordered_pts = 0  # frames whose pts did not increase
        self._stream: Any = None
        self._last_pts: int | None = None
        self._end: Fraction | None = None
        self._copier = StreamCopier(source, info.stream_index, source_options) if source else None
        if self._copier is not None and self.format in RAW_FORMATS:
            if self._copier.streams:  # said once: the frames go out, the rest cannot
                kinds = sorted({s.type for s in self._copier.streams})
                self.warnings.append(
                    f"{self.format} holds the video only: the input's {', '.join(kinds)} "
                    "stream(s) are not written"
                )
            self._copier.close()
            self._copier = None
        self._source, self._source_options = source, source_options
        # Smart rendering: segment k of ``splice`` is copied from the source when copy[k].
        self._splice = plan.splice if plan.copies else None
        self._copy = list(plan.copy)
        self.gops = len(plan.splice.segments) if plan.splice else 0
        self.gops_copied = 0
        self._segment = -1
        self._encoder: Any = None
        self._sps_id = 0
        self._packets: Iterator[Any] | None = None
        self._packet_index = 0
        self._last_dts: int | None = None
        self._out_tb: Fraction | None = None
        if self._splice is not None and self._copier is None:
            raise UnsupportedOutput("copying GOPs needs the source")
        target = sys.stdout.buffer if str(output) == STDOUT else output
        if isinstance(target, Path):
            target = str(target)
        self._y4m: Y4mMuxer | None = None
        try:
            if self.format in RAW_FORMATS:
                self._y4m = Y4mMuxer(target)
                self._out = self._y4m
            else:
                self._out = av.open(target, mode="w", format=self.format)
        except (OSError, av.error.FFmpegError) as exc:
            if self._copier:
                self._copier.close()
            raise UnsupportedOutput(f"cannot write {output}: {exc}") from None

    # -- setup ---------------------------------------------------------------

    @property
    def time_base(self) -> Fraction:
        info = self.info
        if self.format in RAW_FORMATS and info.frame_rate:
            # YUV4MPEG2 states one frame rate, read from the time base: a frame a tick.
            return 1 / Fraction(info.frame_rate)
        if info.time_base:
            return Fraction(info.time_base)
        return 1 / Fraction(info.frame_rate) if info.frame_rate else Fraction(1, 25)

    def _start(self, first: DecodedFrame) -> None:
        if self._splice is not None:
            self._start_spliced(first)
            return
        info, out = self.info, self._out
        if self._y4m is not None:
            self._y4m.start(
                y4m_header(info.width, info.height, 1 / self.time_base, self.pix_fmt,
                           info.sample_aspect_ratio, info.color_range)
            )  # fmt: skip
            self._stream = self._y4m
            return
        if self.crf is None and self.codec not in LOSSLESS:
            self.crf = default_crf(self.codec, info, first.side.qp, first.side.pict_type)
        stream = out.add_stream(self.codec, rate=info.frame_rate or None)
        stream.width, stream.height = info.width, info.height
        stream.pix_fmt = self.pix_fmt
        stream.time_base = self.time_base
        ctx = stream.codec_context
        ctx.time_base = self.time_base
        if info.frame_rate:
            ctx.framerate = info.frame_rate
        for attr in ("color_primaries", "color_trc", "colorspace", "color_range"):
            value = getattr(info, attr)
            if value:  # 0 / None: unspecified
                setattr(ctx, attr, value)
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        stream.options = self._encoder_options()
        matrix = _display_matrix(first.av_frame)
        if matrix is not None:
            stream.set_display_matrix(matrix)
        elif info.rotation:
            stream.set_display_rotation(info.rotation)
        if self._copier is not None:
            src = self._copier.video_stream
            stream.metadata.update(_copy_metadata(src.metadata, STALE_VIDEO_KEYS))
            stream.disposition = src.disposition
            out.metadata.update(_copy_metadata(self._copier.container.metadata, STALE_KEYS))
            self._copier.add_to(out)
            self.warnings.extend(self._copier.dropped)
        self._stream = stream

    # -- smart rendering -----------------------------------------------------

    def _start_spliced(self, first: DecodedFrame | None) -> None:
        """The output video stream is a copy of the source's; re-encoded GOPs are spliced in."""
        assert self._splice is not None and self._copier is not None
        scan, out = self._splice, self._out
        src = self._copier.video_stream
        stream = out.add_stream_from_template(src)
        stream.metadata.update(_copy_metadata(src.metadata, STALE_VIDEO_KEYS))
        stream.disposition = src.disposition
        matrix = _display_matrix(first.av_frame if first is not None else None)
        if matrix is not None:
            stream.set_display_matrix(matrix)
        if not all(self._copy):
            # Both encoders' parameter sets out of band, under different ids (see bitstream.splice).
            avcc = Avcc.parse(scan.extradata)
            used = avcc.ids()
            self._sps_id = min(i for i in range(32) if i not in used)
            units = annexb_nal_units(self._new_encoder(global_header=True).extradata or b"")
            sps = [u for u in units if u and u[0] & 31 == 7]
            pps = [u for u in units if u and u[0] & 31 == 8]
            if not sps or not pps:
                raise BitstreamError("the encoder gave no parameter sets to splice with")
            stream.codec_context.extradata = avcc.merged(sps, pps).to_bytes()
        out.metadata.update(_copy_metadata(self._copier.container.metadata, STALE_KEYS))
        self._copier.add_to(out)
        self.warnings.extend(self._copier.dropped)
        self._stream = stream
        self._reader = av.open(self._source, options=self._source_options or {})
        self._packets = (
            p for p in self._reader.demux(self._reader.streams[self.info.stream_index]) if p.size
        )
        out.start_encoding()
        self._out_tb = Fraction(stream.time_base)

    def _new_encoder(self, *, global_header: bool = False) -> Any:
        """A fresh encoder for one re-encoded segment: it starts with an IDR and ends closed."""
        info = self.info
        ctx = av.CodecContext.create(self.codec, "w")
        ctx.width, ctx.height = info.width, info.height
        ctx.pix_fmt = self.pix_fmt
        ctx.time_base = self._splice.time_base if self._splice else self.time_base
        if info.frame_rate:
            ctx.framerate = info.frame_rate
        for attr in ("color_primaries", "color_trc", "colorspace", "color_range"):
            value = getattr(info, attr)
            if value:
                setattr(ctx, attr, value)
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        opts = self._encoder_options()
        opts["x264-params"] = f"sps-id={self._sps_id}"
        ctx.options = opts
        if global_header:
            ctx.flags |= av.codec.context.Flags.global_header
        ctx.open()
        return ctx

    def _enter_segment(self, k: int) -> None:
        """Finish the current segment and every skipped one, then start segment ``k``."""
        while self._segment < k:
            self._finish_segment()
            self._segment += 1
            if self._copy[self._segment]:
                self._mux_copied(self._splice.segments[self._segment])  # type: ignore[union-attr]
                self.gops_copied += 1
            elif self._segment == k:
                self._encoder = self._new_encoder()

    def _finish_segment(self) -> None:
        if self._encoder is not None:
            self._mux_encoded(self._encoder.encode(None))
            self._encoder = None

    def _mux_copied(self, segment: Any) -> None:
        assert self._packets is not None
        while self._packet_index < segment.end:
            packet = next(self._packets, None)
            if packet is None:
                break
            index, self._packet_index = self._packet_index, self._packet_index + 1
            if index >= segment.first:
                self._mux_video(packet)
        if self._copier is not None and self._splice is not None:
            nxt = self._segment + 1
            if nxt < len(self._splice.segments):
                self._copier.pump(self._splice.segments[nxt].start_pts * self._splice.time_base)

    def _mux_encoded(self, packets: list[Any]) -> None:
        """x264's Annex-B packets, length-prefixed like the copied ones (avcC, 4 bytes)."""
        for packet in packets:
            data = length_prefixed(annexb_nal_units(bytes(packet)))
            copy = av.Packet(data)
            copy.pts, copy.dts, copy.duration = packet.pts, packet.dts, packet.duration
            copy.time_base = self._splice.time_base  # type: ignore[union-attr]
            copy.is_keyframe = packet.is_keyframe
            self._mux_video(copy)

    def _mux_video(self, packet: Any) -> None:
        """Mux one video packet in the output time base; decode times kept increasing."""
        packet.stream = self._stream
        src_tb, dst_tb = Fraction(packet.time_base), self._out_tb
        if src_tb != dst_tb:
            for attr in ("pts", "dts", "duration"):
                value = getattr(packet, attr)
                if value is not None:  # av_rescale_q: round to nearest
                    setattr(packet, attr, int(Fraction(value) * src_tb / dst_tb + Fraction(1, 2)))
            packet.time_base = dst_tb
        if self._last_dts is not None and packet.dts is not None and packet.dts <= self._last_dts:
            packet.dts = self._last_dts + 1  # at a splice: the two GOPs' reorder delays differ
            if packet.pts is not None and packet.dts > packet.pts:
                raise BitstreamError("cannot splice the GOPs: decode times overtake display times")
        if packet.dts is not None:
            self._last_dts = packet.dts
        self._out.mux_one(packet)

    def _write_spliced(self, frame: DecodedFrame) -> None:
        scan = self._splice
        assert scan is not None
        src = frame.av_frame
        pts = src.pts if src is not None else frame.side.pts
        self._enter_segment(max(self._segment, scan.segment_of(pts)))
        if self._encoder is not None:
            av_frame = frame_from_planes(frame.planes, self.info.pix_fmt)
            if self.pix_fmt != self.info.pix_fmt:
                av_frame = av_frame.reformat(format=self.pix_fmt)
            av_frame.pts = pts
            av_frame.time_base = scan.time_base
            self._mux_encoded(self._encoder.encode(av_frame))
        self.frames += 1
        now = Fraction(pts) * scan.time_base if pts is not None else Fraction(0)
        if self._copier is not None:
            self._copier.pump(now)

    def copy_video(self) -> None:
        """Nothing is enhanced: copy every video packet as it is (a remux), then finish."""
        if self._splice is None or not all(self._copy):
            raise BitstreamError("copy_video needs a scan whose every GOP is copied")
        self._start_spliced(None)
        self._enter_segment(len(self._copy) - 1)
        self.frames = self._packet_index

    def _encoder_options(self) -> dict[str, str]:
        if self.codec == "ffv1":
            return {"level": "3", "slicecrc": "1"}
        opts = {"crf": f"{self.crf:g}", "preset": self.preset}
        if self.codec == "libx265":
            opts["x265-params"] = "log-level=error"
        return opts

    # -- frames --------------------------------------------------------------

    def _pts(self, frame: DecodedFrame) -> int:
        """The frame's pts in the output time base; synthesized when missing or not increasing."""
        src = frame.av_frame
        pts = src.pts if src is not None else frame.side.pts
        tb = (src.time_base if src is not None else frame.side.time_base) or self.time_base
        if pts is not None and Fraction(tb) != self.time_base:
            pts = round(pts * Fraction(tb) / self.time_base)
        if pts is None:
            self.missing_pts += 1
        elif self._last_pts is not None and pts <= self._last_pts:
            self.reordered_pts += 1
            pts = None
        if pts is None:
            step = 1
            if self.info.frame_rate:
                step = max(1, round(1 / (Fraction(self.info.frame_rate) * self.time_base)))
            pts = 0 if self._last_pts is None else self._last_pts + step
        self._last_pts = pts
        return pts

    def _timestamp_warning(self) -> str | None:
        """A note when timestamps had to be repaired (none at all is normal for raw streams)."""
        repaired = self.reordered_pts + (self.missing_pts if self.missing_pts < self.frames else 0)
        if not repaired:
            return None
        return f"{repaired} frame(s) had a missing or non-increasing pts; spaced at the frame rate"

    def write(self, frame: DecodedFrame) -> None:
        """Encode one frame (display order) and copy the other streams up to its time."""
        if self._stream is None:
            self._start(frame)
        if self._splice is not None:
            self._write_spliced(frame)
            return
        if self._y4m is not None:  # raw pictures carry no display matrix: as decoded
            self._y4m.write(frame.planes)
            self.frames += 1
            return
        av_frame = frame_from_planes(frame.planes, self.info.pix_fmt)
        if self.pix_fmt != self.info.pix_fmt:
            av_frame = av_frame.reformat(format=self.pix_fmt)
        av_frame.pts = self._pts(frame)
        av_frame.time_base = self.time_base
        src = frame.av_frame
        if src is not None and src.duration and src.time_base == self.time_base:
            av_frame.duration = src.duration  # keeps the last frame's length in VFR
        self._mux(self._stream.encode(av_frame))
        self.frames += 1
        now = av_frame.pts * self.time_base
        duration = 1 / Fraction(self.info.frame_rate) if self.info.frame_rate else Fraction(0)
        self._end = now + duration
        if self._copier is not None:
            self._copier.pump(now)

    def _mux(self, packets: list[Any]) -> None:
        for packet in packets:
            self._out.mux_one(packet)

    def close(self, *, truncated: bool = False) -> None:
        """Flush the encoder, copy the remaining packets and finish the file.

        ``truncated``: the video was cut short, so the other streams stop at
        the end of the last frame too.
        """
        if self._out is None:
            return
        try:
            if self._stream is None:
                raise BitstreamError("no frame was written")
            if self._splice is not None:
                self._enter_segment(len(self._copy) - 1)
                self._finish_segment()
            elif self._y4m is None:
                self._mux(self._stream.encode(None))
            note = self._timestamp_warning()
            if note:
                self.warnings.append(note)
            if self._copier is not None:
                self._copier.pump(self._end if truncated else None, drop_after=truncated)
            self._out.close()
        finally:
            self._out = None
            if self._copier is not None:
                self._copier.close()
            self._close_reader()

    def _close_reader(self) -> None:
        reader, self._reader = getattr(self, "_reader", None), None
        self._packets = None
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def abort(self) -> None:
        """Close everything without finishing the file (the caller deletes it)."""
        out, self._out = self._out, None
        for closer in (out, self._copier):
            if closer is not None:
                with contextlib.suppress(Exception):  # already failing: keep the first error
                    closer.close()
        self._close_reader()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
