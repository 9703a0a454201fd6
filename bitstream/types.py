"""The side-information contract shared by every layer: one shape for every codec.

Grids: the QP map and partition map are per 16x16 macroblock
(ceil(H/16) x ceil(W/16)); the motion field is per 8x8 block
(ceil(H/8) x ceil(W/8)). Motion vectors are in luma pixels and point from the
current frame into the reference: a pixel at (x, y) of the current frame
predicts from (x + dx, y + dy) of the reference (FFmpeg's src - dst).

Each item's provenance is one of ``bitstream`` (decoded side data),
``header`` (parsed from NAL headers/SEI), ``estimated`` (predicted from
pixels) or ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from bitstream.errors import BitstreamError, CorruptStream, UnsupportedInput  # noqa: F401 - re-exported

SOURCES = ("bitstream", "header", "estimated", "none")

# Partition map codes (uint8), per 16x16 macroblock.
PARTITION_CODES: dict[str, int] = {
    "unknown": 0,
    "intra": 1,
    "16x16": 2,
    "16x8": 3,
    "8x16": 4,
    "8x8": 5,
}

QP_BLOCK = 16
MV_BLOCK = 8


@dataclass
class RateControl:
    """Rate-control settings parsed from the encoder's options SEI (x264/x265)."""

    mode: str | None = None  # "crf" | "cqp" | "abr" | "cbr" | "2pass" | None
    crf: float | None = None
    qp: float | None = None
    bitrate: float | None = None  # kbit/s
    options: dict[str, str] = field(default_factory=dict)  # every key=value of the SEI


@dataclass
class SequenceInfo:
    """What is known about the whole video stream before (or while) decoding it."""

    codec: str  # FFmpeg codec name: "h264", "hevc", "vp9", ...
    profile: str | None
    width: int  # after cropping
    height: int
    pix_fmt: str  # e.g. "yuv420p", "yuv420p10le"; 10-bit stays 10-bit
    bit_depth: int
    frame_rate: Fraction | None
    time_base: Fraction | None
    color_primaries: int | None = None  # FFmpeg enum values
    color_trc: int | None = None
    colorspace: int | None = None
    color_range: int | None = None
    rotation: float = 0.0  # degrees, from the display matrix
    sample_aspect_ratio: Fraction | None = None
    frames: int | None = None  # when the container knows it
    encoder: str | None = None  # "x264", "x265", ... from the options SEI
    rate_control: RateControl = field(default_factory=RateControl)
    stream_index: int = 0
    source_pix_fmt: str | None = None  # as decoded, before any conversion to pix_fmt

    @property
    def sequence_qp(self) -> float | None:
        """The CRF (or constant QP) that best describes the whole sequence, if known."""
        rc = self.rate_control
        return rc.crf if rc.crf is not None else rc.qp


@dataclass
class FrameSideInfo:
    """Everything the bitstream says about one frame, on fixed grids."""

    index: int  # display order, from 0
    pts: int | None
    time_base: Fraction | None
    pict_type: str  # "I", "P", "B" or "?"
    qp: float | None  # frame (or mean slice) QP
    qp_map: np.ndarray | None = None  # float32 (ceil(H/16), ceil(W/16))
    mv_past: np.ndarray | None = None  # float32 (ceil(H/8), ceil(W/8), 2): dx, dy
    mv_past_valid: np.ndarray | None = None  # bool (ceil(H/8), ceil(W/8))
    mv_future: np.ndarray | None = None
    mv_future_valid: np.ndarray | None = None
    intra: np.ndarray | None = None  # bool (ceil(H/8), ceil(W/8)): intra-coded blocks
    partition: np.ndarray | None = None  # uint8 (ceil(H/16), ceil(W/16)), PARTITION_CODES
    mv_count: int = 0
    # The codec's own quantiser when it is not on the H.264/HEVC QP scale
    # (VP9 base_q_idx 0..255, MPEG-2/4 qscale); equals ``qp`` for H.264/HEVC.
    qp_native: float | None = None
    sources: dict[str, str] = field(
        default_factory=lambda: {
            "pict_type": "none",
            "qp": "none",
            "qp_map": "none",
            "motion_vectors": "none",
            "partitions": "none",
        }
    )

    @property
    def intra_fraction(self) -> float:
        if self.intra is None:
            return 1.0 if self.pict_type == "I" else 0.0
        return float(self.intra.mean()) if self.intra.size else 0.0


@dataclass
class DecodedFrame:
    """One decoded picture in display order with its side information.

    ``planes`` are (Y, U, V) numpy arrays, uint8 for 8-bit and uint16 for
    deeper formats, cropped to the visible size. ``av_frame`` is the PyAV
    frame (timestamps, colour tags) for the writer; it may be None.
    """

    planes: tuple[np.ndarray, np.ndarray, np.ndarray]
    side: FrameSideInfo
    av_frame: Any = None

    @property
    def index(self) -> int:
        return self.side.index

    @property
    def pts(self) -> int | None:
        """The decoder's pts (input time base), else the side info's."""
        src = self.av_frame
        return src.pts if src is not None and src.pts is not None else self.side.pts
