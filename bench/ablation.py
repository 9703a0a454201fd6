"""Ablation of the shipped weights, per CRF, on the held-out validation sources.

Columns (ΔPSNR-Y in dB over the decoded input, all stages):

- full: the codec-aware path as the engine runs it by default (quality-peak
  anchors, enhanced or decoded as the model file says, aligned by the
  bitstream's vectors and matching, copied blocks transferred from the
  anchors' enhanced outputs);
- no transfer: the same, every block computed;
- other refs: the same with the other references (the decoded anchors where
  the default borrows the enhanced ones, and the other way round);
- peaks (enhanced, val) / (raw, val): the training-time validation with the
  anchors as this model enhances them (training.anchors) or as decoded;
- adjacent: the neighbouring frames instead of the quality peaks (all other
  side information kept);
- no refs: no reference frames at all;
- blind: ``--side-info blind`` (adjacent frames, estimated QP map, no picture types);
- one column per ``--variants`` model file (say, a network with another body): its
  "full", with the network's time on a 640x272 frame next to the shipped one's, so
  that an idea is judged at its cost.

The engine columns run enhancer.engine.Engine end to end on sequences built
like bench/quality.py's; "adjacent" and "no refs" edit the inputs of the
training-time validation (enhancer.training.evaluate) on the same footage.
Prints a table and writes JSON (default bench/results/ablation.json).

    python bench/ablation.py --footage ../shared/footage
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.frame_time import best_seconds, whole_frame_network  # noqa: E402
from bench.quality import decode, psnr  # noqa: E402
from enhancer.checkpoint import load_model  # noqa: E402
from enhancer.engine import Engine  # noqa: E402
from enhancer.training.anchors import attach_all  # noqa: E402
from enhancer.training.data import EncodeSettings, decode_sample, encode_planes  # noqa: E402
from enhancer.training.evaluate import validate  # noqa: E402
from enhancer.training.samples import frame_inputs  # noqa: E402
from enhancer.training.sources import clean_sequence, footage_sources, split_sources  # noqa: E402


def engine_gain(engine: Engine, clean, data: bytes, side_info: str = "auto") -> float:
    info, frames = decode(data)
    outs = list(engine.process(iter(frames), info, stages=3, side_info=side_info))
    pairs = zip(outs, frames, clean, strict=False)
    return float(
        np.mean([psnr(o.planes[0], c[0]) - psnr(f.planes[0], c[0]) for (o, _), f, c in pairs])
    )


def network_ms(engine: Engine, size: tuple[int, int] = (640, 272)) -> float:
    """The engine's network on a whole frame (all stages), the fastest of 7 runs, in ms."""
    return 1e3 * best_seconds(engine, whole_frame_network(engine, size), 7)


def adjacent_refs(item, sample, t):
    """Codec-aware inputs, but the neighbours' slots in place of the quality peaks."""
    adj, _ = frame_inputs(sample, t, blind=True)
    item.refs = [r for r in adj.refs]
    for r in item.refs:
        if r is not None:
            r.qp = None
    return item


def no_refs(item, sample, t):
    item.refs = [None, None]
    return item


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--crfs", default="17,22,27,32,37,42,47")
    ap.add_argument("--variants", default="", help="other model files, comma-separated")
    ap.add_argument("--json-out", type=Path, default=Path("bench/results/ablation.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    crfs = [float(c) for c in args.crfs.split(",")]
    sources = split_sources(footage_sources(args.footage), validation=True)
    photos = [p for _, p in sources if p.parent.name == "photos"]
    seqs = {
        n: clean_sequence(p, photos, {}, np.random.default_rng([1234, i]), args.frames, (384, 256))
        for i, (n, p) in enumerate(sources)
    }
    full = Engine(args.weights, device="cpu")
    engines = {  # name -> (engine, side_info); all at 3 stages
        "full": (full, "auto"),
        "no transfer": (Engine(args.weights, device="cpu", transfer=False), "auto"),
        "other refs": (Engine(args.weights, device="cpu", recurrent=not full.recurrent), "auto"),
        "blind": (full, "blind"),
    }
    variants = {Path(v).stem: v for v in args.variants.split(",") if v}
    for name, path in variants.items():
        engines[name] = (Engine(path, device="cpu"), "auto")
    loaded = load_model(args.weights)
    model, est = loaded.network, loaded.estimator
    cols: dict = defaultdict(lambda: defaultdict(list))
    for crf in crfs:
        samples = []
        for clean in seqs.values():
            settings = EncodeSettings(crf=crf)
            data = encode_planes(clean, settings)
            for name, (eng, side_info) in engines.items():
                cols[crf][name].append(engine_gain(eng, clean, data, side_info))
            samples.append(decode_sample(data, clean, settings))
        for name, edit in (
            ("adjacent", adjacent_refs),
            ("no refs", no_refs),
            ("peaks (raw, val)", None),
        ):
            res = validate(model, est, samples, max_frames=args.frames, blind=False, edit=edit)
            cols[crf][name].append(res["crf"][crf][f"s{model.cfg.stages}"])
        attach_all(samples, model, est)
        res = validate(model, est, samples, max_frames=args.frames, blind=False, enhanced=True)
        cols[crf]["peaks (enhanced, val)"].append(res["crf"][crf][f"s{model.cfg.stages}"])
        print(f"done CRF {crf:g}", file=sys.stderr, flush=True)
    names = [
        "full",
        "no transfer",
        "other refs",
        "peaks (enhanced, val)",
        "peaks (raw, val)",
        "adjacent",
        "no refs",
        "blind",
        *variants,
    ]
    print("| CRF | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    table = {}
    for crf in crfs:
        row = {n: float(np.mean(cols[crf][n])) for n in names}
        table[crf] = row
        print(f"| {crf:g} | " + " | ".join(f"{row[n]:+.3f}" for n in names) + " |")
    times = {"shipped": network_ms(full)} | {n: network_ms(engines[n][0]) for n in variants}
    print("network ms per 640x272 frame, 3 stages: "
          + ", ".join(f"{n} {t:.1f}" for n, t in times.items()))  # fmt: skip
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    report = {str(k): v for k, v in table.items()} | {"network_ms": times}
    args.json_out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
