"""`vqe train`: build the cached dataset, train with deep supervision, validate, calibrate, export.

The defaults are the recipe's first run; the shipped weights add two
fine-tuning runs (see enhancer/MODEL_CARD.md for the commands). Everything
is resumable: the dataset build skips samples already on disk, and training
restarts from ``WORK/last.pt``. The log (``WORK/train.log``) prints, at every
validation, ΔPSNR-Y per CRF on held-out sources for each exit and for the
blind path, so a model that collapses to identity (all ~0) or learns to blur
(negative at low CRF) shows immediately.

Loss: Charbonnier on the YUV stack (Y weighted 1, U/V 0.5; ``--charb-eps``: 1e-3
is L1-like and median-seeking, 1e-2 quadratic below ~2.5 grey levels, which PSNR
rewards and which the last fine-tuning used), each sample
weighted by 2^(-(QP-37)/6), the inverse of how coding error grows with QP.
Without that, heavily compressed samples dominate and the model learns
corrections that hurt lightly compressed video. (Dividing each sample by its
own input error instead was tried first: near-perfect flat patches then get
enormous weights and the model collapses to the identity.) Every exit is
supervised. The log shows the training ΔPSNR-Y and the loss relative to the
input's own error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from enhancer.checkpoint import load_model, save_model
from enhancer.data import build, frame_inputs, load_cache
from enhancer.evaluate import format_table, score, validate
from enhancer.features import phase_planes
from enhancer.inputs import collate
from enhancer.model import ModelConfig, QPEstimator, VQENet
from enhancer.policy import calibrate

CHANNEL_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5]).view(1, 6, 1, 1)
ABLATIONS = ("temporal", "qp_map", "partitions", "phase", "use_experts", "frame_cond")


def qp_weight(qp: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight that evens out the error scale across QPs (1 at QP 37)."""
    return torch.pow(2.0, -(qp.float().clamp(10, 51) - 37.0) / 6.0)


def charbonnier(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample weighted Charbonnier distance, (B,)."""
    d = torch.sqrt((a - b) ** 2 + eps * eps) * CHANNEL_WEIGHTS.to(a)
    return d.flatten(1).mean(1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)


class PatchSampler:
    """Random MB-aligned patches with dihedral augmentation and side-info dropout."""

    def __init__(self, samples: list[dict], patch: int, seed: int, blind_p: float,
                 drop_ref_p: float):  # fmt: skip
        fits = lambda s: min(s["dec"].shape[1] * 2 // 3, s["dec"].shape[2]) >= patch  # noqa: E731
        self.samples = [s for s in samples if fits(s)]
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        self.blind_p, self.drop_ref_p = blind_p, drop_ref_p

    def batch(self, n: int):
        items, targets = [], []
        for _ in range(n):
            s = self.samples[self.rng.integers(len(self.samples))]
            t = int(self.rng.integers(len(s["dec"])))
            h, w = s["dec"].shape[1] * 2 // 3, s["dec"].shape[2]
            y0 = int(self.rng.integers(0, (h - self.patch) // 16 + 1)) * 16
            x0 = int(self.rng.integers(0, (w - self.patch) // 16 + 1)) * 16
            item, target = frame_inputs(
                s, t, (y0, x0, self.patch),
                blind=self.rng.random() < self.blind_p,
                drop_ref=self.rng.random() < self.drop_ref_p,
            )  # fmt: skip
            if self.rng.random() < 0.15:  # streams without an options SEI: CRF unknown
                item.seq_qp, item.seq_known = None, False
            k = int(self.rng.integers(8))
            items.append(_augment(item, k))
            targets.append(_dihedral(target, k))
        return items, torch.stack(targets)


def _dihedral(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """One of 8 flips/transposes. Y phases are permuted with the pixels: done on full-res luma."""
    if x is None:
        return None
    if x.shape[0] == 6:
        y = torch.nn.functional.pixel_shuffle(x[None, :4], 2)[0]
        y = _dihedral(y, k)
        uv = _dihedral(x[4:], k)
        return torch.cat([torch.nn.functional.pixel_unshuffle(y[None], 2)[0], uv], 0)
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x.contiguous()


def _augment(item, k: int):
    item.cur = _dihedral(item.cur, k)
    item.ref = _dihedral(item.ref, k)
    item.ref_mask = _dihedral(item.ref_mask, k)
    item.qmap = _dihedral(item.qmap, k)
    item.parts = _dihedral(item.parts, k)
    return item


class Log:
    def __init__(self, path: Path):
        self.f = path.open("a")

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def build_dataset(footage: Path, work: Path, count: int, seed: int, workers: int, log) -> None:
    for name, validation, n in (("val", True, 0), ("train", False, count)):
        out = work / "cache" / name
        have = len(list(out.glob("*.npz"))) if out.exists() else 0
        log(f"dataset {name}: {have} samples cached, building the rest")
        t0 = time.time()
        with ProcessPoolExecutor(workers) as pool:
            futs = [pool.submit(build, footage, out, validation=validation, count=n, seed=seed,
                                worker=i, workers=workers) for i in range(workers)]  # fmt: skip
            written = sum(f.result() for f in futs)
        log(f"dataset {name}: wrote {written} in {time.time() - t0:.0f}s")


def train(args) -> Path:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "train.log")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if not args.skip_build:
        build_dataset(Path(args.footage), work, args.train_count, args.seed, args.workers, log)
    val_set = load_cache(work / "cache" / "val")
    if args.export_only:
        return export(work, val_set, args, log)
    train_set = load_cache(work / "cache" / "train")
    log(f"loaded {len(train_set)} train / {len(val_set)} validation samples")

    cfg = ModelConfig(channels=args.channels, stages=args.stages, blocks_per_stage=args.blocks)
    for name in args.disable or []:
        setattr(cfg, name, False)
    model, est = VQENet(cfg), QPEstimator()
    params = list(model.parameters()) + list(est.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    model_params = list(model.parameters())
    step, best = 0, -math.inf
    last = work / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        est.load_state_dict(ck["estimator"])
        opt.load_state_dict(ck["opt"])
        step, best = ck["step"], ck["best"]
        log(f"resumed from step {step} (best score {best:+.3f})")
    elif args.init:
        init = torch.load(args.init, map_location="cpu", weights_only=False)
        if init.get("format"):  # an exported model file (fp16)
            init_model, init_est, _, meta = load_model(args.init)
            init = {"model": init_model.state_dict(), "estimator": init_est.state_dict(),
                    "step": meta.get("step")}  # fmt: skip
        model.load_state_dict({k: v.float() for k, v in init["model"].items()})
        est.load_state_dict({k: v.float() for k, v in init["estimator"].items()})
        log(f"initialised from {args.init} (trained {init.get('step')} steps)")
    log(f"config {json.dumps(cfg.to_dict())}; {sum(p.numel() for p in model.parameters())} params")
    sampler = PatchSampler(train_set, args.patch, args.seed + step, args.blind_p, args.drop_ref_p)
    phase = phase_planes(args.patch // 2, args.patch // 2)[None]
    t0, running = time.time(), []
    while step < args.steps:
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        if step < 300:
            lr *= (step + 1) / 300
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        est.train()
        items, target = sampler.batch(args.batch)
        batch = collate(items, model, est)
        outs = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond)
        base = charbonnier(batch.x, target, args.charb_eps).detach() + 1e-4
        weight = qp_weight(batch.frame_qp) * 30.0
        per_stage = [charbonnier(o, target, args.charb_eps) for o in outs]
        loss = sum((c * weight).mean() for c in per_stage) / len(per_stage)
        with torch.no_grad():
            stage_losses = [(c / base).mean() for c in per_stage]
            gain = (10 * torch.log10(_mse(batch.x, target) / _mse(outs[-1], target))).mean()
        known = [i for i, it in enumerate(items) if it.qmap is not None]
        est_loss = torch.zeros(())
        if known:
            pred = est(batch.x[known], phase)
            truth = torch.stack([items[i].qmap[:, ::8, ::8] for i in known])
            est_loss = (pred - truth).abs().mean()
        opt.zero_grad(set_to_none=True)
        (loss + est_loss).backward()
        # Clip the enhancer only: one global clip shrank the estimator's gradients to nothing.
        torch.nn.utils.clip_grad_norm_(model_params, 10.0)
        opt.step()
        step += 1
        est_qp = float(est_loss.detach()) * 51
        running.append([float(v) for v in stage_losses] + [float(gain), est_qp])
        if step % args.log_every == 0:
            r = np.mean(running, 0)
            running = []
            rate = args.log_every / (time.time() - t0)
            t0 = time.time()
            stages = " ".join(f"s{i + 1}={v:.4f}" for i, v in enumerate(r[:-2]))
            log(f"step {step} lr {lr:.2e} rel-charb {stages} train-dPSNR {r[-2]:+.3f} dB "
                f"est-L1 {r[-1]:.2f} QP {rate:.2f} it/s")
        if step % args.val_every == 0 or step == args.steps:
            res = validate(model, est, val_set, max_frames=args.val_frames)
            sc = score(res, cfg.stages)
            log(f"validation at step {step} (ΔPSNR-Y dB vs input, held-out sources), "
                f"score {sc:+.4f}\n" + format_table(res, cfg.stages))
            ck = {"model": model.state_dict(), "estimator": est.state_dict(),
                  "opt": opt.state_dict(), "step": step, "best": max(best, sc),
                  "config": cfg.to_dict()}  # fmt: skip
            if sc > best:
                best = sc
                torch.save(ck, work / "best.pt")
                log(f"new best {best:+.4f}")
            torch.save(ck, last)
            t0 = time.time()
    return export(work, val_set, args, log)


def export(work: Path, val_set, args, log) -> Path:
    ck = torch.load(work / "best.pt", map_location="cpu", weights_only=False)
    model, est = VQENet(ModelConfig.from_dict(ck["config"])), QPEstimator()
    model.load_state_dict(ck["model"])
    est.load_state_dict(ck["estimator"])
    res = validate(model, est, val_set, max_frames=64)
    policy = calibrate(res["records"], model.cfg.stages)
    log("final validation (best checkpoint, all frames)\n" + format_table(res, model.cfg.stages))
    log(f"exit policy: edges {policy.edges} stages {policy.stages}")
    # HEVC gets its own table: the model gains less there (10 % of training, blind path).
    hevc_dir = work / "cache" / "val-hevc"
    build(Path(args.footage), hevc_dir, validation=True, count=0, seed=args.seed,
          val_codec="libx265")
    hevc = validate(model, est, load_cache(hevc_dir), max_frames=64, blind=False)
    log("x265 validation (blind path)\n" + format_table(hevc, model.cfg.stages))
    hevc_policy = calibrate(hevc["hevc_records"], model.cfg.stages)
    policy.hevc_stages, policy.hevc_gains = hevc_policy.stages, hevc_policy.gains
    log(f"HEVC exit policy: stages {policy.hevc_stages}")
    meta = {"version": args.version, "step": ck["step"], "recipe": vars(args) | {"work": str(work)},
            "validation": {str(k): v for k, v in res["crf"].items()}}  # fmt: skip
    out = work / f"{args.version}.pt"
    save_model(out, model, est, policy, meta)
    log(f"exported {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="build the dataset and train the enhancement model")
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--footage", default="../shared/footage", help="clean photos/ and clips/")
    p.add_argument("--work", default="runs/vqe-v1", help="cache, checkpoints and log")
    p.add_argument("--version", default="vqe-v1")
    p.add_argument("--train-count", type=int, default=2400, help="encoded training sequences")
    p.add_argument("--steps", type=int, default=11000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=112, help="luma patch size (multiple of 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--charb-eps", type=float, default=1e-3,
                   help="Charbonnier epsilon (pixel scale 0-1): errors below it are penalised "
                   "quadratically (mean-seeking), above it linearly (median-seeking)")
    p.add_argument("--blind-p", type=float, default=0.2)
    p.add_argument("--drop-ref-p", type=float, default=0.1)
    p.add_argument("--disable", nargs="*", choices=ABLATIONS, help="ablate model parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="dataset build processes")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--val-frames", type=int, default=4)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="calibrate and export WORK/best.pt without training")
    p.add_argument("--init", help="start from an exported model file (fine-tuning) instead of "
                   "random weights; ignored when WORK/last.pt exists")


def run(args) -> int:
    out = train(args)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m enhancer.train", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
