"""Aligning a reference frame to the current one, per 8x8 luma block.

FFmpeg exports a motion vector's direction but not which frame it points
to, and a B-frame's vectors rarely point at the quality-peak anchor we want
to borrow from. So the bitstream's vectors are used as *seeds*: each is
scaled to the anchor's display distance for every plausible reference
distance (1..``MAX_REF_DISTANCE``), i.e. the reference is identified and the
vector chained by matching. A coarse full search at quarter resolution adds
seeds where the bitstream has none (intra blocks, HEVC, blind input). Each
block keeps the seed whose windowed sum of absolute differences against the
decoded anchor is lowest (compared at half resolution, for speed), takes its
neighbours' winners once, and is refined by steps of 2, 1 and 0.5 pixel.
The result is a per-block flow (luma pixels, current -> reference) and its
full-resolution matching cost, which tells the network how far to trust the
aligned reference.

Everything runs in torch on the frame's device, on the model's half-resolution
6-channel stack (see features.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from enhancer.features import warp_base_grid

BLOCK = 8  # luma pixels per flow cell
MAX_REF_DISTANCE = 4  # reference distances tried for a bitstream vector
COARSE_RADIUS = 6  # quarter-resolution search radius (+-24 luma pixels)
REFINE_STEPS = (2.0, 1.0, 0.5)  # the coarse search is within +-2 px; then climb
# A block takes its neighbourhood's median vector when that matches within this much
# (mean absolute luma, 0..1) of its own best: see ``_smooth``.
SMOOTH_SLACK = 1.0 / 255
SMOOTH_PASSES = 2
SEED_SCALE = 4  # the bitstream's seeds are told apart at quarter resolution (_identify)


def _kept(t: torch.Tensor, key, make):
    """``make(t)``, made once and kept on ``t`` itself (so it lives as long as ``t``).

    Alignment meets each frame several times (as the current frame for each of its
    references, as the anchor of the frames around it), and its luma planes and their
    poolings were made again every time: 5 ms a 720p frame. A tensor changed in place is
    told apart by its version (inference tensors keep none: the engine never changes a
    frame in place).
    """
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        version = None
    store = t.__dict__.setdefault("_vqe_kept", {})
    if (key, version) not in store:
        store[(key, version)] = make(t)
    return store[(key, version)]


def _pooled(t: torch.Tensor, scale: int) -> torch.Tensor:
    return _kept(t, ("pool", scale), lambda x: F.avg_pool2d(x, scale))


def luma_of(x6: torch.Tensor) -> torch.Tensor:
    """(6, h, w) half-res stack -> (1, 1, 2h, 2w) full-resolution luma."""
    return F.pixel_shuffle(x6[None, :4].float(), 2)


def dense(flow: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per-block flow (N, 2, gh, gw) -> per-pixel (N, 2, block*gh, block*gw)."""
    return F.interpolate(flow, scale_factor=block, mode="nearest")


def _block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """``F.avg_pool2d(x, block)`` of an (N, 1, H, W) plane as two sums over contiguous
    rows (twice as fast on CPU as the pooling kernel on one channel)."""
    n, _, h, w = x.shape
    gh, gw = h // block, w // block
    x = x[..., : gh * block, : gw * block]
    rows = x.reshape(n, gh, block, gw * block).sum(2)
    return rows.view(n, 1, gh, gw, block).sum(4).div_(block * block)


def _window_cost(diff: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """|cur - warped| (N, 1, H, W) -> per block, blended with its 3x3 neighbourhood.

    The wider window resists noise; the block's own error keeps the choice local.
    """
    own = _block_mean(diff, block)
    around = F.avg_pool2d(own, 3, stride=1, padding=1, count_include_pad=False)
    return (0.5 * own + 0.5 * around)[:, 0]


def block_costs(
    cur_y: torch.Tensor, ref_y: torch.Tensor, cands: torch.Tensor, scale: int = 1
) -> torch.Tensor:
    """Matching cost of candidate flows (N, 2, gh, gw), in luma px, per block -> (N, gh, gw).

    ``cur_y``/``ref_y`` are luma downscaled by ``scale`` (1 or 2).
    """
    n = cands.shape[0]
    block = BLOCK // scale
    h, w = ref_y.shape[-2:]
    gh, gw = h // block, w // block
    # The sampling grid straight from the per-block vectors, as ``warp`` builds it from a
    # dense flow, without the dense flow (which was most of align's cost).
    norm = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=cands.device)
    step = (cands[:, :, :gh, :gw] * (norm / scale)[None, :, None, None]).to(ref_y.dtype)
    grid = _block_grid(step, ref_y, block)
    warped = sample(ref_y.expand(n, -1, -1, -1), grid)
    return _window_cost(warped.sub_(cur_y).abs_(), block)


def coarse_search(
    cur_y: torch.Tensor, ref_y: torch.Tensor, radius: int = COARSE_RADIUS, scale: int = 4
):
    """Full integer search at 1/``scale`` resolution (4 or 8) -> per-block flow (2, gh, gw)
    in luma px; +-``radius`` * ``scale`` luma pixels.

    One row of shifts at a time with a running minimum: the whole stack of shifted
    frames never exists at once (1.7x faster than stacking all of them).
    """
    c = _pooled(cur_y, scale)
    r = F.pad(_pooled(ref_y, scale), (radius,) * 4, mode="replicate")
    # A luma block is 2x2 pixels at quarter resolution, 1 at an eighth; either way its
    # cost is taken over a window twice its size.
    window = (4, 2, 1) if scale == 4 else (3, 1, 1)
    h, w = c.shape[-2:]
    span = torch.arange(-radius, radius + 1, dtype=torch.float32, device=cur_y.device)
    best = best_cost = None
    for dy in range(-radius, radius + 1):
        rows = r[..., radius + dy : radius + dy + h, :]
        stack = torch.cat(
            [rows[..., radius + dx : radius + dx + w] for dx in range(-radius, radius + 1)]
        )
        cost = F.avg_pool2d((stack - c).abs(), *window, count_include_pad=False)[:, 0]
        if dy == 0:
            cost[radius] -= 1e-3  # a small bias to the zero vector keeps flat areas still
        low, i = cost.min(0)
        vec = torch.stack([span[i], torch.full_like(low, float(dy))])  # (dx, dy)
        if best is None:
            best, best_cost = vec, low
        else:
            take = low < best_cost
            best, best_cost = torch.where(take[None], vec, best), torch.where(take, low, best_cost)
    return best * float(scale)


def _pick(cur_y, ref_y, cands, best, best_cost, scale):
    c, i = block_costs(cur_y, ref_y, cands, scale).min(0)  # 10x faster than argmin here
    take = c < best_cost
    chosen = cands.gather(0, i[None, None].expand(1, 2, -1, -1))[0]
    return torch.where(take[None], chosen, best), torch.where(take, c, best_cost)


def seeds_from_vectors(
    mv: torch.Tensor, valid: torch.Tensor, vec_dir: int, distance: int
) -> list[torch.Tensor]:
    """Bitstream vectors (2, gh, gw) pointing ``vec_dir`` (-1 past, +1 future) to an
    unknown reference, as candidates for an anchor ``distance`` frames away (signed)."""
    out = []
    for k in range(1, MAX_REF_DISTANCE + 1):
        scale = distance * vec_dir / k  # negative: the anchor lies the other way
        out.append(mv * valid[None] * scale)
    return out


@torch.no_grad()
def align(
    cur6: torch.Tensor,
    ref6: torch.Tensor,
    seeds: list[torch.Tensor] | None = None,
    search: bool = True,
    search_scale: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow (2, gh, gw) aligning ``ref6`` to ``cur6`` and its per-block cost (gh, gw).

    ``seeds`` are candidate flows (each (2, gh, gw), luma pixels), e.g. from
    ``seeds_from_vectors``. The cost is the mean absolute luma difference (0..1).
    """
    cur_y, ref_y = (_kept(x, "luma", luma_of) for x in (cur6, ref6))
    gh, gw = cur_y.shape[-2] // BLOCK, cur_y.shape[-1] // BLOCK
    # Candidates are compared at half resolution (4x cheaper); the chosen flow's cost,
    # which the network sees, is measured at full resolution.
    cur_h, ref_h = _pooled(cur_y, 2), _pooled(ref_y, 2)
    cands = [torch.zeros(2, gh, gw, device=cur_y.device)]
    if search:
        radius = COARSE_RADIUS * 4 // search_scale  # the same range in luma pixels
        cands.append(coarse_search(cur_y, ref_y, radius, search_scale))
    if seeds:
        cands.append(_identify(cur_h, ref_h, [s.to(cur_y.device, torch.float32) for s in seeds]))
    stack = torch.stack(cands)
    costs = block_costs(cur_h, ref_h, stack, 2)
    costs[0] -= 1e-3  # prefer no motion on ties (flat areas)
    best_cost, i = costs.min(0)
    best = stack.gather(0, i[None, None].expand(1, 2, -1, -1))[0]
    # One pass of neighbour propagation: a block inherits a neighbour's vector if it fits better.
    neigh = torch.stack([torch.roll(best, s, d) for s, d in ((1, 1), (-1, 1), (1, 2), (-1, 2))])
    best, best_cost = _pick(cur_h, ref_h, neigh, best, best_cost, 2)
    # An eighth-resolution search (seeded by the stream's vectors) is within +-4 px: a
    # ring at 4 px, then the four axis neighbours at each step (the ring at 2 px cost 6 ms
    # and bought nothing there on bench/quality's sequences). Else a ring at 2 px first.
    if search and search_scale == 8:
        steps = ((4.0, _RING), *((s, _CROSS) for s in REFINE_STEPS))
    else:
        steps = tuple(zip(REFINE_STEPS, (_RING, _CROSS, _CROSS), strict=True))
    for step, ring in steps:
        cands = best[None] + (ring.to(cur_y.device) * step)[:, :, None, None]
        best, best_cost = _pick(cur_h, ref_h, cands, best, best_cost, 2)
    best = _smooth(cur_h, ref_h, best, best_cost)
    return best, block_costs(cur_y, ref_y, best[None])[0]


def _identify(cur_h: torch.Tensor, ref_h: torch.Tensor, seeds: list[torch.Tensor]) -> torch.Tensor:
    """Per block, the seed that matches best, compared at 1/``SEED_SCALE`` resolution.

    The seeds of one vector differ by the reference distance they assume (x1, x2, x4 at
    times): telling them apart needs no fine detail, so a quarter-resolution cost
    (a 2x2 block) does it for a quarter of a half-resolution one.
    """
    if len(seeds) == 1:
        return seeds[0]
    stack = torch.stack(seeds)
    down = SEED_SCALE // 2
    cur, ref = (_pooled(t, down) if down > 1 else t for t in (cur_h, ref_h))
    i = block_costs(cur, ref, stack, SEED_SCALE).min(0).indices
    return stack.gather(0, i[None, None].expand(1, 2, -1, -1))[0]


def _median3(flow: torch.Tensor) -> torch.Tensor:
    """Per-component median of each block's 3x3 neighbourhood of a (2, gh, gw) flow."""
    gh, gw = flow.shape[1:]
    p = list(
        F.unfold(F.pad(flow[None], (1, 1, 1, 1), mode="replicate"), 3).view(2, 9, gh, gw).unbind(1)
    )
    # The median of nine by a 19-exchange sorting network (Paeth; Devillard's opt_med9):
    # the same value as torch.median, five times faster on these small planes.
    for a, b in _MEDIAN9:
        p[a], p[b] = torch.minimum(p[a], p[b]), torch.maximum(p[a], p[b])
    return p[4]


def _smooth(cur_h, ref_h, best, best_cost):
    """Pull each block's vector to its neighbourhood's median where that fits almost as well.

    The lowest SAD against a coarsely quantised frame is often a vector half a pixel
    off, whose interpolation blur matches the smoothed decode better than the true
    motion does (measured on known pans at CRF 37: B-frames' aligned anchors 0.65 dB
    below the true alignment on average, 0.31 with this). Encoders regularise their
    own search the same way (rate-constrained motion estimation).
    """
    for _ in range(SMOOTH_PASSES):
        med = _median3(best)
        cost = block_costs(cur_h, ref_h, med[None], 2)[0]
        take = cost <= best_cost + SMOOTH_SLACK
        best, best_cost = torch.where(take[None], med, best), torch.where(take, cost, best_cost)
    return best


_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
            (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))  # fmt: skip
_RING = torch.tensor([(-1.0, -1.0), (0.0, -1.0), (1.0, -1.0), (-1.0, 0.0), (1.0, 0.0),
                      (-1.0, 1.0), (0.0, 1.0), (1.0, 1.0)])  # fmt: skip
_CROSS = torch.tensor([(-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0)])


def apply_flow(ref6: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp a (B, 6, h, w) reference by per-block flows (B, 2, gh, gw), bicubic.

    The samples of ``features.warp_reference`` with the dense flow (luma at full
    resolution, chroma by the flow pooled to half resolution and halved), with the
    sampling grids built per block (``_block_grid``): 1.5x faster.
    """
    _, _, h, w = ref6.shape
    flow = flow.to(ref6.dtype)
    y = F.pixel_shuffle(ref6[:, :4], 2)
    luma = _warp_blocks(y, flow, BLOCK)
    # warp_reference pools the dense flow: per block, four equal values pooled the same way.
    half = F.avg_pool2d(dense(flow, 2), 2) * 0.5
    return torch.cat([F.pixel_unshuffle(luma, 2), _warp_blocks(ref6[:, 4:], half, BLOCK // 2)], 1)


def warp_frame(
    ref6: torch.Tensor, flow: torch.Tensor, blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """``apply_flow`` for one (6, h, w) frame and its flow (2, gh, gw): the same samples,
    faster; with ``blocks`` ((gh, gw) bool) only those 8x8 luma blocks are warped, and the
    rest is zero.

    The luma is sampled straight into its four phase planes (no pixel_unshuffle, and
    four images share out over the threads), from the full-resolution plane alignment
    already made of the frame. Blocks are sampled as one tall grid of 4x4 pieces
    (grid_sample walks a grid's pixels in memory order, so its shape costs nothing).
    """
    _, h, w = ref6.shape
    gh, gw = h // 4, w // 4
    flow = flow.to(ref6.dtype)
    y = _kept(ref6, "luma", luma_of)  # (1, 1, 2h, 2w)
    chroma = ref6[None, 4:]
    # As apply_flow: chroma by the per-block flow pooled to half resolution and halved.
    half = F.avg_pool2d(dense(flow[None], 2), 2)[0] * 0.5
    luma_base, chroma_base = _block_bases(h, w, y)  # (4 or 1, gh*gw, 4, 4, 2)
    luma_step = flow * _grid_scale(2 * h, 2 * w, y)
    chroma_step = half * _grid_scale(h, w, y)
    pick = None if blocks is None else blocks.flatten().nonzero()[:, 0]

    def grid(base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        step = step.permute(1, 2, 0).reshape(gh * gw, 1, 1, 2)
        if pick is not None:
            base, step = base[:, pick], step[pick]
        return (base + step).view(base.shape[0], -1, 4, 2)

    lg, cg = grid(luma_base, luma_step), grid(chroma_base, chroma_step)
    luma = F.grid_sample(
        y.expand(4, -1, -1, -1), lg, mode="bicubic", padding_mode="border", align_corners=True
    )
    pieces = torch.cat([luma.view(4, -1, 4, 4), sample(chroma, cg, "bicubic")[0].view(2, -1, 4, 4)])
    if pick is not None:
        full = pieces.new_zeros(6, gh * gw, 4, 4)
        full[:, pick] = pieces
        pieces = full
    return pieces.view(6, gh, gw, 4, 4).transpose(2, 3).reshape(6, h, w)


def _grid_scale(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Luma pixels -> grid units on an (h, w) plane, as (2, 1, 1)."""
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=like.device)
    return scale.to(like.dtype)[:, None, None]


def _block_bases(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity grids of a half-res (h, w) frame's planes, block by block (a block:
    4x4 pixels of a phase plane): the luma's four phase planes, taken from the
    full-resolution grid (4, gh*gw, 4, 4, 2), and the chroma's (1, gh*gw, 4, 4, 2); cached."""
    key = (h, w, str(like.device), like.dtype)
    bases = _BLOCK_BASES.get(key)
    if bases is None:
        gh, gw = h // 4, w // 4
        full = warp_base_grid(2 * h, 2 * w, like).view(gh, 4, 2, gw, 4, 2, 2)
        luma = full.permute(2, 5, 0, 3, 1, 4, 6).reshape(4, gh * gw, 4, 4, 2)
        half = warp_base_grid(h, w, like).view(gh, 4, gw, 4, 2)
        chroma = half.permute(0, 2, 1, 3, 4).reshape(1, gh * gw, 4, 4, 2)
        if len(_BLOCK_BASES) > 16:
            _BLOCK_BASES.clear()
        _BLOCK_BASES[key] = bases = (luma, chroma)
    return bases


_BLOCK_BASES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _warp_blocks(img: torch.Tensor, flow: torch.Tensor, block: int) -> torch.Tensor:
    """``features.warp(img, dense(flow, block), "bicubic")`` for a per-block ``flow``."""
    h, w = img.shape[-2:]
    grid = _block_grid(flow * _grid_scale(h, w, img)[None], img, block)
    return sample(img, grid, "bicubic")


def sample(img: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``F.grid_sample`` (border padding, align_corners) on all of the CPU's threads.

    PyTorch's CPU kernel shares its work out by image: one image ran on one thread. So a
    single image is sampled as bands of rows, one band an image (the input expanded, not
    copied): the same samples, 1.9x faster on 2 threads.
    """
    n, h = grid.shape[:2]
    k = min(torch.get_num_threads(), h // 8) if img.device.type == "cpu" and n == 1 else 1
    if k < 2:
        return F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)
    band = -(-h // k)
    pad = band * k - h
    if pad:  # the last band padded with its own last row, cut off again below
        grid = torch.cat([grid, grid[:, -1:].expand(1, pad, -1, -1)], 1)
    c, wide = img.shape[1], grid.shape[2]
    out = F.grid_sample(
        img.expand(k, -1, -1, -1),
        grid.reshape(k, band, wide, 2),
        mode=mode,
        padding_mode="border",
        align_corners=True,
    )
    out = out.transpose(0, 1).reshape(1, c, k * band, wide)
    return out[:, :, :h] if pad else out


def _block_grid(step: torch.Tensor, like: torch.Tensor, block: int) -> torch.Tensor:
    """The sampling grid (n, h, w, 2) of per-block offsets ``step`` (n, 2, gh, gw; in
    grid units) over ``like``'s (h, w) = (gh, gw) * ``block``: each block's (dx, dy),
    repeated along its row of pixels, added to the identity grid's rows in one
    broadcast, in grid_sample's own layout (a strided grid samples 1.3x slower)."""
    n, _, gh, gw = step.shape
    h, w = like.shape[-2:]
    rows = step.permute(0, 2, 3, 1)[:, :, :, None].expand(n, gh, gw, block, 2)
    rows = rows.reshape(n, gh, 1, gw * block * 2)
    return (rows + warp_base_grid(h, w, like).view(1, gh, block, w * 2)).view(n, h, w, 2)
