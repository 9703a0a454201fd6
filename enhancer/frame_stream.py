"""Enhanced frames in Python: ``enhancer.frames(input)`` yields them in display order.

    import enhancer

    with enhancer.frames("in.mp4", {"side_info": "auto"}) as video:
        for frame in video:
            frame.y, frame.u, frame.v      # numpy planes (uint8, uint16 above 8 bits)
            frame.to_rgb()                 # H x W x 3 uint8, the stream's matrix
            frame.to_tensor()              # 3 x H x W float YUV on the model's device
            frame.side.mv_past, frame.side.qp_map   # the bitstream's side information

It streams: the decoder and the model run in the calling thread as frames are
pulled, so memory does not grow with the video's length, and closing the
iterator early (``close()``, leaving the ``with`` block, or dropping it) closes
the decoder. The frames are the ones ``vqe enhance --codec ffv1`` writes, bit
for bit, with the same options, threads and precision. Errors are the
library's one-line ``VqeError`` subclasses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from bitstream.reader import open_video
from bitstream.types import DecodedFrame, FrameSideInfo, SequenceInfo
from enhancer.options import EnhanceOptions, parse_options

__all__ = ["EnhancedFrame", "FrameStream", "frames"]

# FFmpeg's AVColorSpace values whose matrix is BT.709 / BT.2020; others read as BT.601.
_BT709, _BT2020 = (1,), (9, 10)
_KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}


@dataclass
class EnhancedFrame:
    """One enhanced picture, in display order, with what the stream said about it."""

    index: int
    pts: int | None  # in the stream's time base
    time: float | None  # seconds
    pict_type: str  # I, P, B or ? (from the stream)
    qp: float | None  # the frame QP the model was told (estimated on the blind path)
    stages: int  # stages the network ran (0: the decoded picture as it was)
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    side: FrameSideInfo  # motion vectors, QP map, partitions, their sources
    bit_depth: int = 8
    info: SequenceInfo | None = field(default=None, repr=False)
    device: Any = field(default=None, repr=False)

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.y, self.u, self.v

    def _matrix(self) -> str:
        space = self.info.colorspace if self.info is not None else None
        if space in _BT709:
            return "bt709"
        if space in _BT2020:
            return "bt2020"
        return "bt601"

    def _full_range(self) -> bool:
        return self.info is not None and self.info.color_range == 2

    def to_tensor(self, format: str = "yuv") -> Any:  # noqa: A002 - the word users expect
        """3 x H x W float32 in [0, 1] on the model's device: ``yuv`` (chroma repeated to
        full size) or ``rgb`` (the stream's matrix and range)."""
        import torch

        maxv = float((1 << self.bit_depth) - 1)
        dev = self.device or "cpu"
        y = torch.from_numpy(self.y.astype(np.float32)).to(dev) / maxv
        h, w = y.shape
        chroma = [
            torch.from_numpy(c.astype(np.float32)).to(dev).repeat_interleave(2, 0)
            .repeat_interleave(2, 1)[:h, :w] / maxv
            for c in (self.u, self.v)
        ]  # fmt: skip
        if format == "yuv":
            return torch.stack([y, *chroma])
        if format != "rgb":
            raise ValueError(f"format must be yuv or rgb, not {format!r}")
        if not self._full_range():  # limited range: Y 16-235, C 16-240 (8-bit scale)
            y = (y - 16 / 255) * (255 / 219)
            chroma = [(c - 128 / 255) * (255 / 224) for c in chroma]
        else:
            chroma = [c - 128 / 255 for c in chroma]
        kr, kb = _KR_KB[self._matrix()]
        kg = 1.0 - kr - kb
        cb, cr = chroma
        r = y + 2 * (1 - kr) * cr
        b = y + 2 * (1 - kb) * cb
        g = (y - kr * r - kb * b) / kg
        return torch.stack([r, g, b]).clamp(0.0, 1.0)

    def to_rgb(self) -> np.ndarray:
        """H x W x 3 uint8 RGB (the stream's matrix and range)."""
        rgb = self.to_tensor("rgb").mul(255.0).round().to("cpu").numpy()
        return np.ascontiguousarray(rgb.transpose(1, 2, 0)).astype(np.uint8)


class FrameStream:
    """The iterator ``frames`` returns; a context manager that closes the decoder."""

    def __init__(self, source: Any, options: EnhanceOptions, engine: Any) -> None:
        self.options = options
        self.engine = engine
        self._reader = open_video(source, side_info=options.side_info != "blind")
        self.info: SequenceInfo = self._reader.info
        self._frames = self._run()

    def _decoded(self) -> Iterator[DecodedFrame]:
        for i, frame in enumerate(self._reader):
            if self.options.max_frames is not None and i >= self.options.max_frames:
                return
            yield frame

    def _run(self) -> Iterator[EnhancedFrame]:
        opts, info = self.options, self.info
        depth = info.bit_depth or 8
        device = getattr(self.engine, "device", None)
        out = self.engine.process(self._decoded(), info, opts.stages, opts.side_info)
        try:
            for frame, report in out:
                src, pts = frame.av_frame, frame.pts
                base = src.time_base if src is not None and src.time_base else None
                seconds = float(pts * Fraction(base)) if pts is not None and base else None
                yield EnhancedFrame(
                    index=frame.index,
                    pts=pts,
                    time=seconds,
                    pict_type=frame.side.pict_type,
                    qp=report.qp,
                    stages=int(report.stages),
                    y=frame.planes[0],
                    u=frame.planes[1],
                    v=frame.planes[2],
                    side=frame.side,
                    bit_depth=depth,
                    info=info,
                    device=device,
                )
        finally:
            out.close()
            self._reader.close()

    def __iter__(self) -> FrameStream:
        return self

    def __next__(self) -> EnhancedFrame:
        return next(self._frames)

    def close(self) -> None:
        """Stop: the model's generator and the decoder are closed (idempotent)."""
        if (frames := getattr(self, "_frames", None)) is not None:
            frames.close()
        if (reader := getattr(self, "_reader", None)) is not None:
            reader.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def frames(
    input: Any,  # noqa: A002 - the name a reader expects
    options: EnhanceOptions | Mapping[str, Any] | None = None,
    *,
    device: str = "auto",
    engine: Any = None,
) -> FrameStream:
    """The enhanced frames of ``input`` (a path, URL or binary file object), in display order.

    ``options`` are those of ``enhance`` (``stages``, ``side_info``, ``max_frames``; the
    output's codec and rate do not apply). ``engine``: an ``enhancer.engine.Engine`` to
    reuse (one model load for many videos); else one is loaded on ``device``.
    """
    opts = options if isinstance(options, EnhanceOptions) else parse_options(dict(options or {}))
    if engine is None:
        from bitstream.errors import UserError
        from enhancer.engine import Engine

        try:
            engine = Engine(device=device)
        except (ValueError, RuntimeError, OSError) as exc:  # no CUDA, weights
            raise UserError(f"cannot set up the model: {exc}") from None
    return FrameStream(input, opts, engine)
