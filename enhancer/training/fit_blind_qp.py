"""Fit the blind path's pixel-statistics QP estimate (enhancer.blind_qp) and store it.

Encodes sequences of the training sources at random user-like settings
(enhancer.training.data.random_settings, some with camera noise added to the
clean source), decodes them through the bitstream reader for the true frame
QP, and fits a ridge regression from the decoded pixels' statistics to it.
Reports the estimate per CRF on the held-out sources, and with ``--write``
stores it in the weights file's exit policy (``blind_qp``).

    python -m enhancer.training.fit_blind_qp --footage ../shared/footage \\
        --write enhancer/weights/vqe-v3.pt
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from bitstream.reader import open_video
from enhancer.blind_qp import BlindQP, frame_features
from enhancer.checkpoint import load_model, save_model
from enhancer.policy import ExitPolicy
from enhancer.training.data import EncodeSettings, encode_planes, random_settings
from enhancer.training.sources import clean_sequence, footage_sources, split_sources


def _noisy(seq: list[tuple], sigma: float, rng: np.random.Generator) -> list[tuple]:
    if sigma <= 0:
        return seq
    out = []
    for y, u, v in seq:
        n = rng.normal(0, sigma, y.shape)
        out.append((np.clip(y + n, 0, 255).astype(np.uint8), u, v))
    return out


def collect(sources, photos, sequences: int, frames: int, seed: int, crfs=None):
    """(features, true frame QP, CRF, source name) of every decoded frame."""
    feats, qps, crf_of, names = [], [], [], []
    cache: dict = {}
    for i, (name, path) in enumerate(sources):
        for k in range(sequences):
            rng = np.random.default_rng([seed, i, k])
            seq = clean_sequence(path, photos, cache, rng, frames, (384, 256))
            seq = _noisy(seq, float(rng.choice([0, 0, 1.5, 3.0])), rng)
            s = random_settings(rng) if crfs is None else EncodeSettings(crf=crfs[k % len(crfs)])
            with open_video(io.BytesIO(encode_planes(seq, s))) as r:
                prev = None
                for fr in r:
                    y = fr.planes[0]
                    if fr.side.qp is not None:
                        feats.append(frame_features(y, prev))
                        qps.append(fr.side.qp)
                        crf_of.append(s.crf)
                        names.append(name)
                    prev = y
    return np.array(feats), np.array(qps), np.array(crf_of), names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--sequences", type=int, default=8, help="per training source")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--ridge", type=float, default=1.0)
    ap.add_argument("--write", type=Path, default=None, help="weights file to store it in")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    allsrc = footage_sources(args.footage)
    photos = [p for _, p in allsrc if p.parent.name == "photos"]
    train = split_sources(allsrc, validation=False)
    held = split_sources(allsrc, validation=True)
    x, q, _, _ = collect(train, photos, args.sequences, args.frames, seed=11)
    est = BlindQP.fit(x, q, args.ridge)
    pred = np.array([est.predict(f) for f in x])
    print(f"training frames {len(q)}: mean |error| {np.abs(pred - q).mean():.2f} QP")
    crfs = (15, 22, 27, 32, 37, 42, 51)
    hx, hq, hc, hn = collect(held, photos, len(crfs), 12, seed=1234, crfs=crfs)
    hp = np.array([est.predict(f) for f in hx])
    print(f"held-out frames {len(hq)}: mean |error| {np.abs(hp - hq).mean():.2f} QP")
    print(f"{'CRF':>4} {'true QP':>8} {'estimate':>9} {'p10':>6} {'p90':>6}")
    for c in crfs:
        sel = hc == c
        print(
            f"{c:4d} {hq[sel].mean():8.1f} {hp[sel].mean():9.1f} "
            f"{np.percentile(hp[sel], 10):6.1f} {np.percentile(hp[sel], 90):6.1f}"
        )
    if args.write:
        model, qp_est, policy, meta = load_model(args.write)
        policy = policy or ExitPolicy(max_stages=model.cfg.stages)
        policy.blind_qp = est.to_dict()
        save_model(args.write, model, qp_est, policy, meta)
        print(f"stored in {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
