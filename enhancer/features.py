"""Side information and YUV planes -> model tensors, shared by training and inference.

The model body works at half resolution in the codec's own 4:2:0: Y is
pixel-unshuffled by 2 (4 channels) and stacked with U and V (6 channels).
Every per-block grid (QP map, partitions, motion field) is expanded to that
half-resolution grid, so a 16x16 macroblock covers 8x8 model pixels.
Frames are padded at the bottom/right only, so block boundaries keep their
phase (the model is told where 8x8 and 16x16 block edges lie).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from bitstream.types import PARTITION_CODES

QP_SCALE = 51.0
PAD = 16  # frames are padded to a multiple of one macroblock
PARTITION_CHANNELS = 4  # intra, 16x16, 16x8 or 8x16, 8x8
PHASE_CHANNELS = 4

# partition code -> channel (unknown maps to no channel)
_PART_LUT = np.full(256, -1, dtype=np.int64)
_PART_LUT[PARTITION_CODES["intra"]] = 0
_PART_LUT[PARTITION_CODES["16x16"]] = 1
_PART_LUT[PARTITION_CODES["16x8"]] = 2
_PART_LUT[PARTITION_CODES["8x16"]] = 2
_PART_LUT[PARTITION_CODES["8x8"]] = 3


@functools.cache
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 convolutions run several times faster than fp32 there."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast(device: str = "cpu", enabled: bool = True):
    """bf16 autocast where the device runs it fast (AMX / AVX-512 BF16 CPUs, CUDA): the
    one context the engine, the estimators and training compute under."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def cpu_has_amx() -> bool:
    """AMX tiles (bf16 convolutions about 15x fp32, the speed targets' reference CPU)."""
    return "amx_bf16" in _cpu_flags()


def padded_size(height: int, width: int) -> tuple[int, int]:
    return -(-height // PAD) * PAD, -(-width // PAD) * PAD


def pad_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Edge-pad a plane at the bottom/right to (height, width)."""
    ph, pw = height - plane.shape[0], width - plane.shape[1]
    if ph == 0 and pw == 0:
        return plane
    return np.pad(plane, ((0, ph), (0, pw)), mode="edge")


def planes_to_tensor(planes, bit_depth: int = 8) -> torch.Tensor:
    """(Y, U, V) numpy planes -> float tensor (6, H'/2, W'/2) in [0, 1], padded to 16."""
    y, u, v = planes
    hp, wp = padded_size(*y.shape)
    scale = 1.0 / ((1 << bit_depth) - 1)
    yt = torch.from_numpy(pad_plane(y, hp, wp).astype(np.float32) * scale)
    ut = torch.from_numpy(pad_plane(u, hp // 2, wp // 2).astype(np.float32) * scale)
    vt = torch.from_numpy(pad_plane(v, hp // 2, wp // 2).astype(np.float32) * scale)
    y4 = F.pixel_unshuffle(yt[None, None], 2)[0]
    return torch.cat([y4, ut[None], vt[None]], 0)


def tensor_to_planes(
    x: torch.Tensor, height: int, width: int, bit_depth: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of planes_to_tensor: (6, h, w) in [0, 1] -> cropped integer planes."""
    maxv = (1 << bit_depth) - 1
    x = (x.float().clamp(0.0, 1.0) * maxv).round()
    y = F.pixel_shuffle(x[None, :4], 2)[0, 0]
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    ch, cw = (height + 1) // 2, (width + 1) // 2
    yp = y[:height, :width].cpu().numpy().astype(dtype)
    up = x[4, :ch, :cw].cpu().numpy().astype(dtype)
    vp = x[5, :ch, :cw].cpu().numpy().astype(dtype)
    return yp, up, vp


def expand_grid(grid: np.ndarray, factor: int, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour expand a per-block grid by ``factor`` and fit it to (h, w)."""
    out = np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)
    out = out[:h, :w]
    ph, pw = h - out.shape[0], w - out.shape[1]
    if ph > 0 or pw > 0:
        pads = ((0, max(ph, 0)), (0, max(pw, 0))) + ((0, 0),) * (out.ndim - 2)
        out = np.pad(out, pads, mode="edge")
    return out


def qp_plane(qp_map: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Per-macroblock QP map -> (1, h, w) half-resolution plane, scaled to ~[0, 1]."""
    return torch.from_numpy(expand_grid(qp_map.astype(np.float32), 8, h, w) / QP_SCALE)[None]


def partition_planes(partition: np.ndarray | None, h: int, w: int) -> torch.Tensor:
    """Partition code map -> (4, h, w) one-hot masks (all zero where unknown)."""
    out = np.zeros((PARTITION_CHANNELS, h, w), dtype=np.float32)
    if partition is None:
        return torch.from_numpy(out)
    idx = _PART_LUT[expand_grid(partition.astype(np.int64), 8, h, w)]
    for c in range(PARTITION_CHANNELS):
        out[c] = idx == c
    return torch.from_numpy(out)


def flow_plane(mv: np.ndarray | None, valid: np.ndarray | None, h: int, w: int):
    """Per-8x8 motion field in luma pixels -> half-res flow (2, h, w) and mask (1, h, w)."""
    if mv is None or valid is None:
        return torch.zeros(2, h, w), torch.zeros(1, h, w)
    flow = expand_grid(mv.astype(np.float32), 4, h, w) * 0.5  # luma px -> half-res px
    mask = expand_grid(valid.astype(np.float32), 4, h, w)
    flow = flow * mask[..., None]
    return torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1))), torch.from_numpy(mask)[
        None
    ]


_PHASE_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def mask_plane(valid: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Per-8x8 validity mask -> (1, h, w) half-resolution float plane."""
    return torch.from_numpy(expand_grid(valid.astype(np.float32), 4, h, w))[None]


def phase_planes(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(4, h, w) masks of 8x8-block and 16x16-macroblock edges on the half-res grid."""
    key = (h, w, str(device))
    if key not in _PHASE_CACHE:
        xs = torch.arange(w, device=device)
        ys = torch.arange(h, device=device)
        c8 = ((xs % 4 == 0) | (xs % 4 == 3)).float()[None, :].expand(h, w)
        r8 = ((ys % 4 == 0) | (ys % 4 == 3)).float()[:, None].expand(h, w)
        c16 = ((xs % 8 == 0) | (xs % 8 == 7)).float()[None, :].expand(h, w)
        r16 = ((ys % 8 == 0) | (ys % 8 == 7)).float()[:, None].expand(h, w)
        if len(_PHASE_CACHE) > 64:
            _PHASE_CACHE.clear()
        _PHASE_CACHE[key] = torch.stack([c8, r8, c16, r16], 0)
    return _PHASE_CACHE[key]


def warp_base_grid(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """The identity sampling grid (1, h, w, 2) for ``grid_sample`` (align_corners=True),
    on ``like``'s device and dtype; cached."""
    key = (h, w, str(like.device), like.dtype)
    base = _GRID_CACHE.get(key)
    if base is None:
        ys = torch.arange(h, device=like.device, dtype=like.dtype) * (2.0 / max(h - 1, 1)) - 1.0
        xs = torch.arange(w, device=like.device, dtype=like.dtype) * (2.0 / max(w - 1, 1)) - 1.0
        base = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], -1)[None]
        if len(_GRID_CACHE) > 32:
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = base
    return base


def warp(ref: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``ref`` (B, C, h, w) by ``flow`` (B, 2, h, w) in pixels (dx, dy)."""
    b, _, h, w = ref.shape
    base = warp_base_grid(h, w, ref)
    scale = torch.tensor(
        [2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=ref.device, dtype=ref.dtype
    )
    grid = base + flow.permute(0, 2, 3, 1).to(ref.dtype) * scale
    return F.grid_sample(ref, grid, mode=mode, padding_mode="border", align_corners=True)


_GRID_CACHE: dict[tuple, torch.Tensor] = {}


def pict_onehot(pict_type: str) -> list[float]:
    return [float(pict_type == "I"), float(pict_type == "P"), float(pict_type == "B")]


def flow_plane_full(mv: np.ndarray | None, valid: np.ndarray | None, h: int, w: int):
    """Per-8x8 motion field -> full-resolution luma flow (1, 2, H', W') padded to 16."""
    hp, wp = padded_size(h, w)
    if mv is None or valid is None:
        return torch.zeros(1, 2, hp, wp)
    flow = expand_grid((mv * valid[..., None]).astype(np.float32), 8, hp, wp)
    return torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1)))[None]


def warp_reference(ref: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Align a reference (B, 6, h, w) by a full-res luma flow (B, 2, 2h, 2w).

    Luma is warped at full resolution and unshuffled again (warping the
    unshuffled phases directly would mix up pixel phases); chroma is warped
    at half resolution with half the vector.
    """
    y = F.pixel_shuffle(ref[:, :4], 2)
    yw = F.pixel_unshuffle(warp(y, flow, mode), 2)
    uvw = warp(ref[:, 4:], F.avg_pool2d(flow, 2) * 0.5, mode)
    return torch.cat([yw, uvw], 1)
