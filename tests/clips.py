"""Tiny deterministic test clips made with PyAV, reusable by every test module.

``make_clip`` encodes moving textured content (a panning seeded-noise texture
with a square moving against it), so encoders produce non-zero motion vectors.
The container follows the file extension: ``.mp4``/``.mkv``/``.mov``/``.webm``/
``.ivf`` are muxed, ``.264``/``.h264``/``.265``/``.hevc`` are raw Annex-B.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

RAW_FORMATS = {".264": "h264", ".h264": "h264", ".265": "hevc", ".hevc": "hevc"}


def noise_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` seeded random bytes: a "corrupt file" that is the same on every run.

    ``os.urandom`` made such tests flaky: now and then FFmpeg's probe takes random
    bytes for some text format (lrc, ...) instead of refusing them as not a video.
    """
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def clip_frame_rgb(
    index: int, width: int, height: int, seed: int = 0, pan: bool = True
) -> np.ndarray:
    """Frame ``index`` of the synthetic scene as an (H, W, 3) uint8 RGB array.

    ``pan=False`` holds the background still (a static camera): only the square moves.
    """
    rng = np.random.default_rng(seed)
    tex_h, tex_w = height + 64, width + 64
    # Smooth-ish texture: coarse noise upsampled plus fine noise, so motion search locks on.
    coarse = rng.integers(0, 256, size=(tex_h // 8 + 1, tex_w // 8 + 1, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:tex_h, :tex_w].astype(np.int16)
    tex = tex // 2 + rng.integers(0, 128, size=(tex_h, tex_w, 3), dtype=np.int16) // 2
    dx, dy = ((2 * index) % 48, index % 32) if pan else (0, 0)
    img = tex[dy : dy + height, dx : dx + width].copy()
    # A bright square moving the other way.
    side = max(8, min(width, height) // 4)
    x0 = (width - side - 3 * index) % max(1, width - side)
    y0 = (height // 3 + 2 * index) % max(1, height - side)
    img[y0 : y0 + side, x0 : x0 + side] = (230, 200, 40)
    return img.astype(np.uint8)


def make_clip(
    path: str | Path,
    codec: str = "libx264",
    size: tuple[int, int] = (176, 144),
    frames: int = 12,
    options: dict[str, str] | None = None,
    pix_fmt: str = "yuv420p",
    rate: int | Fraction = 25,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: float | None = None,
    audio: bool = False,
    seed: int = 0,
    pan: bool = True,
) -> Path:
    """Encode a small synthetic clip to ``path`` and return the path.

    ``pts`` (with ``time_base``) gives explicit, possibly irregular, timestamps
    (VFR); otherwise frames are spaced at ``rate``. ``rotation`` writes a
    display matrix (counter-clockwise degrees). ``audio`` adds a short sine track.
    ``pan=False`` holds the camera still.
    """
    path = Path(path)
    width, height = size
    fmt = RAW_FORMATS.get(path.suffix.lower())
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if options:
            stream.options = dict(options)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        astream = None
        if audio:
            astream = out.add_stream("aac", rate=8000)
        for i in range(frames):
            rgb = clip_frame_rgb(i, width, height, seed, pan)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = time_base
            else:
                frame.pts = i
                frame.time_base = Fraction(1, 1) / Fraction(rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if astream is not None:
            _write_sine(out, astream, seconds=frames / float(rate))
    return path


def _write_sine(out: av.container.OutputContainer, astream, seconds: float) -> None:
    rate = astream.codec_context.sample_rate
    n = int(rate * seconds)
    t = np.arange(n, dtype=np.float32) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    frame_size = astream.codec_context.frame_size or 1024
    for start in range(0, n, frame_size):
        chunk = samples[:, start : start + frame_size]
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        af.sample_rate = rate
        af.pts = start
        out.mux(astream.encode(af))
    out.mux(astream.encode(None))


def make_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """An audio-only file (no video stream)."""
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        astream = out.add_stream("aac", rate=8000)
        _write_sine(out, astream, seconds)
    return path
