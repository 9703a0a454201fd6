"""Containers and codecs: demuxing, decoding with side information, parsing, encoding.

This package never imports torch: everything here is PyAV + numpy.
"""

from bitstream.types import (
    PARTITION_CODES,
    BitstreamError,
    CorruptStream,
    DecodedFrame,
    FrameSideInfo,
    RateControl,
    SequenceInfo,
    UnsupportedInput,
)

__all__ = [
    "PARTITION_CODES",
    "BitstreamError",
    "CorruptStream",
    "DecodedFrame",
    "FrameSideInfo",
    "RateControl",
    "SequenceInfo",
    "UnsupportedInput",
]
