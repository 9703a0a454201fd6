"""enhancer.align and enhancer.references: which frames a frame borrows from, and alignment.

The main check encodes clips with KNOWN motion (a photo-like texture panned by
integer and half-pixel steps, libx264 CRF 37 with B-frames), decodes them
through the bitstream reader and requires the aligned quality-peak references
to be within 0.5 dB PSNR-Y of the true alignment on P- and B-frames (over all the
references of one picture type, as the issue's table measures; measured 0.09-0.49),
and no single reference more than 1 dB behind (measured up to 0.78).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bitstream.reader import open_video
from enhancer.align import (
    BLOCK,
    COARSE_RADIUS,
    MAX_REF_DISTANCE,
    _median3,
    align,
    apply_flow,
    coarse_search,
    dense,
    luma_of,
    sample,
    seeds_from_vectors,
    warp_frame,
)
from enhancer.features import planes_to_tensor, tensor_to_planes, warp_reference
from enhancer.metrics import psnr
from enhancer.references import (
    MAX_PENDING,
    InputPlan,
    align_reference,
    input_plan,
    reference_indices,
    vector_seeds,
)
from enhancer.training.data import EncodeSettings, encode_planes
from enhancer.training.sources import rgb_to_yuv420

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- input plans


def test_input_plan_by_codec_and_side_info_mode():
    h264 = InputPlan("peaks", bitstream_vectors=True, qp_map=True, frame_qp=True, pict_type=True)
    hevc = InputPlan("peaks", bitstream_vectors=False, qp_map=False, frame_qp=True, pict_type=True)
    blind = InputPlan("adjacent", False, False, False, False)
    for codec in ("h264", "libx264"):
        assert input_plan(codec) == input_plan(codec, "bitstream") == h264
    for codec in ("hevc", "libx265"):  # peaks from the slice headers, aligned by search
        assert input_plan(codec) == input_plan(codec, "bitstream") == hevc
    for codec in ("vp9", "mpeg2video", "mpeg4", "av1", "unknown"):
        assert input_plan(codec) == blind
    for codec in ("h264", "hevc", "vp9"):
        assert input_plan(codec, "blind") == blind


def test_reference_indices_peaks_are_the_nearest_anchors():
    peaks = input_plan("h264")
    picts = ["I", "B", "B", "P", "B", "P", "P", "I", "B"]
    past, future = reference_indices(picts, peaks)
    # The nearest I/P before every frame; for B also the nearest I/P after it.
    assert past == [-1, 0, 0, 0, 3, 3, 5, 6, 7]
    assert future == [-1, 3, 3, -1, 5, -1, -1, -1, -1]  # the last B has no anchor after it
    # HEVC follows the same plan.
    assert reference_indices(picts, input_plan("hevc")) == (past, future)
    # A stream without picture types falls back to the adjacent frames.
    assert reference_indices(["?"] * 4, peaks) == ([-1, 0, 1, 2], [1, 2, 3, -1])
    assert reference_indices(["I"], peaks) == ([-1], [-1])


def test_reference_indices_adjacent_are_the_neighbours():
    blind = input_plan("h264", "blind")
    picts = ["I", "B", "B", "P", "B", "P"]
    assert reference_indices(picts, blind) == ([-1, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, -1])
    assert reference_indices([], blind) == ([], [])
    assert MAX_PENDING >= 1


# ---------------------------------------------------------------- seeds


def test_seeds_from_vectors_scale_to_the_anchor_distance():
    mv = torch.tensor([[[2.0, 4.0]], [[-1.0, 8.0]]])  # (2, 1, 2): dx, dy per block
    valid = torch.tensor([[1.0, 0.0]])
    # A vector to the past, anchor 2 frames back: the vector spans 1..4 frames.
    seeds = seeds_from_vectors(mv, valid, -1, -2)
    assert len(seeds) == MAX_REF_DISTANCE
    for k, s in enumerate(seeds, 1):
        assert torch.allclose(s[:, 0, 0], mv[:, 0, 0] * 2 / k)
        assert s[:, 0, 1].abs().sum() == 0  # invalid blocks give no seed
    # The anchor lies the other way (a future anchor for a past vector): the sign flips.
    assert torch.allclose(seeds_from_vectors(mv, valid, -1, 3)[0][:, 0, 0], -3 * mv[:, 0, 0])
    assert torch.allclose(seeds_from_vectors(mv, valid, 1, 3)[2][:, 0, 0], mv[:, 0, 0])


def test_vector_seeds_use_both_directions_when_present():
    mv = np.zeros((2, 3, 2), np.float32)
    mv[..., 0] = 1.5
    valid = np.ones((2, 3), bool)
    side = SimpleNamespace(mv_past=mv, mv_past_valid=valid, mv_future=None, mv_future_valid=None)
    seeds = vector_seeds(side, -1)
    assert len(seeds) == MAX_REF_DISTANCE and seeds[0].shape == (2, 2, 3)
    assert torch.allclose(seeds[0][0], torch.full((2, 3), 1.5))  # (dx, dy) -> channels
    side.mv_future, side.mv_future_valid = -mv, valid
    assert len(vector_seeds(side, -1)) == 2 * MAX_REF_DISTANCE
    side.mv_past_valid = np.zeros((2, 3), bool)  # no valid vector: no seeds from it
    assert len(vector_seeds(side, -1)) == MAX_REF_DISTANCE


# ---------------------------------------------------------------- alignment


def texture(h: int, w: int, seed: int, detail: float = 1.0) -> np.ndarray:
    """Photo-like luma: smooth octaves of noise, a few sharp-edged shapes, light grain."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w))
    for cell, amp in ((48, 70.0), (16, 45.0), (6, 25.0 * detail)):
        coarse = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
        up = Image.fromarray(coarse).resize(((w // cell + 2) * cell, (h // cell + 2) * cell),
                                            Image.BICUBIC)  # fmt: skip
        img += amp * np.asarray(up)[:h, :w]
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y0 : y0 + rng.integers(8, 40), x0 : x0 + rng.integers(8, 40)] += rng.uniform(-60, 60)
    img += rng.normal(0, 2.0 * detail, img.shape)
    return np.clip(128 + img, 0, 255)


def planes_of(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = y.shape
    c = np.full((h // 2, w // 2), 128, np.uint8)
    return np.round(y).astype(np.uint8), c, c.copy()


def shifted_pair(fx: int, fy: int, h: int = 64, w: int = 96, seed: int = 3):
    """(cur, ref) 6-channel stacks with cur(x) = ref(x + (fx, fy)) exactly."""
    big = texture(h + 128, w + 128, seed)
    y0, x0 = 64, 64
    ref = big[y0 : y0 + h, x0 : x0 + w]
    cur = big[y0 + fy : y0 + fy + h, x0 + fx : x0 + fx + w]
    return planes_to_tensor(planes_of(cur)), planes_to_tensor(planes_of(ref))


def test_align_identical_frames_is_no_motion_at_no_cost():
    cur, _ = shifted_pair(0, 0)
    flow, cost = align(cur, cur.clone())
    assert flow.shape == (2, 64 // BLOCK, 96 // BLOCK) and cost.shape == flow.shape[1:]
    assert flow.abs().sum() == 0 and float(cost.max()) < 1e-4
    aligned = apply_flow(cur[None], flow[None])[0]
    assert float((aligned - cur).abs().max()) < 1e-4  # a zero flow is the identity


def test_per_block_warp_and_median_are_the_dense_ones_exactly():
    """apply_flow builds its sampling grids per block and _median3 sorts by a network:
    both give exactly what the dense flow and torch.median give."""
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(2, 6, 40, 72, generator=g)
    flow = torch.randn(2, 2, 10, 18, generator=g) * 6 + torch.rand(2, 2, 10, 18, generator=g)
    want = warp_reference(ref, dense(flow), "bicubic")
    assert torch.equal(apply_flow(ref, flow), want)
    field = flow[0].round()  # ties, as real flows have them
    around = torch.nn.functional.pad(field[None], (1, 1, 1, 1), mode="replicate")
    patches = torch.nn.functional.unfold(around, 3).view(2, 9, 10, 18)
    assert torch.equal(_median3(field), patches.median(1).values)


@pytest.mark.parametrize("masked", [False, True])
def test_warp_frame_is_apply_flow_exactly(masked):
    """warp_frame samples the luma into its phase planes from the full-resolution plane,
    block by block: apply_flow's samples to the bit, and with a block mask those blocks'
    samples and zero elsewhere."""
    g = torch.Generator().manual_seed(7)
    ref = torch.rand(6, 40, 72, generator=g)
    flow = torch.randn(2, 10, 18, generator=g) * 6 + torch.rand(2, 10, 18, generator=g)
    want = apply_flow(ref[None], flow[None])[0]
    blocks = torch.rand(10, 18, generator=g) < 0.4 if masked else None
    got = warp_frame(ref, flow, blocks)
    if blocks is not None:
        # An 8x8 luma block is 4x4 of every half-resolution plane.
        keep = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)
        want = torch.where(keep, want, torch.zeros_like(want))
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_sample_in_bands_of_rows_is_grid_sample_exactly(threads, mode):
    """One image sampled as bands of rows on several threads (41 rows: the last band
    padded) gives grid_sample's samples to the bit."""
    g = torch.Generator().manual_seed(5)
    img = torch.rand(1, 2, 41, 57, generator=g)
    grid = torch.rand(1, 41, 57, 2, generator=g) * 2.2 - 1.1
    want = torch.nn.functional.grid_sample(
        img, grid, mode=mode, padding_mode="border", align_corners=True
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = sample(img, grid, mode)
    finally:
        torch.set_num_threads(before)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("fx,fy", [(6, -3), (-12, 7), (20, 16)])
def test_align_by_search_finds_a_global_shift(fx, fy):
    cur, ref = shifted_pair(fx, fy)
    coarse = coarse_search(luma_of(cur), luma_of(ref))
    assert torch.equal(coarse.remainder(4), torch.zeros_like(coarse))  # quarter-res integers
    flow, cost = align(cur, ref)
    inner = flow[:, 2:-2, 2:-2]  # blocks whose match stays inside the reference
    near = ((inner[0] - fx).abs() <= 0.5) & ((inner[1] - fy).abs() <= 0.5)
    assert float(near.float().mean()) >= 0.8, flow
    # The aligned reference is the current frame, away from the borders.
    y = tensor_to_planes(apply_flow(ref[None], flow[None])[0], 64, 96)[0]
    want = tensor_to_planes(cur, 64, 96)[0]
    assert psnr(y[24:-24, 32:-32], want[24:-24, 32:-32]) > 30


def test_align_follows_a_seed_beyond_the_search_range():
    fx, fy = 44, -6  # beyond the coarse search's +-24 luma pixels
    assert fx > 4 * COARSE_RADIUS
    cur, ref = shifted_pair(fx, fy, seed=5)
    inner = (slice(None), slice(2, -2), slice(2, -6))  # blocks whose match stays inside
    unseeded, _ = align(cur, ref)
    far = (unseeded[0][inner[1:]] == fx).float().mean()
    assert float(far) < 0.5
    gh, gw = cur.shape[-2] // 4, cur.shape[-1] // 4
    seed = torch.tensor([fx - 1.5, float(fy)])[:, None, None].expand(2, gh, gw)
    flow, cost = align(cur, ref, [seed], search=False)  # the refinement climbs the rest
    hit = (flow[inner][0] == fx) & (flow[inner][1] == fy)
    assert float(hit.float().mean()) >= 0.75, flow


# ---------------------------------------------------------------- known motion


SIZE = (192, 128)  # width, height
FRAMES = 9
MARGIN = 24  # luma pixels left out at each border: there the true match leaves the frame


def panned_clip(vx: float, vy: float, seed: int):
    """Clean yuv420p frames of a textured photo panned by (vx, vy) luma px per frame.

    The scene is drawn at twice the resolution and area-downscaled, so half-pixel
    steps are real sub-pixel motion: frame t at x shows the scene at x + t * (vx, vy).
    """
    w, h = SIZE
    pad = 2 * int(np.ceil(max(abs(vx), abs(vy)) * FRAMES)) + 16
    lum = texture(2 * h + 2 * pad, 2 * w + 2 * pad, seed, detail=0.6)
    tint = texture(2 * h + 2 * pad, 2 * w + 2 * pad, seed + 1, detail=0.0)
    rgb = np.stack([lum, 0.7 * lum + 0.3 * tint, 0.8 * lum + 0.2 * (255 - tint)], -1)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    frames = []
    for t in range(FRAMES):
        x0, y0 = pad + round(2 * vx * t), pad + round(2 * vy * t)
        crop = Image.fromarray(rgb[y0 : y0 + 2 * h, x0 : x0 + 2 * w])
        frames.append(rgb_to_yuv420(np.asarray(crop.resize((w, h), Image.BOX))))
    return frames


@pytest.fixture(scope="module", params=[(2.0, 1.0), (1.5, -0.5)], ids=["integer", "half-pel"])
def known_motion(request):
    vx, vy = request.param
    clean = panned_clip(vx, vy, seed=11)
    data = encode_planes(clean, EncodeSettings(codec="libx264", crf=37, bframes=3))
    with open_video(io.BytesIO(data)) as reader:
        assert reader.info.codec == "h264"
        decoded = list(reader)
    assert len(decoded) == FRAMES
    picts = [f.side.pict_type for f in decoded]
    assert picts[0] == "I" and "P" in picts and "B" in picts, picts
    return (vx, vy), clean, decoded


# The enhancer issue's target, on its measure: PSNR-Y over all the P- (or B-) frames'
# references together. Single references may fall further behind (the lowest SAD against a
# CRF 37 decode is not always the true motion), never by more than SINGLE_DB.
TOLERANCE_DB = 0.5
SINGLE_DB = 1.0


@pytest.mark.parametrize("bitstream", [True, False], ids=["vectors", "search-only"])
def test_aligned_peaks_are_within_half_a_db_of_the_true_alignment(known_motion, bitstream):
    """The aligned quality-peak references (h264 plan: bitstream vector seeds; the HEVC
    plan aligns the same references by search alone) against the decoded anchor shifted
    by the true motion, measured against the clean frame away from the borders."""
    (vx, vy), clean, decoded = known_motion
    w, h = SIZE
    picts = [f.side.pict_type for f in decoded]
    past, future = reference_indices(picts, input_plan("h264"))
    tens = [planes_to_tensor(f.planes) for f in decoded]
    inner = (slice(MARGIN, h - MARGIN), slice(MARGIN, w - MARGIN))
    checked = {"P": 0, "B": 0}
    losses = []
    mse: dict[str, list[list[float]]] = {"P": [[], []], "B": [[], []]}  # got, true
    for t, pict in enumerate(picts):
        if pict == "I":
            continue
        target = clean[t][0][inner]
        for j in (past[t], future[t]):
            if j < 0:
                continue
            side = decoded[t].side
            flow, cost = align_reference(tens[t], tens[j], side, j - t, bitstream=bitstream)
            assert flow.shape == (2, h // BLOCK, w // BLOCK) and cost.shape == flow.shape[1:]
            true = torch.tensor([vx * (t - j), vy * (t - j)])[:, None, None].expand_as(flow)
            got = tensor_to_planes(apply_flow(tens[j][None], flow[None])[0], h, w)[0]
            want = tensor_to_planes(apply_flow(tens[j][None], true[None])[0], h, w)[0]
            p_got, p_true = psnr(got[inner], target), psnr(want[inner], target)
            losses.append((t, j, pict, round(p_true - p_got, 2)))
            assert p_got >= p_true - SINGLE_DB, (t, j, pict, p_got, p_true)
            for k, y in enumerate((got, want)):
                mse[pict][k].append(float(((y[inner] - target.astype(np.float64)) ** 2).mean()))
            checked[pict] += 1
    assert checked["P"] >= 1 and checked["B"] >= 2, (checked, losses)
    lag = {  # dB behind the truth
        pict: round(float(10 * np.log10(np.mean(got_mse) / np.mean(true_mse))), 3)
        for pict, (got_mse, true_mse) in mse.items()
    }
    assert max(lag.values()) <= TOLERANCE_DB, (lag, losses)
    # B-frames were checked against both of their anchors.
    assert any(picts[t] == "B" and future[t] >= 0 for t in range(FRAMES))
