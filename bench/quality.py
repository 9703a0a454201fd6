"""Quality benchmark: vqe against FFmpeg's own filters on held-out clean sources.

Builds the validation sequences (sources never trained on: see
enhancer.data.VALIDATION_SOURCES), encodes them itself with libx264 at CRF
22/27/32/37/42 and libx265 at 27/37, decodes them through the bitstream
reader, and measures ΔPSNR-Y and ΔSSIM-Y over the compressed input, with
each method's time per frame, for:

- vqe auto (bitstream side info + early-exit policy), vqe blind, vqe at each
  fixed stage count;
- FFmpeg deblock, nlmeans and bm3d through PyAV's filter graph, each at the
  strength that is best on this very data for every CRF (an oracle-tuned
  baseline, the strongest fair reading of them).

Prints a table and writes JSON (default bench/results/quality.json).

    python bench/quality.py --footage ../shared/footage
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitstream.reader import open_video  # noqa: E402
from enhancer.data import (  # noqa: E402
    EncodeSettings,
    _clean_sequence,
    encode_planes,
    footage_sources,
    split_sources,
)
from enhancer.engine import Engine  # noqa: E402

# 15 and 51 bound the range where vqe must never lose more than 0.02 dB.
X264_CRFS = (15, 22, 27, 32, 37, 42, 51)
CONFIGS = [("libx264", c) for c in X264_CRFS] + [("libx265", 27), ("libx265", 37)]
FILTERS = {
    "deblock": ["filter=weak:block=8", "filter=strong:block=8",
                "filter=strong:block=8:alpha=0.12:beta=0.07:gamma=0.06:delta=0.05"],
    "nlmeans": ["s=1", "s=2", "s=3.5", "s=6"],
    "bm3d": ["sigma=1", "sigma=2.5", "sigma=5", "sigma=9"],
}  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM on luma with the standard 11x11 Gaussian window (sigma 1.5)."""
    x = torch.from_numpy(a.astype(np.float64))[None, None]
    y = torch.from_numpy(b.astype(np.float64))[None, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def run_filter(frames: list, name: str, args: str) -> tuple[list[np.ndarray], float]:
    """Run an FFmpeg filter over decoded yuv420p frames; -> luma planes, seconds per frame."""
    h, w = frames[0].planes[0].shape
    g = av.filter.Graph()
    src = g.add_buffer(width=w, height=h, format="yuv420p", time_base=Fraction(1, 25))
    f = g.add(name, args)
    sink = g.add("buffersink")
    src.link_to(f)
    f.link_to(sink)
    g.configure()
    outs: list[np.ndarray] = []

    def drain():
        while True:
            try:
                outs.append(g.pull().to_ndarray()[:h])
            except (av.BlockingIOError, av.EOFError):
                return

    t0 = time.perf_counter()
    for i, fr in enumerate(frames):
        y, u, v = fr.planes
        arr = np.concatenate([y, u.reshape(-1, w), v.reshape(-1, w)], 0)
        vf = av.VideoFrame.from_ndarray(arr, format="yuv420p")
        vf.pts, vf.time_base = i, Fraction(1, 25)
        g.push(vf)
        drain()
    g.push(None)
    drain()
    return outs, (time.perf_counter() - t0) / len(frames)


def _cell(r: dict) -> str:
    return f"{r['dpsnr_y']:+.2f}/{r['dssim_y'] * 1000:+.1f}e-3/{r['ms_per_frame']:.0f}"


def decode(data: bytes):
    with open_video(io.BytesIO(data)) as r:
        return r.info, list(r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=8, help="frames per source sequence")
    ap.add_argument("--sources", type=int, default=0, help="limit the number of sources (0 = all)")
    ap.add_argument("--no-filters", action="store_true", help="skip the FFmpeg baselines")
    ap.add_argument("--configs", default="",
                    help="only these, e.g. x265:27,x264:37 (default: all)")
    ap.add_argument("--json-out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args(argv)
    configs = CONFIGS
    if args.configs:
        wanted = {(f"lib{c.split(':')[0]}", int(c.split(":")[1])) for c in args.configs.split(",")}
        configs = [c for c in CONFIGS if c in wanted]
        if not configs:
            ap.error(f"--configs: none of {args.configs} is among {CONFIGS}")

    sources = split_sources(footage_sources(args.footage), validation=True)
    if args.sources:
        sources = sources[: args.sources]
    photos = [p for _, p in sources if p.parent.name == "photos"]
    clips = [(n, p) for n, p in sources if p.parent.name == "clips"]
    clean_seqs = {}
    for i, (name, path) in enumerate(sources):
        rng = np.random.default_rng([1234, i])
        clean_seqs[name] = _clean_sequence(path, photos, clips, {}, rng, args.frames, (384, 256))

    probe = Engine(args.weights, device="cpu")
    stages = probe.max_stages
    methods = {"vqe auto": dict(stages="auto"), "vqe blind": dict(stages="auto", side_info="blind")}
    for n in range(1, stages + 1):
        methods[f"vqe {n} stage{'s' if n > 1 else ''}"] = dict(stages=n)
    engines = {m: Engine(args.weights, device="cpu", **kw) for m, kw in methods.items()}

    # acc[config][method] -> lists of per-frame ΔPSNR, ΔSSIM, seconds, stages
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for codec, crf in configs:
        key = f"{'x264' if codec == 'libx264' else 'x265'} CRF {crf}"
        for clean in clean_seqs.values():
            data = encode_planes(clean, EncodeSettings(codec=codec, crf=crf))
            info, frames = decode(data)
            base_p = [psnr(f.planes[0], c[0]) for f, c in zip(frames, clean, strict=False)]
            base_s = [ssim(f.planes[0], c[0]) for f, c in zip(frames, clean, strict=False)]
            acc[key]["input"]["psnr"] += base_p
            for m, eng in engines.items():
                for (out, rep), c, bp, bs in zip(eng.process(iter(frames), info), clean, base_p,
                                                 base_s, strict=False):  # fmt: skip
                    acc[key][m]["dpsnr"].append(psnr(out.planes[0], c[0]) - bp)
                    acc[key][m]["dssim"].append(ssim(out.planes[0], c[0]) - bs)
                    acc[key][m]["sec"].append(rep.seconds)
                    acc[key][m]["stages"].append(rep.stages)
            if args.no_filters:
                continue
            for fname, variants in FILTERS.items():
                for v in variants:
                    outs, sec = run_filter(frames, fname, v)
                    for o, c, bp, bs in zip(outs, clean, base_p, base_s, strict=False):
                        acc[key][f"{fname} {v}"]["dpsnr"].append(psnr(o, c[0]) - bp)
                        acc[key][f"{fname} {v}"]["dssim"].append(ssim(o, c[0]) - bs)
                        acc[key][f"{fname} {v}"]["sec"].append(sec)
        print(f"done {key}", file=sys.stderr, flush=True)

    table = {}
    for key, rows in acc.items():
        summary = {"input_psnr": float(np.mean(rows["input"]["psnr"]))}
        for m, cols in rows.items():
            if m == "input":
                continue
            summary[m] = {
                "dpsnr_y": float(np.mean(cols["dpsnr"])),
                "dssim_y": float(np.mean(cols["dssim"])),
                "ms_per_frame": 1000 * float(np.mean(cols["sec"])),
            }
            if cols["stages"]:
                summary[m]["mean_stages"] = float(np.mean(cols["stages"]))
        for fname, variants in FILTERS.items():  # oracle-tuned strength per config
            cands = [(summary[f"{fname} {v}"]["dpsnr_y"], v) for v in variants
                     if f"{fname} {v}" in summary]  # fmt: skip
            if cands:
                best = max(cands)[1]
                summary[f"{fname} (best)"] = summary[f"{fname} {best}"] | {"setting": best}
        table[key] = summary

    show = list(methods) + [f"{f} (best)" for f in FILTERS]
    print(f"{'config':14} {'input':>7} " + " ".join(f"{m[:16]:>16}" for m in show))
    print(" " * 23 + " ".join(f"{'dB / dSSIM / ms':>16}" for _ in show))
    for key, s in table.items():
        cells = []
        for m in show:
            r = s.get(m)
            cells.append(_cell(r) if r else "-")
        print(f"{key:14} {s['input_psnr']:7.2f} " + " ".join(f"{c:>16}" for c in cells))
    t22 = table.get("x264 CRF 22", {}).get("vqe auto", {}).get("ms_per_frame")
    t37 = table.get("x264 CRF 37", {}).get("vqe auto", {}).get("ms_per_frame")
    early = {"crf22_over_crf37_time": t22 / t37 if t22 and t37 else None}
    for key, s in table.items():
        full = s.get(f"vqe {stages} stages", {}).get("dpsnr_y")
        if full is not None:
            early[f"{key} auto_minus_all_stages_db"] = s["vqe auto"]["dpsnr_y"] - full
    print("early exit:", json.dumps(early))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"table": table, "early_exit": early,
                                         "sources": list(clean_seqs), "frames": args.frames},
                                        indent=1))  # fmt: skip
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
