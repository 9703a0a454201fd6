"""Issue 11's table: what a user's default ``vqe enhance`` output is worth against its input.

Held-out sources (never trained on), encoded here with libx264 (preset medium)
at CRF 22/27/37, enhanced with the product's default settings (``Pipeline.run``
with no options: the calibrated output rate, untouched GOPs copied), then the
output and the input are both compared with the clean source:

    input CRF | net ΔPSNR-Y output vs input | worst source | output size / input size | ΔVMAF

VMAF comes from ``vmaf_torch`` (PyPI) when it is installed and works offline;
otherwise the column says so. Writes JSON to bench/results/output.json.

    python bench/output.py --footage ../shared/footage [--weights W] [--rate TABLE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from enhancer.metrics import Vmaf, psnr  # noqa: E402
from enhancer.pipeline import Pipeline  # noqa: E402
from enhancer.training.rate_calibration import (  # noqa: E402
    decode_luma,
    encode_planes,
    validation_sequences,
)

CRFS = (22, 27, 37)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--seed", type=int, default=101, help="not the calibration's seed (11)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/output.json"))
    ap.add_argument(
        "--rate",
        type=Path,
        default=None,
        help="an output-rate table (JSON from python -m enhancer.training.rate_calibration "
        "--dry-run --json) to use instead of the one in the weights' meta",
    )
    args = ap.parse_args(argv)
    engine = None
    if args.weights or args.rate:
        from enhancer.engine import Engine

        engine = Engine(weights=args.weights, device="auto")
        if args.rate:
            engine.meta = {**(engine.meta or {}), "output_rate": json.loads(args.rate.read_text())}
    pipeline = Pipeline(engine=engine)
    vmaf = Vmaf()
    vmaf_note = None if vmaf else vmaf.reason
    rows: dict[int, list[dict]] = {c: [] for c in CRFS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vqe-bench-output-") as work:
        work_dir = Path(work)
        for name, clean in validation_sequences(args.footage, args.frames, (320, 256), args.seed):
            ref = [c[0] for c in clean]
            for crf in CRFS:
                src, out = work_dir / f"{name}-{crf}.mp4", work_dir / f"{name}-{crf}-out.mp4"
                in_size = encode_planes(clean, src, crf)
                result = pipeline.run(src, out)
                inp, outp = decode_luma(src), decode_luma(out)
                net = float(
                    np.mean([psnr(o, r) for o, r in zip(outp, ref, strict=True)])
                    - np.mean([psnr(i, r) for i, r in zip(inp, ref, strict=True)])
                )
                row = {
                    "source": name,
                    "net_dpsnr_y": net,
                    "size_ratio": out.stat().st_size / in_size,
                    "output_crf": result.crf,
                    "gops_copied": result.gops_copied,
                    "gops": result.gops,
                    "passthrough": result.passthrough,
                    "expected_gain_db": result.expected_gain_db,
                }
                if vmaf:
                    row["dvmaf"] = vmaf(ref, outp) - vmaf(ref, inp)
                rows[crf].append(row)
                print(
                    f"{name:12} crf {crf}: net {net:+.3f} dB, size {row['size_ratio']:.2f}x, "
                    f"output crf {result.crf}, copied {result.gops_copied}/{result.gops}",
                    flush=True,
                )
    summary = {}
    print(
        "\n| input CRF | net ΔPSNR-Y, output vs input | worst source | output size / input size "
        "| ΔVMAF |\n| --- | --- | --- | --- | --- |"
    )
    for crf, rs in rows.items():
        nets = [r["net_dpsnr_y"] for r in rs]
        worst = min(rs, key=lambda r: r["net_dpsnr_y"])
        vm = np.mean([r["dvmaf"] for r in rs]) if vmaf and rs else None
        summary[crf] = {
            "mean_net_dpsnr_y": float(np.mean(nets)),
            "worst": worst["net_dpsnr_y"],
            "worst_source": worst["source"],
            "size_ratio": float(np.mean([r["size_ratio"] for r in rs])),
            "dvmaf": None if vm is None else float(vm),
        }
        s = summary[crf]
        vm_cell = f"{vm:+.2f}" if vm is not None else "n/a"
        print(
            f"| {crf} | {s['mean_net_dpsnr_y']:+.3f} dB | {s['worst']:+.3f} ({s['worst_source']}) "
            f"| {s['size_ratio']:.2f}x | {vm_cell} |"
        )
    if vmaf_note:
        print(f"VMAF: {vmaf_note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "summary": summary,
                "rows": rows,
                "vmaf": vmaf_note or "vmaf-torch",
                "seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
