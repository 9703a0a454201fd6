"""Training and validation data for time: 16-frame sequences with a GOP, encoded as users do.

Clean sequences come from enhancer.training.sources (photos with a synthetic
camera, downscaled clips). Each is encoded with libx264 (x264's defaults as
people have them: B-pyramid, psy, 3 refs, with presets, B-frame counts,
reference counts and GOP lengths varied) or libx265, decoded through the
bitstream reader, and stored as one ``.npz``: clean and decoded frames,
QP/partition maps, picture types, frame QPs, the CRF, and for each frame
its four references already aligned to it (enhancer.references): the
quality-peak anchors before and after it, and the adjacent frames before and
after it, each with the per-block matching cost and the flow (so that
training.anchors can warp enhanced anchors the same way). The split is by
source.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from bitstream.reader import open_video
from bitstream.writer import frame_from_planes
from enhancer.align import apply_flow
from enhancer.features import planes_to_tensor, tensor_to_planes
from enhancer.references import align_reference, input_plan, reference_indices
from enhancer.training.sources import clean_sequence, footage_sources, split_sources

PICT_CODES = {"I": 0, "P": 1, "B": 2, "?": 3}
PRESETS = ["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"]
FRAMES = 16
SIZE = (256, 176)  # training crops (width, height)
VAL_SIZE = (384, 256)
VAL_CRFS = (17, 22, 27, 32, 37, 42, 47)
# reference slots stored per frame: (name, plan)
SLOTS = (
    ("peak_past", "peaks"),
    ("peak_future", "peaks"),
    ("adj_past", "adjacent"),
    ("adj_future", "adjacent"),
)


@dataclass
class EncodeSettings:
    codec: str = "libx264"
    crf: float = 27.0
    preset: str = "medium"
    bframes: int | None = None  # None: the encoder's default
    b_pyramid: str | None = None
    ref: int | None = None
    keyint: int | None = None

    def options(self) -> dict[str, str]:
        parts = []
        if self.bframes is not None:
            parts.append(f"bframes={self.bframes}")
        if self.keyint is not None:
            parts.append(f"keyint={self.keyint}")
        if self.codec == "libx265":
            params = ":".join(parts + ["log-level=none"])
            return {"crf": f"{self.crf:g}", "preset": self.preset, "x265-params": params}
        if self.b_pyramid is not None:
            parts.append(f"b-pyramid={self.b_pyramid}")
        if self.ref is not None:
            parts.append(f"ref={self.ref}")
        opts = {"crf": f"{self.crf:g}", "preset": self.preset}
        if parts:
            opts["x264-params"] = ":".join(parts)
        return opts


def random_settings(rng: np.random.Generator, x265_share: float = 0.2) -> EncodeSettings:
    """Mostly what users run (x264 medium defaults), with the usual variations;
    ``x265_share`` of the encodes are libx265."""
    crf = rng.uniform(17, 47) if rng.random() < 0.8 else rng.uniform(14, 51)
    codec = "libx265" if rng.random() < x265_share else "libx264"
    s = EncodeSettings(codec=codec, crf=round(float(crf), 1))
    if rng.random() < 0.5:
        s.preset = PRESETS[rng.integers(0, 6 if codec == "libx265" else len(PRESETS))]
    if rng.random() < 0.4:
        s.bframes = int(rng.choice([0, 1, 2, 3, 5]))
    if codec == "libx264" and rng.random() < 0.2:
        s.b_pyramid = "none"
    if codec == "libx264" and rng.random() < 0.4:
        s.ref = int(rng.choice([1, 2, 4, 5]))
    s.keyint = int(rng.choice([250, 250, 250, 48, 24, 12, 8]))
    return s


def encode_planes(
    planes: list[tuple],
    settings: EncodeSettings,
    rate: int = 25,
    *,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container: str = "mp4",
) -> bytes:
    """Encode planes of ``pix_fmt`` (uint16 above 8 bits) into an in-memory file.

    ``options`` replace ``settings.options()`` (other encoders than x264/x265).
    """
    buf = io.BytesIO()
    h, w = planes[0][0].shape
    with av.open(buf, "w", format=container) as out:
        st = out.add_stream(settings.codec, rate=rate)
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        st.options = settings.options() if options is None else options
        for i, yuv in enumerate(planes):
            frame = frame_from_planes(yuv, pix_fmt)
            frame.pts = i
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return buf.getvalue()


def pack(planes) -> np.ndarray:
    y, u, v = planes
    w = y.shape[1]
    return np.concatenate([y, u.reshape(-1, w), v.reshape(-1, w)])


def unpack_yuv(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H*3/2, W) packed yuv420p -> (Y, U, V)."""
    h = packed.shape[0] * 2 // 3
    w = packed.shape[1]
    uv = packed[h:].reshape(2, h // 2, w // 2)
    return packed[:h], uv[0], uv[1]


def decode_sample(data: bytes, clean: list[tuple], settings: EncodeSettings) -> dict:
    """Decode an encode with side info, align every reference slot; the arrays stored."""
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
    frame_qp = np.full(n, np.nan, np.float32)
    for t in range(n):
        s = sides[t]
        if s.qp_map is not None and s.sources.get("qp_map") == "bitstream":
            qp_map[t] = s.qp_map
        if s.qp is not None:
            frame_qp[t] = s.qp
        if s.partition is not None:
            part[t] = s.partition
    tens = [planes_to_tensor(p) for p in dec[:n]]
    plan_aware = input_plan(settings.codec)
    out = {}
    for name, kind in SLOTS:
        plan = plan_aware if kind == "peaks" else input_plan(settings.codec, "blind")
        past, future = reference_indices(picts, plan)
        idx = past if name.endswith("past") else future
        refs = np.zeros((n, h * 3 // 2, w), np.uint8)
        costs = np.ones((n, -(-h // 8), -(-w // 8)), np.float16)
        flows = np.zeros((n, 2, -(-h // 8), -(-w // 8)), np.float16)
        for t in range(n):
            j = idx[t]
            if j < 0:
                continue
            flow, cost = align_reference(
                tens[t], tens[j], sides[t], j - t, bitstream=plan.bitstream_vectors
            )
            warped = apply_flow(tens[j][None], flow[None])[0]
            refs[t] = pack(tensor_to_planes(warped, h, w))
            costs[t] = cost.numpy()
            flows[t] = flow.numpy()
        out[f"{name}_idx"] = np.array(idx, np.int16)
        out[name] = refs
        out[f"{name}_cost"] = costs
        out[f"{name}_flow"] = flows
    crf = info.rate_control.crf
    return out | {
        "clean": np.stack([pack(p) for p in clean[:n]]),
        "dec": np.stack([pack(p) for p in dec[:n]]),
        "qp_map": qp_map,
        "partition": part,
        "pict": np.array([PICT_CODES.get(p, 3) for p in picts], np.uint8),
        "frame_qp": frame_qp,
        "crf": np.float32(settings.crf if crf is None else crf),
        "codec": settings.codec,
    }


def build(
    footage: Path,
    out: Path,
    *,
    validation: bool,
    count: int,
    seed: int = 0,
    val_codec: str = "libx264",
    x265_share: float = 0.2,
    worker: int = 0,
    workers: int = 1,
) -> int:
    """Write ``count`` samples (train) or the fixed validation set into ``out``; resumable.

    Sample ``k`` is drawn from its own generator, so a larger ``count`` adds samples and
    keeps the ones there (``x265_share`` applies to the samples this call writes).
    """
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    sources = split_sources(footage_sources(footage), validation)
    photos = [p for _, p in sources if p.parent.name == "photos"]
    clips = [p for _, p in sources if p.parent.name == "clips"]
    cache: dict[str, list] = {}
    jobs = []
    if validation:
        tag = "" if val_codec == "libx264" else f"_{val_codec}"
        for i, (name, p) in enumerate(sources):
            jobs += [(f"{name}{tag}_crf{crf:g}", p, i, crf) for crf in VAL_CRFS]
    else:
        jobs = [(f"s{k:05d}", None, k, None) for k in range(count)]
    written = 0
    for j, (key, path, k, crf) in enumerate(jobs):
        target = out / f"{key}.npz"
        if j % workers != worker or target.exists():
            continue
        rng = np.random.default_rng([seed, k, 1 if validation else 0])
        if validation:
            settings = EncodeSettings(codec=val_codec, crf=float(crf))
            clean = clean_sequence(path, photos, cache, rng, FRAMES, VAL_SIZE)
        else:
            settings = random_settings(rng, x265_share)
            pool = clips if clips and rng.random() < 0.25 else photos
            clean = clean_sequence(pool[rng.integers(len(pool))], photos, cache, rng, FRAMES, SIZE)
        try:
            sample = decode_sample(encode_planes(clean, settings), clean, settings)
        except Exception as exc:  # one bad encode must not stop a long build
            print(f"skipping {key}: {type(exc).__name__}: {exc}", flush=True)
            continue
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, **sample)
        os.replace(tmp, target)
        written += 1
    meta = {"validation": validation, "seed": seed}
    if not validation:
        meta["x265_share"] = x265_share
    (out / "meta.json").write_text(json.dumps(meta))
    return written


def load_cache(folder: Path) -> list[dict]:
    return [dict(np.load(p)) for p in sorted(folder.glob("*.npz")) if ".tmp" not in p.name]
