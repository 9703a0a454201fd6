"""Pictures of side information for humans: MV arrows, partition overlay, QP heat map (Pillow).

Used by ``vqe inspect --png``. No torch here; drawing is per block with
Pillow, which is fine for the handful of frames a person looks at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bitstream.types import MV_BLOCK, PARTITION_CODES, QP_BLOCK, DecodedFrame

__all__ = [
    "PARTITION_COLOURS",
    "draw_motion_vectors",
    "draw_partitions",
    "draw_qp_heatmap",
    "frame_image",
    "save_frame_pngs",
]

PARTITION_COLOURS: dict[str, tuple[int, int, int]] = {
    "unknown": (128, 128, 128),
    "intra": (220, 40, 40),
    "16x16": (40, 160, 60),
    "16x8": (40, 110, 230),
    "8x16": (150, 70, 220),
    "8x8": (240, 180, 30),
}
PAST_COLOUR = (0, 255, 255)
FUTURE_COLOUR = (255, 0, 255)
QP_RANGE = (10.0, 51.0)


def frame_image(frame: DecodedFrame) -> Image.Image:
    """The frame as an RGB image (via PyAV when the frame is there, else luma only)."""
    if frame.av_frame is not None:
        return frame.av_frame.to_image()
    y = frame.planes[0]
    if y.dtype != np.uint8:
        y = (y >> 2).astype(np.uint8)
    return Image.fromarray(y, mode="L").convert("RGB")


def _blend(base: Image.Image, overlay: np.ndarray, alpha: float) -> Image.Image:
    over = Image.fromarray(overlay, mode="RGB").resize(base.size, Image.Resampling.NEAREST)
    return Image.blend(base, over, alpha)


def draw_motion_vectors(frame: DecodedFrame, step: int = 1) -> Image.Image:
    """Arrows from each 8x8 cell centre to where it predicts from (past cyan, future magenta)."""
    img = frame_image(frame)
    side = frame.side
    draw = ImageDraw.Draw(img)
    for field, valid, colour in (
        (side.mv_past, side.mv_past_valid, PAST_COLOUR),
        (side.mv_future, side.mv_future_valid, FUTURE_COLOUR),
    ):
        if field is None or valid is None:
            continue
        rows, cols = np.nonzero(valid[::step, ::step])
        for r, c in zip(rows * step, cols * step, strict=True):
            x0, y0 = c * MV_BLOCK + MV_BLOCK / 2, r * MV_BLOCK + MV_BLOCK / 2
            dx, dy = (float(v) for v in field[r, c])
            x1, y1 = x0 + dx, y0 + dy
            draw.line((x0, y0, x1, y1), fill=colour, width=1)
            draw.point((x1, y1), fill=(255, 255, 255))
    return img


def draw_partitions(frame: DecodedFrame, alpha: float = 0.45) -> Image.Image:
    """Macroblock partition map in colour over the frame, with the split lines drawn."""
    img = frame_image(frame)
    part = frame.side.partition
    if part is None:
        return img
    palette = np.zeros((256, 3), np.uint8)
    for name, code in PARTITION_CODES.items():
        palette[code] = PARTITION_COLOURS[name]
    cells = palette[part]
    big = np.repeat(np.repeat(cells, QP_BLOCK, axis=0), QP_BLOCK, axis=1)
    big = big[: img.height, : img.width]
    out = _blend(img, np.ascontiguousarray(big), alpha)
    draw = ImageDraw.Draw(out)
    for (r, c), code in np.ndenumerate(part):
        x, y = c * QP_BLOCK, r * QP_BLOCK
        draw.rectangle((x, y, x + QP_BLOCK - 1, y + QP_BLOCK - 1), outline=(0, 0, 0))
        if code in (PARTITION_CODES["16x8"], PARTITION_CODES["8x8"]):
            draw.line((x, y + 8, x + QP_BLOCK - 1, y + 8), fill=(0, 0, 0))
        if code in (PARTITION_CODES["8x16"], PARTITION_CODES["8x8"]):
            draw.line((x + 8, y, x + 8, y + QP_BLOCK - 1), fill=(0, 0, 0))
    return out


def qp_colours(qp_map: np.ndarray, lo: float = QP_RANGE[0], hi: float = QP_RANGE[1]) -> np.ndarray:
    """QP values -> RGB (blue = fine quantisation, red = coarse), vectorised."""
    t = np.clip((qp_map.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * t - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * t - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * t - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def draw_qp_heatmap(frame: DecodedFrame, alpha: float = 0.55) -> Image.Image:
    """The QP map as a heat map over the frame, with the frame QP written in the corner."""
    img = frame_image(frame)
    side = frame.side
    if side.qp_map is None:
        return img
    out = _blend(img, qp_colours(side.qp_map), alpha)
    draw = ImageDraw.Draw(out)
    label = f"{side.pict_type} QP {side.qp:.1f}" if side.qp is not None else side.pict_type
    draw.rectangle((0, 0, 6 * len(label) + 4, 12), fill=(0, 0, 0))
    draw.text((2, 0), label, fill=(255, 255, 255))
    return out


def save_frame_pngs(frame: DecodedFrame, out_dir: str | Path) -> list[Path]:
    """Write ``frameNNNN_{mv,partition,qp}.png`` for one frame; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, painter in (
        ("mv", draw_motion_vectors),
        ("partition", draw_partitions),
        ("qp", draw_qp_heatmap),
    ):
        path = out / f"frame{frame.index:04d}_{kind}.png"
        painter(frame).save(path)
        paths.append(path)
    return paths
