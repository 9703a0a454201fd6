"""Training and validation data: clean sequences -> x264/x265 encodes -> cached samples.

Sources come from a footage folder (default ``../shared/footage``):

- photos, downscaled 2-4x so their own JPEG coding vanishes, animated with a
  synthetic camera (sub-pixel pan, slow zoom, shake) and a second photo's
  patch moving across as a foreground layer;
- clips, downscaled 2x to hide their own old compression.

The split is by source (``VALIDATION_SOURCES``): validation sources are never
trained on. Each clean sequence is encoded with randomised libx264 settings
(CRF 15-51, presets, B-frames/pyramid, reference count, GOP) and sometimes
libx265, decoded through the bitstream reader, and stored as one ``.npz``:
clean and decoded planes, the past anchor frame warped by the bitstream
motion vectors, QP/partition maps, picture types, frame QPs and the CRF.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from bitstream.reader import open_video
from enhancer.features import flow_plane_full, planes_to_tensor, tensor_to_planes, warp_reference

VALIDATION_SOURCES = frozenset(
    {"Bridge", "Kite", "Wine", "FallenLeaf", "seeding", "Kay", "vtest"}
)
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
        layer = (patch, mask, rng.uniform(0, w - lw), rng.uniform(0, h - lh),
                 lspeed * math.cos(la), lspeed * math.sin(la))  # fmt: skip
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
                patch.shape[1::-1], Image.AFFINE, (1, 0, ix - px, 0, 1, iy - py),
                resample=Image.BICUBIC,
            )  # fmt: skip
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
            g = f.reformat(width=s.width // 2, height=s.height // 2, format="yuv420p",
                           interpolation="AREA").to_ndarray()  # fmt: skip
            hh, ww = s.height // 2, s.width // 2
            y = g[:hh]
            uv = g[hh:].reshape(2, hh // 2, ww // 2)
            out.append((y[:h2, :w2].copy(), uv[0, : h2 // 2, : w2 // 2].copy(),
                        uv[1, : h2 // 2, : w2 // 2].copy()))  # fmt: skip
            if max_frames and len(out) >= max_frames:
                break
    return out


# ---------------------------------------------------------------- encoding


@dataclass
class EncodeSettings:
    codec: str = "libx264"
    crf: float = 27.0
    preset: str = "medium"
    bframes: int = 3
    b_pyramid: str = "normal"
    ref: int = 3
    keyint: int = 250

    def options(self) -> dict[str, str]:
        if self.codec == "libx265":
            params = f"bframes={self.bframes}:keyint={self.keyint}:log-level=none"
            return {"crf": f"{self.crf:g}", "preset": self.preset, "x265-params": params}
        params = f"bframes={self.bframes}:b-pyramid={self.b_pyramid}:ref={self.ref}"
        params += f":keyint={self.keyint}"
        return {"crf": f"{self.crf:g}", "preset": self.preset, "x264-params": params}


def random_settings(rng: np.random.Generator) -> EncodeSettings:
    crf = rng.uniform(17, 47) if rng.random() < 0.8 else rng.uniform(15, 51)
    codec = "libx265" if rng.random() < 0.1 else "libx264"
    preset = PRESETS[rng.integers(0, 6 if codec == "libx265" else len(PRESETS))]
    return EncodeSettings(
        codec=codec,
        crf=round(float(crf), 1),
        preset=preset,
        bframes=int(rng.choice([0, 1, 2, 3, 3])),
        b_pyramid=str(rng.choice(["none", "normal"])),
        ref=int(rng.choice([1, 2, 3, 4])),
        keyint=int(rng.choice([3, 250, 250])),
    )


def encode_planes(planes: list[tuple], settings: EncodeSettings, rate: int = 25) -> bytes:
    """Encode yuv420p planes into an in-memory MP4."""
    buf = io.BytesIO()
    h, w = planes[0][0].shape
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream(settings.codec, rate=rate)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = settings.options()
        for i, (y, u, v) in enumerate(planes):
            arr = np.concatenate([y, u.reshape(-1, w), v.reshape(-1, w)], 0)
            frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
            frame.pts = i
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return buf.getvalue()


def anchor_index(pict_types: list[str], t: int) -> int:
    """The past reference the model aligns: the nearest earlier I/P frame in display order."""
    for j in range(t - 1, -1, -1):
        if pict_types[j] in ("I", "P"):
            return j
    return -1


def decode_sample(data: bytes, clean: list[tuple], settings: EncodeSettings) -> dict:
    """Decode an encode with side info; return the arrays stored for training."""
    dec, sides = [], []
    with open_video(io.BytesIO(data)) as reader:
        info = reader.info
        for fr in reader:
            dec.append(fr.planes)
            sides.append(fr.side)
    n = min(len(dec), len(clean))
    h, w = clean[0][0].shape
    hm, wm = -(-h // 16), -(-w // 16)
    picts = [s.pict_type for s in sides[:n]]
    qp_map = np.full((n, hm, wm), np.nan, np.float32)
    part = np.zeros((n, hm, wm), np.uint8)
    ref = np.zeros((n, h * 3 // 2, w), np.uint8)
    ref_valid = np.zeros((n, -(-h // 8), -(-w // 8)), bool)
    frame_qp = np.full(n, np.nan, np.float32)
    for t in range(n):
        s = sides[t]
        if s.qp_map is not None:
            qp_map[t] = s.qp_map
        if s.qp is not None:
            frame_qp[t] = s.qp
        if s.partition is not None:
            part[t] = s.partition
        a = anchor_index(picts, t)
        if a >= 0 and s.mv_past is not None:
            warped = warp_reference(
                planes_to_tensor(dec[a])[None], flow_plane_full(s.mv_past, s.mv_past_valid, h, w)
            )[0]
            y, u, v = tensor_to_planes(warped, h, w)
            ref[t] = np.concatenate([y, u.reshape(-1, w), v.reshape(-1, w)], 0)
            ref_valid[t] = s.mv_past_valid

    def pack(ps):
        return np.stack([np.concatenate([p[0], p[1].reshape(-1, w), p[2].reshape(-1, w)])
                         for p in ps[:n]])  # fmt: skip

    crf = info.rate_control.crf
    return {
        "clean": pack(clean),
        "dec": pack(dec),
        "ref": ref,
        "ref_valid": ref_valid,
        "qp_map": qp_map,
        "partition": part,
        "pict": np.array([PICT_CODES.get(p, 3) for p in picts], np.uint8),
        "frame_qp": frame_qp,
        "crf": np.float32(settings.crf if crf is None else crf),
        "codec": settings.codec,
    }


def unpack_yuv(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H*3/2, W) packed yuv420p -> (Y, U, V)."""
    h = packed.shape[0] * 2 // 3
    w = packed.shape[1]
    uv = packed[h:].reshape(2, h // 2, w // 2)
    return packed[:h], uv[0], uv[1]


# ---------------------------------------------------------------- building the cache


def build(
    footage: Path,
    out: Path,
    *,
    validation: bool,
    count: int,
    seed: int = 0,
    frames: int = 6,
    size: tuple[int, int] = (256, 256),
    val_crfs: tuple[float, ...] = (17, 22, 27, 32, 37, 42, 47),
    val_codec: str = "libx264",
    worker: int = 0,
    workers: int = 1,
) -> int:
    """Write ``count`` samples (train) or the fixed validation set into ``out``; resumable."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    sources = split_sources(footage_sources(footage), validation)
    photos = [p for _, p in sources if p.parent.name == "photos"]
    clips = [(n, p) for n, p in sources if p.parent.name == "clips"]
    clip_cache: dict[str, list] = {}
    written = 0
    jobs = []
    if validation:
        for i, (name, p) in enumerate(sources):
            tag = "" if val_codec == "libx264" else f"_{val_codec}"
            for crf in val_crfs:
                jobs.append((f"{name}{tag}_crf{crf:g}", p, i, crf))
    else:
        jobs = [(f"s{k:05d}", None, k, None) for k in range(count)]
    for j, (key, path, k, crf) in enumerate(jobs):
        if j % workers != worker:
            continue
        target = out / f"{key}.npz"
        if target.exists():
            continue
        rng = np.random.default_rng([seed, k, 1 if validation else 0])
        if validation:
            settings = EncodeSettings(codec=val_codec, crf=float(crf))
            clean = _clean_sequence(path, photos, clips, clip_cache, rng, frames=8,
                                    size=(384, 256))  # fmt: skip
        else:
            settings = random_settings(rng)
            use_clip = clips and rng.random() < 0.25
            if use_clip:
                _, cpath = clips[rng.integers(len(clips))]
                clean = _clean_sequence(cpath, photos, clips, clip_cache, rng, frames, size)
            else:
                clean = _clean_sequence(photos[rng.integers(len(photos))], photos, clips,
                                        clip_cache, rng, frames, size)  # fmt: skip
        try:
            sample = decode_sample(encode_planes(clean, settings), clean, settings)
        except Exception as exc:  # one bad encode must not stop a long build
            print(f"skipping {key}: {type(exc).__name__}: {exc}", flush=True)
            continue
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, **sample)
        os.replace(tmp, target)
        written += 1
    (out / "meta.json").write_text(json.dumps({"validation": validation, "seed": seed}))
    return written


def _clean_sequence(path, photos, clips, clip_cache, rng, frames, size):
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
        return [(y[y0:y0 + ch, x0:x0 + cw], u[y0 // 2:(y0 + ch) // 2, x0 // 2:(x0 + cw) // 2],
                 v[y0 // 2:(y0 + ch) // 2, x0 // 2:(x0 + cw) // 2]) for y, u, v in seq]  # fmt: skip
    others = [p for p in photos if p != path]
    return [rgb_to_yuv420(f) for f in photo_sequence(path, others, rng, size, frames)]


def load_cache(folder: Path) -> list[dict]:
    return [dict(np.load(p)) for p in sorted(folder.glob("*.npz")) if ".tmp" not in p.name]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build the cached training/validation set.")
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    n = build(a.footage, a.out, validation=a.validation, count=a.count, seed=a.seed,
              worker=a.worker, workers=a.workers)  # fmt: skip
    print(f"wrote {n} samples to {a.out}")


def frame_inputs(sample: dict, t: int, crop: tuple[int, int, int] | None = None,
                 blind: bool = False, drop_ref: bool = False):  # fmt: skip
    """FrameInputs (and the clean target) for frame ``t`` of a cached sample.

    ``crop`` = (y0, x0, size) in luma pixels, multiples of 16 so block phase is kept.
    ``blind`` hides every piece of side information except what an HEVC stream
    or an unknown input would still give (the CRF from the options SEI, if any).
    """
    from enhancer.features import mask_plane, partition_planes, qp_plane
    from enhancer.inputs import FrameInputs

    dec, clean, ref = sample["dec"][t], sample["clean"][t], sample["ref"][t]
    h = dec.shape[0] * 2 // 3
    w = dec.shape[1]
    if crop is None:
        y0, x0, ch, cw = 0, 0, h, w
    else:
        y0, x0, size = crop
        ch = cw = size

    def cut(packed):
        y, u, v = unpack_yuv(packed)
        cy, cx = slice(y0 // 2, (y0 + ch) // 2), slice(x0 // 2, (x0 + cw) // 2)
        return y[y0 : y0 + ch, x0 : x0 + cw], u[cy, cx], v[cy, cx]

    cur = planes_to_tensor(cut(dec))
    target = planes_to_tensor(cut(clean))
    hh, ww = cur.shape[1:]
    codec = str(sample["codec"])
    crf = float(sample["crf"])
    pict = "IPB?"[int(sample["pict"][t])]
    qmap_arr = sample["qp_map"][t]
    has_side = codec == "libx264" and not np.isnan(qmap_arr).any() and not blind
    if not has_side:
        return FrameInputs(cur=cur, pict_type=pict if codec == "libx265" else "?", seq_qp=crf,
                           seq_known=True), target  # fmt: skip
    m0, m1 = y0 // 16, x0 // 16
    mh, mw = -(-ch // 16), -(-cw // 16)
    g0, g1 = y0 // 8, x0 // 8
    valid = sample["ref_valid"][t][g0 : g0 + -(-ch // 8), g1 : g1 + -(-cw // 8)]
    has_ref = bool(valid.any()) and not drop_ref
    ref_t = planes_to_tensor(cut(ref)) if has_ref else None
    mask = mask_plane(valid, hh, ww) if has_ref else None
    return FrameInputs(
        cur=cur,
        ref=ref_t,
        ref_mask=mask,
        qmap=qp_plane(qmap_arr[m0 : m0 + mh, m1 : m1 + mw], hh, ww),
        parts=partition_planes(sample["partition"][t][m0 : m0 + mh, m1 : m1 + mw], hh, ww),
        frame_qp=float(sample["frame_qp"][t]),
        pict_type=pict,
        seq_qp=crf,
        seq_known=True,
    ), target

