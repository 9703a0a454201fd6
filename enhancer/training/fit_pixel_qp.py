"""Train the blind path's CRF-from-pixels estimate (enhancer.pixel_qp) and store it.

Encodes sequences of the training sources at random user-like settings
(enhancer.training.data.random_settings, as x264; some with camera noise
added to the clean source), decodes them through the bitstream reader for
the true QP of every macroblock, and trains PixelQPNet on grid-aligned
64x64 crops to predict their mean QP (bf16 autocast where the CPU has it).
The encodes are cached under ``--cache`` (one file per seed), so a rerun or
a longer run starts training at once; ``--init`` warm-starts from the
estimate a model file already holds (or from the last run's, kept in
``--cache``/last.json).

Reports, on the held-out sources at seven CRFs, the frame QP it reads and
the CRF the engine would hand the network (their mean over the sequence
less ``--offset``), and with ``--write`` stores it in the model file (its
``pixel_qp`` entry). About 6 minutes per seed of encodes and 10 for 4000 steps on 2 cores.

    python -m enhancer.training.fit_pixel_qp --footage ../shared/footage \\
        --write enhancer/weights/vqe-v5.pt
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from bitstream.reader import open_video
from enhancer.checkpoint import load_model
from enhancer.features import autocast, cpu_has_bf16
from enhancer.pixel_qp import PixelQP, PixelQPNet
from enhancer.training.data import EncodeSettings, encode_planes, random_settings
from enhancer.training.sources import clean_sequence, footage_sources, split_sources

SIZE = (384, 256)  # width, height of the training crops' sequences
CROP = 64
HELD_CRFS = (15, 22, 27, 32, 37, 42, 51)
HELD_SEED = 1234  # bench/quality.py's crops of the held-out sources


def _noisy(seq: list[tuple], sigma: float, rng: np.random.Generator) -> list[tuple]:
    if sigma <= 0:
        return seq
    return [
        (np.clip(y + rng.normal(0, sigma, y.shape), 0, 255).astype(np.uint8), u, v)
        for y, u, v in seq
    ]


def _restyled(seq: list[tuple], rng: np.random.Generator) -> list[tuple]:
    """The clean source made softer or crisper, flatter or punchier, before it is encoded.

    The estimate's error on held-out footage is content bias (a detailed source reads a
    higher QP at the same CRF): varying how much detail and contrast a training source has
    at every CRF keeps the network from reading the QP off the content.
    """
    kind = rng.choice(["none", "blur", "sharpen"], p=[0.4, 0.35, 0.25])
    gain, lift = (rng.uniform(0.6, 1.3), rng.uniform(-20, 20)) if rng.random() < 0.5 else (1, 0)
    sigma = rng.uniform(0.4, 1.5)
    amount = rng.uniform(0.3, 1.0)
    out = []
    for y, u, v in seq:
        f = y.astype(np.float32)
        if kind != "none":
            soft = Image.fromarray(y).filter(ImageFilter.GaussianBlur(sigma))
            soft = np.asarray(soft, np.float32)
            f = soft if kind == "blur" else f + amount * (f - soft)
        f = (f - 128) * gain + 128 + lift
        out.append((np.clip(np.round(f), 0, 255).astype(np.uint8), u, v))
    return out


def collect(
    sources, photos, sequences: int, frames: int, seed: int, crfs=None, augment: bool = False
) -> dict:
    """Decoded luma planes, their macroblock QP maps, the CRF and source of each frame."""
    ys, qms, crf_of, names, seq_of = [], [], [], [], []
    cache: dict = {}
    for i, (name, path) in enumerate(sources):
        for k in range(sequences):
            rng = np.random.default_rng([seed, i, k])
            seq = clean_sequence(path, photos, cache, rng, frames, SIZE)
            if augment:
                seq = _restyled(seq, rng)
            seq = _noisy(seq, float(rng.choice([0, 0, 1.5, 3.0])), rng)
            s = random_settings(rng) if crfs is None else EncodeSettings(crf=crfs[k % len(crfs)])
            s.codec = "libx264"  # the only encoder FFmpeg exports QP maps of
            with open_video(io.BytesIO(encode_planes(seq, s))) as r:
                for fr in r:
                    y = fr.planes[0]
                    if fr.side.qp_map is not None and y.shape == (SIZE[1], SIZE[0]):
                        ys.append(y)
                        qms.append(fr.side.qp_map)
                        crf_of.append(s.crf)
                        names.append(name)
                        seq_of.append(i * sequences + k)
    return {"y": np.stack(ys), "q": np.stack(qms), "crf": np.array(crf_of),
            "name": np.array(names), "seq": np.array(seq_of)}  # fmt: skip


def cached(path: Path, make) -> dict:
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    data = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def train(net: PixelQPNet, data: dict, steps: int, lr: float, log, batch: int = 64) -> None:
    y, q = data["y"], data["q"]
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    net.train()
    bf16 = cpu_has_bf16()
    t0, err = time.time(), 0.0
    mb = CROP // 16
    for step in range(1, steps + 1):
        i = rng.integers(0, len(y), batch)
        oy = rng.integers(0, (y.shape[1] - CROP) // 16 + 1, batch)
        ox = rng.integers(0, (y.shape[2] - CROP) // 16 + 1, batch)
        crops = np.stack([y[a, 16 * b : 16 * b + CROP, 16 * c : 16 * c + CROP]
                          for a, b, c in zip(i, oy, ox, strict=True)])  # fmt: skip
        truth = torch.tensor([q[a, b : b + mb, c : c + mb].mean()
                              for a, b, c in zip(i, oy, ox, strict=True)])  # fmt: skip
        if rng.random() < 0.5:  # mirrored content keeps its block grid (64 is a multiple of 16)
            crops = crops[:, :, ::-1]
        x = torch.from_numpy(crops.astype(np.float32) / 255.0)[:, None]
        with autocast(enabled=bf16):
            pred = net(x.contiguous(memory_format=torch.channels_last)).float().mean((1, 2, 3))
        loss = F.smooth_l1_loss(pred, truth, beta=2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        err = 0.98 * err + 0.02 * float((pred.detach() - truth).abs().mean())
        if step % 500 == 0 or step == steps:
            log(f"step {step}: training crops' mean |error| {err:.2f} QP ({time.time() - t0:.0f}s)")
    net.eval()


def report(est: PixelQP, held: dict, log) -> dict:
    """Per held-out CRF: true frame QP, the estimate, and the CRF the network would be told."""
    frame = np.array([est.frame_qp(y) for y in held["y"]])
    true = held["q"].reshape(len(frame), -1).mean(1)
    seq_crf = {s: est.crf(frame[held["seq"] == s]) for s in np.unique(held["seq"])}
    told = np.array([seq_crf[s] for s in held["seq"]])
    log(f"held-out frames {len(frame)}: mean |error| {np.abs(frame - true).mean():.2f} QP")
    seqs = np.unique(held["seq"])
    miss = np.array([seq_crf[s] - held["crf"][held["seq"] == s][0] for s in seqs])
    log(f"held-out sequences {len(seqs)}: told CRF - CRF sd {miss.std():.2f}")
    log(f"{'CRF':>4} {'true QP':>8} {'read QP':>8} {'told CRF':>9} {'min':>5} {'max':>5}")
    out = {}
    for c in HELD_CRFS:
        sel = held["crf"] == c
        crfs = [seq_crf[s] for s in np.unique(held["seq"][sel])]
        out[c] = {"qp": float(true[sel].mean()), "read": float(frame[sel].mean()),
                  "told": float(told[sel].mean()), "min": min(crfs), "max": max(crfs)}  # fmt: skip
        widths = zip(out[c].values(), (8, 8, 9, 5, 5), strict=True)
        log(f"{c:4d} " + " ".join(f"{v:{w}.1f}" for v, w in widths))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--cache", type=Path, default=Path("runs/pixel_qp"))
    ap.add_argument("--seeds", default="11,12", help="one set of training encodes per seed")
    ap.add_argument(
        "--restyled-seeds", default="",
        help="more training encodes, of sources blurred, sharpened or re-toned first",
    )  # fmt: skip
    ap.add_argument("--sequences", type=int, default=8, help="per training source and seed")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--offset", type=float, default=9.0, help="CRF told = mean read QP - this")
    ap.add_argument(
        "--init", type=Path, default=None, help="model file (or --cache's last.json) to start from"
    )
    ap.add_argument("--write", type=Path, default=None, help="model file to store it in")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    allsrc = footage_sources(args.footage)
    photos = [p for _, p in allsrc if p.parent.name == "photos"]
    train_src = split_sources(allsrc, validation=False)
    held_src = split_sources(allsrc, validation=True)
    held_photos = [p for _, p in held_src if p.parent.name == "photos"]
    plan = [(int(s), False) for s in args.seeds.split(",") if s]
    plan += [(int(s), True) for s in args.restyled_seeds.split(",") if s]
    parts = [
        cached(args.cache / f"train-{seed}{'-restyled' if aug else ''}.npz",
               lambda seed=seed, aug=aug: collect(
                   train_src, photos, args.sequences, args.frames, seed, augment=aug))
        for seed, aug in plan
    ]  # fmt: skip
    data = {k: np.concatenate([p[k] for p in parts]) for k in ("y", "q")}
    held = cached(
        args.cache / "held.npz",
        lambda: collect(held_src, held_photos, len(HELD_CRFS), 12, HELD_SEED, HELD_CRFS),
    )
    log(f"{len(data['y'])} training frames, {len(held['y'])} held-out")
    net = PixelQPNet(args.width)
    if args.init:
        if args.init.suffix == ".json":
            start = PixelQP.from_dict(json.loads(args.init.read_text()))
        else:
            start = load_model(args.init).pixel_qp
        if start and start.net.width == args.width:
            net.load_state_dict(start.net.state_dict())
            log(f"warm start from {args.init}")
    net = net.to(memory_format=torch.channels_last)
    train(net, data, args.steps, args.lr, log)
    est = PixelQP(net, args.offset)
    last = args.cache / "last.json"  # so that a run without --write is not lost (--init it)
    last.write_text(json.dumps(est.to_dict()))
    report(est, held, log)
    if args.write:
        replace(load_model(args.write), pixel_qp=est).save(args.write)
        log(f"stored in {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
