"""Clean sources for training and validation: photos animated by a synthetic camera, clips.

Sources come from a footage folder (default ``../shared/footage``):

- photos, downscaled 2-4x so their own JPEG coding vanishes, animated with a
  synthetic camera (sub-pixel pan, slow zoom, shake) and a second photo's
  patch moving across as a foreground layer;
- clips, downscaled 2x to hide their own old compression.

The split is by source (``VALIDATION_SOURCES``): validation sources are never
trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
from PIL import Image

VALIDATION_SOURCES = frozenset({"Bridge", "Kite", "Wine", "FallenLeaf", "seeding", "Kay", "vtest"})
PICT_CODES = {"I": 0, "P": 1, "B": 2, "?": 3}
PRESETS = ["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]


def footage_sources(footage: Path) -> list[tuple[str, Path]]:
    """All (name, path) clean sources of a footage folder, photos then clips."""
    out = []
    for sub, exts in (("photos", (".jpg", ".jpeg", ".png")), ("clips", (".avi", ".mp4", ".mkv"))):
        d = footage / sub
        if d.is_dir():
            out += [(p.stem, p) for p in sorted(d.iterdir()) if p.suffix.lower() in exts]
    return out


def split_sources(sources, validation: bool):
    return [s for s in sources if (s[0] in VALIDATION_SOURCES) == validation]


# ---------------------------------------------------------------- clean sequences


def rgb_to_yuv420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 -> yuv420p planes with FFmpeg's default (BT.601 limited) matrix."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    arr = frame.reformat(format="yuv420p").to_ndarray()
    h, w = rgb.shape[:2]
    y = arr[:h]
    uv = arr[h:].reshape(2, h // 2, w // 2)
    return y.copy(), uv[0].copy(), uv[1].copy()


def _load_photo(path: Path, rng: np.random.Generator, min_side: int) -> Image.Image:
    img = Image.open(path).convert("RGB")
    factor = rng.uniform(2.0, 4.0)
    factor = min(factor, min(img.size) / min_side)
    factor = max(factor, 2.0)
    size = (max(1, round(img.width / factor)), max(1, round(img.height / factor)))
    return img.resize(size, Image.LANCZOS)


def photo_sequence(
    path: Path,
    others: list[Path],
    rng: np.random.Generator,
    size: tuple[int, int] = (256, 256),
    frames: int = 6,
) -> list[np.ndarray]:
    """A clean RGB sequence from one photo: camera motion plus a moving foreground layer."""
    w, h = size
    base = _load_photo(path, rng, max(w, h) + 64)
    speed = rng.uniform(0.0, 5.0)
    angle = rng.uniform(0, 2 * math.pi)
    vx, vy = speed * math.cos(angle), speed * math.sin(angle)
    zoom = rng.uniform(-0.006, 0.006)
    span_x = base.width - w - abs(vx) * frames - 8
    span_y = base.height - h - abs(vy) * frames - 8
    x0 = rng.uniform(4 + max(0.0, -vx * frames), 4 + max(0.0, -vx * frames) + max(span_x, 0))
    y0 = rng.uniform(4 + max(0.0, -vy * frames), 4 + max(0.0, -vy * frames) + max(span_y, 0))
    layer = None
    if others and rng.random() < 0.7:
        other = _load_photo(others[rng.integers(len(others))], rng, 160)
        lw, lh = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        ox, oy = rng.integers(0, other.width - lw), rng.integers(0, other.height - lh)
        patch = np.asarray(other.crop((ox, oy, ox + lw, oy + lh)))
        yy, xx = np.mgrid[0:lh, 0:lw]
        if rng.random() < 0.5:
            mask = (((xx - lw / 2) / (lw / 2)) ** 2 + ((yy - lh / 2) / (lh / 2)) ** 2) <= 1.0
        else:
            mask = np.ones((lh, lw), bool)
        lspeed = rng.uniform(1.0, 7.0)
        la = rng.uniform(0, 2 * math.pi)
        layer = (
            patch,
            mask,
            rng.uniform(0, w - lw),
            rng.uniform(0, h - lh),
            lspeed * math.cos(la),
            lspeed * math.sin(la),
        )
    out = []
    for t in range(frames):
        s = 1.0 + zoom * t
        jx, jy = rng.normal(0, 0.3, 2)
        cx, cy = x0 + vx * t + jx, y0 + vy * t + jy
        img = base.transform((w, h), Image.AFFINE, (s, 0, cx, 0, s, cy), resample=Image.BICUBIC)
        arr = np.array(img)
        if layer is not None:
            patch, mask, lx, ly, lvx, lvy = layer
            px, py = lx + lvx * t, ly + lvy * t
            ix, iy = int(math.floor(px)), int(math.floor(py))
            shifted = Image.fromarray(patch).transform(
                patch.shape[1::-1],
                Image.AFFINE,
                (1, 0, ix - px, 0, 1, iy - py),
                resample=Image.BICUBIC,
            )
            sp = np.asarray(shifted)
            y1, x1 = max(iy, 0), max(ix, 0)
            y2, x2 = min(iy + patch.shape[0], h), min(ix + patch.shape[1], w)
            if y2 > y1 and x2 > x1:
                m = mask[y1 - iy : y2 - iy, x1 - ix : x2 - ix]
                region = arr[y1:y2, x1:x2]
                region[m] = sp[y1 - iy : y2 - iy, x1 - ix : x2 - ix][m]
        out.append(arr)
    return out


def clip_frames(path: Path, max_frames: int | None = None) -> list[tuple]:
    """Decode a clip, downscale 2x (area filter), crop to a multiple of 16: yuv420p planes."""
    out = []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        w2, h2 = (s.width // 2) // 16 * 16, (s.height // 2) // 16 * 16
        for f in c.decode(s):
            g = f.reformat(
                width=s.width // 2, height=s.height // 2, format="yuv420p", interpolation="AREA"
            ).to_ndarray()
            hh, ww = s.height // 2, s.width // 2
            y = g[:hh]
            uv = g[hh:].reshape(2, hh // 2, ww // 2)
            out.append(
                (
                    y[:h2, :w2].copy(),
                    uv[0, : h2 // 2, : w2 // 2].copy(),
                    uv[1, : h2 // 2, : w2 // 2].copy(),
                )
            )
            if max_frames and len(out) >= max_frames:
                break
    return out


def clean_sequence(
    path: Path,
    photos: list[Path],
    clip_cache: dict,
    rng: np.random.Generator,
    frames: int,
    size: tuple[int, int],
) -> list[tuple]:
    """A clean yuv420p sequence of ``frames`` frames of at most ``size`` from one source."""
    if path.parent.name == "clips":
        if path.stem not in clip_cache:
            clip_cache[path.stem] = clip_frames(path, max_frames=400)
        allf = clip_cache[path.stem]
        start = int(rng.integers(0, max(1, len(allf) - frames)))
        seq = allf[start : start + frames]
        h, w = seq[0][0].shape
        ch, cw = min(size[1], h), min(size[0], w)
        y0 = int(rng.integers(0, h - ch + 1)) // 16 * 16
        x0 = int(rng.integers(0, w - cw + 1)) // 16 * 16
        return [
            (
                y[y0 : y0 + ch, x0 : x0 + cw],
                u[y0 // 2 : (y0 + ch) // 2, x0 // 2 : (x0 + cw) // 2],
                v[y0 // 2 : (y0 + ch) // 2, x0 // 2 : (x0 + cw) // 2],
            )
            for y, u, v in seq
        ]
    others = [p for p in photos if p != path]
    return [rgb_to_yuv420(f) for f in photo_sequence(path, others, rng, size, frames)]
