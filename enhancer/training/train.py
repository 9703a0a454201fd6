"""`vqe train`: build the cached dataset, train with deep supervision, validate, calibrate, export.

Everything is resumable: the dataset build skips samples already on disk and
training restarts from ``WORK/last.pt``; ``--init`` warm-starts from an
exported model file (the committed weights), so a new machine loses nothing.
The log (``WORK/train.log``) prints, at every validation, ΔPSNR-Y per CRF on
held-out sources for each exit and for the blind path.

Steps run under bf16 autocast with channels_last where the CPU has AMX /
AVX-512 BF16 (about 5x faster than fp32 here) and on CUDA (``--device cuda``); ``--fp32`` turns
it off.

Loss: Charbonnier on the YUV stack (Y 1, U/V 0.5; epsilon 0.01, quadratic
below about 2.5 grey levels, which PSNR rewards), each sample weighted by
2^(-(QP-37)/6), the inverse of how coding error grows with QP, so heavily
compressed samples do not dominate. Every exit is supervised.

References as the recurrent engine gives them (``Engine(recurrent=True)``: a
frame borrows from its anchors' *enhanced* outputs). Before training and every
``--refresh-every`` steps the current model enhances every cached sequence's
anchors (training.anchors); ``--enhanced-p`` of the codec-aware samples borrow
from those, the rest from the decoded anchors, and validation always does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from enhancer.batch import collate
from enhancer.checkpoint import ModelFile, load_model, save_model
from enhancer.engine import pick_device
from enhancer.features import autocast, cpu_has_bf16, phase_planes
from enhancer.network import ModelConfig, QPEstimator, VQENet
from enhancer.pixel_qp import PixelQP
from enhancer.policy import calibrate
from enhancer.training.anchors import attach_all
from enhancer.training.data import build, load_cache
from enhancer.training.evaluate import (
    estimator_spread,
    format_table,
    score,
    validate,
)
from enhancer.training.samples import attach_pixel_crf, frame_inputs, true_qp_map

CHANNEL_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.5]).view(1, 6, 1, 1)
ABLATIONS = ("references", "qp_map", "partitions", "phase", "frame_cond")
# Validation spans CRF 17-47 (frame QP about 20-50): a working estimator spreads far wider.
ESTIMATOR_MIN_SPREAD = 5.0


def qp_weight(qp: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight that evens out the error scale across QPs (1 at QP 37)."""
    return torch.pow(2.0, -(qp.float().clamp(10, 51) - 37.0) / 6.0)


def charbonnier(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample weighted Charbonnier distance, (B,)."""
    d = torch.sqrt((a.float() - b) ** 2 + eps * eps) * CHANNEL_WEIGHTS.to(b)
    return d.flatten(1).mean(1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)


def log_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample log of the channel-weighted squared error, (B,): its mean over samples
    is, up to a constant, minus their mean PSNR, the measure bench/quality averages."""
    d = ((a.float() - b) ** 2) * CHANNEL_WEIGHTS.to(b)
    return torch.log(d.flatten(1).mean(1) + 1e-8)


class PatchSampler:
    """Random MB-aligned patches with dihedral augmentation and side-info dropout."""

    def __init__(
        self,
        samples,
        patch: int,
        seed: int,
        blind_p: float,
        drop_ref_p: float,
        enhanced_p: float = 0.0,
        crf_noise: float = 0.0,
        truth_p: float = 0.0,
    ):
        def side(s: dict) -> int:  # a sample's shorter side in luma pixels
            return min(s["dec"].shape[1] * 2 // 3, s["dec"].shape[2])

        self.samples = [s for s in samples if side(s) >= patch]
        if samples and not self.samples:
            largest = max(map(side, samples))
            raise SystemExit(f"--patch {patch} is larger than every training sample ({largest})")
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        self.blind_p, self.drop_ref_p, self.enhanced_p = blind_p, drop_ref_p, enhanced_p
        self.crf_noise = crf_noise
        self.truth_p = truth_p  # share of samples whose references are clean (truth guidance)

    def batch(self, n: int):
        """``n`` items and their clean targets; ``self.qmaps`` holds each item's true QP map
        (None where its stream has none), the QP estimator's target on either path."""
        items, targets, self.qmaps = [], [], []
        for _ in range(n):
            s = self.samples[self.rng.integers(len(self.samples))]
            t = int(self.rng.integers(len(s["dec"])))
            h, w = s["dec"].shape[1] * 2 // 3, s["dec"].shape[2]
            y0 = int(self.rng.integers(0, (h - self.patch) // 16 + 1)) * 16
            x0 = int(self.rng.integers(0, (w - self.patch) // 16 + 1)) * 16
            drops = tuple(bool(self.rng.random() < self.drop_ref_p) for _ in range(2))
            blind = self.rng.random() < self.blind_p
            enhanced = self.rng.random() < self.enhanced_p
            noise = float(self.rng.normal(0.0, self.crf_noise)) if blind else 0.0
            # Drawn only when on: runs without truth guidance sample as they did before.
            truth = self.truth_p > 0 and self.rng.random() < self.truth_p
            item, target = frame_inputs(
                s, t, (y0, x0, self.patch), blind, drops, enhanced, crf_noise=noise, truth=truth
            )
            # Streams without an options SEI: CRF unknown. Not on the blind path told the
            # pixel estimate, which the engine never runs without one.
            hide = self.rng.random() < 0.15
            if hide and not (blind and "pixel_crf" in s):
                item.seq_qp, item.seq_known = None, False
            k = int(self.rng.integers(8))
            items.append(_augment(item, k))
            # The inputs' own map where they carry it; else the map they were not given.
            if item.qmap is None:
                self.qmaps.append(_dihedral(true_qp_map(s, t, (y0, x0, self.patch, self.patch)), k))
            else:
                self.qmaps.append(item.qmap)
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
    for r in item.refs:
        if r is not None:
            r.pixels, r.cost = _dihedral(r.pixels, k), _dihedral(r.cost, k)
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


def build_dataset(
    footage: Path, work: Path, count: int, seed: int, workers: int, log, x265_share: float = 0.2
) -> None:
    for name, validation, n, codec in (
        ("val", True, 0, "libx264"),
        ("train", False, count, ""),
        ("val-hevc", True, 0, "libx265"),
    ):
        out = work / "cache" / name
        have = len(list(out.glob("*.npz"))) if out.exists() else 0
        log(f"dataset {name}: {have} samples cached, building the rest")
        t0 = time.time()
        job = partial(
            build,
            footage,
            out,
            validation=validation,
            count=n,
            seed=seed,
            val_codec=codec or "libx264",
            x265_share=x265_share,
        )
        if workers == 1:  # in this process (build sets one torch thread: restore ours)
            threads = torch.get_num_threads()
            written = job()
            torch.set_num_threads(threads)
        else:
            with ProcessPoolExecutor(workers) as pool:
                futs = [pool.submit(job, worker=i, workers=workers) for i in range(workers)]
                written = sum(f.result() for f in futs)
        log(f"dataset {name}: wrote {written} in {time.time() - t0:.0f}s")


def train(args) -> Path:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "train.log")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bf16 = _bf16(args, device)
    if not args.skip_build:
        build_dataset(
            Path(args.footage),
            work,
            args.train_count,
            args.seed,
            args.workers,
            log,
            args.x265_share,
        )
    val_set = load_cache(work / "cache" / "val")
    if args.export_only:
        return export(work, val_set, args, log)
    train_set = load_cache(work / "cache" / "train")
    export_val = val_set
    if args.codec:
        train_set = [s for s in train_set if str(s["codec"]) == args.codec]
        if not train_set:
            raise SystemExit(f"--codec {args.codec}: no training sequence of that codec")
        if args.codec == "libx265":
            val_set = load_cache(work / "cache" / "val-hevc")
        log(f"--codec {args.codec}: its training sequences only, selected on its validation")
    if args.blind_only:
        args.blind_p, args.enhanced_p, args.truth_guidance = 1.0, 0.0, 0.0
        log("--blind-only: every sample blind, selected on the blind column")
    log(
        f"loaded {len(train_set)} train / {len(val_set)} validation samples; "
        f"device {device}, bf16 {bf16}"
    )

    cfg = ModelConfig(
        channels=args.channels,
        stages=args.stages,
        blocks_per_stage=args.blocks,
        coarse=args.coarse,
    )
    for name in args.disable or []:
        setattr(cfg, name, False)
    model, est = VQENet(cfg), QPEstimator()
    model = model.to(device, memory_format=torch.channels_last)
    est = est.to(device)
    coarse = list(model.coarse.parameters()) if model.coarse is not None else []
    in_coarse = set(map(id, coarse))
    body = [p for p in model.parameters() if id(p) not in in_coarse]
    groups, base_lrs = [{"params": body + list(est.parameters())}], [args.lr]
    if coarse:
        groups.append({"params": coarse})
        base_lrs.append(args.lr if args.coarse_lr is None else args.coarse_lr)
    opt = torch.optim.Adam(groups, lr=args.lr)
    model_params = list(model.parameters())
    step, best = 0, -math.inf
    last = work / "last.pt"
    resumed = None
    if last.exists():
        ck = resumed = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ck.get("train_model", ck["model"]))
        est.load_state_dict(ck["estimator"])
        opt.load_state_dict(ck["opt"])  # its state moves to the parameters' device
        step, best = ck["step"], ck["best"]
        log(f"resumed from step {step} (best score {best:+.3f})")
    elif args.init:
        blob = torch.load(args.init, map_location="cpu", weights_only=False)
        if isinstance(blob, dict) and blob.get("format"):  # an exported model file (fp16)
            init = load_model(args.init)
            init_model, init_est, meta = init.network, init.estimator, init.meta
            blob = {
                "model": init_model.state_dict(),
                "estimator": init_est.state_dict(),
                "step": meta.get("step"),
            }
        # A network grown by a coarse branch starts from one without it (the branch's
        # output starts at zero); anything else that differs is a mismatch.
        try:
            missing, unexpected = model.load_state_dict(
                {k: v.float() for k, v in blob["model"].items()}, strict=False
            )
        except RuntimeError as exc:  # shapes differ
            raise SystemExit(f"--init {args.init} does not fit this config: {exc}") from None
        if unexpected or any(not k.startswith("coarse.") for k in missing):
            raise SystemExit(f"--init {args.init} does not fit this config: {missing, unexpected}")
        est.load_state_dict({k: v.float() for k, v in blob["estimator"].items()})
        log(f"initialised from {args.init} (trained {blob.get('step')} steps)")
    ema = _averaged(model, args.ema)
    if resumed is not None and ema is not None:  # what was validated goes on averaging
        ema.module.load_state_dict(resumed["model"])
    shipped = ema.module if ema is not None else model  # validated, refreshed, exported
    log(f"config {json.dumps(cfg.to_dict())}; {sum(p.numel() for p in model.parameters())} params")
    # The blind path is told the CRF the pixel estimate reads, as in the engine.
    t_p = time.time()
    n = attach_pixel_crf(train_set + val_set, pixel_estimate(args), work / "cache")
    log(f"pixel CRF estimate of {n} sequences in {time.time() - t_p:.0f}s")
    sampler = PatchSampler(
        train_set,
        args.patch,
        args.seed + step,
        args.blind_p,
        args.drop_ref_p,
        args.enhanced_p,
        args.crf_noise,
    )

    def refresh() -> None:  # the references the engine would hand this model
        t_r = time.time()
        n = attach_all(train_set, shipped, est, bf16=bf16)
        log(f"enhanced the anchors of {n} training sequences in {time.time() - t_r:.0f}s")

    if args.enhanced_p > 0 and (step > 0 or args.init):
        refresh()
    phase = phase_planes(args.patch // 2, args.patch // 2)[None].to(device)
    t0, running = time.time(), []
    while step < args.steps:
        schedule = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        if step < 300 and not args.init:
            schedule *= (step + 1) / 300
        lr = args.lr * schedule
        for g, base_lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base_lr * schedule
        decay = args.truth_decay * args.steps
        sampler.truth_p = args.truth_guidance * max(0.0, 1.0 - step / decay) if decay else 0.0
        model.train()
        est.train()
        items, target = sampler.batch(args.batch)
        target = target.to(device)
        with autocast(device.type, enabled=bf16):
            batch = collate(items, model, est, device)
            inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
            outs = model(batch.x, inputs, batch.seq_cond, batch.frame_cond)
        x = batch.x.float()
        base = charbonnier(x, target, args.charb_eps).detach() + 1e-4
        weight = qp_weight(batch.frame_qp) * 30.0
        per_stage = [charbonnier(o, target, args.charb_eps) for o in outs]
        loss = sum((c * weight).mean() for c in per_stage) / len(per_stage)
        if args.loss != "charbonnier":
            log_term = sum(log_mse(o, target).mean() for o in outs) / len(outs)
            loss = log_term if args.loss == "psnr" else loss + args.psnr_weight * log_term
        with torch.no_grad():
            stage_losses = [(c / base).mean() for c in per_stage]
            gain = (10 * torch.log10(_mse(x, target) / _mse(outs[-1], target))).mean()
        # The estimator learns the true map on blind samples too: it is their QP map.
        known = [i for i, q in enumerate(sampler.qmaps) if q is not None]
        est_loss = torch.zeros((), device=device)
        if known:
            with autocast(device.type, enabled=bf16):
                pred = est(x[known], phase)
            truth = torch.stack([sampler.qmaps[i][:, ::8, ::8] for i in known]).to(device)
            est_loss = (pred.float() - truth).abs().mean()
        opt.zero_grad(set_to_none=True)
        (loss + est_loss).backward()
        # Clip the enhancer only: one global clip shrank the estimator's gradients to nothing.
        torch.nn.utils.clip_grad_norm_(model_params, 10.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        est_qp = float(est_loss.detach()) * 51
        running.append([float(v) for v in stage_losses] + [float(gain), est_qp])
        if step % args.log_every == 0:
            r = np.mean(running, 0)
            running = []
            rate = args.log_every / (time.time() - t0)
            t0 = time.time()
            stages = " ".join(f"s{i + 1}={v:.4f}" for i, v in enumerate(r[:-2]))
            log(
                f"step {step} lr {lr:.2e} rel-charb {stages} train-dPSNR {r[-2]:+.3f} dB "
                f"est-L1 {r[-1]:.2f} QP {rate:.2f} it/s"
            )
        if step % args.val_every == 0 or step == args.steps:
            attach_all(val_set, shipped, est, bf16=bf16)
            res = validate(
                shipped, est, val_set, max_frames=args.val_frames, bf16=bf16, enhanced=True
            )
            sc = score(res, cfg.stages, paths=("blind",) if args.blind_only else None)
            log(
                f"validation at step {step} (ΔPSNR-Y dB vs input, held-out sources), "
                f"score {sc:+.4f}\n" + format_table(res, cfg.stages)
            )
            spread = estimator_spread(res)
            if spread is not None and spread < ESTIMATOR_MIN_SPREAD:
                log(
                    f"WARNING: the QP estimator spans {spread:.1f} QP over the validation CRFs: "
                    "it has collapsed toward a constant"
                )
            ck = {
                "model": shipped.state_dict(),
                "train_model": model.state_dict(),
                "estimator": est.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "best": max(best, sc),
                "config": cfg.to_dict(),
            }
            if sc > best:
                best = sc
                torch.save(ck, work / "best.pt")
                log(f"new best {best:+.4f}")
            torch.save(ck, last)
            if args.enhanced_p > 0 and step % args.refresh_every == 0 and step < args.steps:
                refresh()
            t0 = time.time()
    return export(work, export_val, args, log)


def _averaged(model: VQENet, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights; None for ``decay`` 0.

    Validation of the raw weights swings by about 0.05 dB between checkpoints 500
    steps apart; the average is what is validated and exported.
    """
    if not decay:
        return None
    swa = torch.optim.swa_utils
    ema = swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.n_averaged.fill_(1)  # the copy already holds the start: average from the first step
    return ema


def _init_file(args) -> ModelFile | None:
    """The ``--init`` model file; None for none or a training checkpoint."""
    try:
        return load_model(args.init) if args.init else None
    except ValueError:  # a training checkpoint: no pixel estimate, no meta
        return None


def pixel_estimate(args, init: ModelFile | None = None) -> PixelQP:
    """The pixel CRF estimate of the ``--init`` model file, else the default weights'."""
    return (init or _init_file(args) or load_model(None)).pixel_qp


def _bf16(args, device: torch.device) -> bool:
    """bf16 autocast unless ``--fp32``: on CUDA, and on CPUs that run it fast."""
    return not args.fp32 and (device.type == "cuda" or cpu_has_bf16())


def export(work: Path, val_set, args, log) -> Path:
    """Calibrate the exit policies on validation data and write the model file.

    A fine-tune keeps its ``--init`` file's output-rate tables (enhancer.output_rate):
    they were measured for weights that gain nearly the same, and without them the
    pipeline would fall back to vqe-v1's table. Re-run rate_calibration to refresh them.
    It keeps the file's ``references`` too (what the engine hands the network from its
    anchors, decided by bench/ablation.py for those weights), and the networks of the
    routes that have their own (trained apart: ``--codec``, ``--blind-only``).
    """
    ck = torch.load(work / "best.pt", map_location="cpu", weights_only=False)
    model, est = VQENet(ModelConfig.from_dict(ck["config"])), QPEstimator()
    model.load_state_dict(ck["model"])
    est.load_state_dict(ck["estimator"])
    device = pick_device(args.device)
    bf16 = _bf16(args, device)
    model, est = model.to(device), est.to(device)
    attach_all(val_set, model, est, bf16=bf16)
    init = _init_file(args)
    pixel_qp = pixel_estimate(args, init)
    attach_pixel_crf(val_set, pixel_qp, work / "cache")
    res = validate(model, est, val_set, max_frames=16, bf16=bf16, enhanced=True)
    policy = calibrate(res["records"], model.cfg.stages)
    # The blind tables come from recalibrate (through the engine); the estimate stays.
    log("final validation (best checkpoint, all frames)\n" + format_table(res, model.cfg.stages))
    log(f"exit policy: edges {policy.table().edges} stages {policy.table().stages}")
    hevc_set = load_cache(work / "cache" / "val-hevc")
    if hevc_set:
        attach_all(hevc_set, model, est, bf16=bf16)
        hevc = validate(model, est, hevc_set, max_frames=16, bf16=bf16, enhanced=True)
        log("x265 validation\n" + format_table(hevc, model.cfg.stages))
        hevc_policy = calibrate(hevc["hevc_records"], model.cfg.stages)
        policy.set_table("hevc", hevc_policy)
        log(f"HEVC exit policy: stages {policy.tables['hevc'].stages}")
    meta = {
        "version": args.version,
        "step": ck["step"],
        "recipe": vars(args) | {"work": str(work)},
        "validation": {str(k): v for k, v in res["crf"].items()},
    }
    own = init.own_networks if init is not None else {}
    routes = [f"{r}_{k}" for r in own for k in ("references", "network")]
    for key in ("references", "output_rate", *routes):
        if init is not None and key in init.meta:
            meta[key] = init.meta[key]
    if "output_rate" in meta:
        meta["output_rate_source"] = f"{args.init} (kept at export)"
    out = work / f"{args.version}.pt"
    save_model(out, model.cpu(), est.cpu(), policy, meta, pixel_qp, own)
    log(f"exported {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--footage", default="../shared/footage", help="clean photos/ and clips/")
    p.add_argument("--work", default="runs/vqe-v5", help="cache, checkpoints and log")
    p.add_argument("--version", default="vqe-v5")
    p.add_argument("--train-count", type=int, default=900, help="encoded training sequences")
    p.add_argument(
        "--x265-share",
        type=float,
        default=0.2,
        help="share of libx265 encodes among the training sequences this run builds "
        "(a larger --train-count adds sequences and keeps the cached ones)",
    )
    p.add_argument(
        "--codec",
        choices=["libx264", "libx265"],
        help="train on this codec's sequences only and select on its validation set "
        "(weights of a codec's own)",
    )
    p.add_argument(
        "--blind-only",
        action="store_true",
        help="train the blind path alone (every sample blind) and select on its validation "
        "column (weights of the blind path's own)",
    )
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=112, help="luma patch size (multiple of 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument(
        "--coarse",
        type=int,
        default=0,
        help="channels of the coarse context branch (network.CoarseContext; 0: none)",
    )
    p.add_argument(
        "--coarse-lr", type=float, help="learning rate of the coarse branch (default --lr)"
    )
    p.add_argument(
        "--charb-eps",
        type=float,
        default=1e-2,
        help="Charbonnier epsilon (pixel scale 0-1): errors below it are penalised "
        "quadratically (mean-seeking), above it linearly (median-seeking)",
    )
    p.add_argument(
        "--loss",
        choices=["charbonnier", "psnr", "mixed"],
        default="charbonnier",
        help="charbonnier: QP-weighted Charbonnier distance; psnr: the log of each "
        "patch's squared error, so that the mean PSNR gain itself is what is optimised "
        "(v17: +0.016 dB at most, -0.4 to -1.9 VMAF from CRF 37 up); mixed: the first "
        "plus --psnr-weight times the second",
    )
    p.add_argument("--psnr-weight", type=float, default=0.1, help="of the log error in mixed")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="decay of an exponential moving average of the weights, which is then what "
        "is validated, exported and enhances the training anchors (0: none)",
    )
    p.add_argument("--blind-p", type=float, default=0.25)
    p.add_argument("--drop-ref-p", type=float, default=0.1)
    p.add_argument(
        "--truth-guidance",
        type=float,
        default=0.0,
        help="share of samples whose references are the clean frames at step 0 (truth "
        "guidance), falling linearly to none at --truth-decay of the run",
    )
    p.add_argument("--truth-decay", type=float, default=0.5, help="fraction of --steps")
    p.add_argument(
        "--crf-noise",
        type=float,
        default=3.0,
        help="sd (QP) of noise on the blind path's pixel CRF estimate in training: the "
        "estimate errs more on unseen footage than on the sources it was fitted on",
    )
    p.add_argument(
        "--enhanced-p",
        type=float,
        default=0.8,
        help="share of codec-aware samples that borrow from enhanced anchors (as the engine)",
    )
    p.add_argument(
        "--refresh-every",
        type=int,
        default=2000,
        help="steps between re-enhancing the training anchors with the current model",
    )
    p.add_argument("--disable", nargs="*", choices=ABLATIONS, help="ablate model parts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="dataset build processes")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--val-frames", type=int, default=8)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or auto: where the steps, validation and anchor refreshes run "
        "(the data stays on the CPU; bf16 autocast on CUDA)",
    )
    p.add_argument("--skip-build", action="store_true")
    p.add_argument(
        "--export-only",
        action="store_true",
        help="calibrate and export WORK/best.pt without training",
    )
    p.add_argument(
        "--init",
        help="start from an exported model file (fine-tuning) instead of "
        "random weights; ignored when WORK/last.pt exists",
    )


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="build the dataset and train the enhancement model")
    add_arguments(p)


def run(args) -> int:
    print(train(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m enhancer.training.train", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
