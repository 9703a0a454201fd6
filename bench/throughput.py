"""Benchmark: where the time of ``vqe enhance`` goes, and whether its memory stays flat.

On generated x264 clips (640x272, 360p, 720p and 1080p with a panning camera,
and 360p with a static one; CRF 28, B-frames) it times one run each of:

* ``decode``    - ``open_video()`` with side information (the decode thread's work);
* ``transcode`` - a plain transcode: PyAV decode + libx264 at the CRF and preset
  vqe chose for that clip, what the ratio is taken against;
* ``floor``     - the whole pipeline with a pass-through engine: decode + encode + remux,
  the fastest ``vqe enhance`` could ever be;
* ``model``     - ``Engine.process`` on frames decoded beforehand (the model alone),
  with the share of each frame transferred from enhanced anchors instead of computed;
* ``pipeline``  - ``Pipeline(engine).run``: everything, as the CLI runs it (a remux
  where the calibrated output rate passes the video through);
* ``forced``    - the same with the CRF given explicitly, so the model runs on every frame.

In the same process it measures the device's matmul peak (GFLOP/s of a large
matmul in fp32, and in the engine's dtype when that differs) and the model's
achieved throughput: FLOPs per frame counted with ``FlopCounterMode`` (convs
and all) times the model-only frame rate. Finally the full pipeline runs in a
fresh subprocess on a clip and on one 10x longer, and their peak RSS
(``VmHWM``, see :func:`peak_rss_kb`) are compared: streaming means the long
one stays within +10%.

Prints a table and writes JSON (``--json-out``)::

    python -m bench.throughput [--frames 20] [--sizes 272p,360p,static,720p,1080p]
                               [--device auto]
                               [--stages auto] [--weights PATH] [--rss-frames 30]
                               [--rss-size 360p] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from bitstream.reader import open_video
from enhancer.pipeline import EnhanceOptions, Pipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "throughput.json"
SIZES = {
    "144p": (256, 144),
    "272p": (640, 272),
    "360p": (640, 360),
    "static": (640, 360),  # a static camera: only a square moves
    "720p": (1280, 720),
    "1080p": (1920, 1080),
}
RATIO_TARGET = 15.0  # the speed issue: vqe at most 15x a plain transcode (on AMX CPUs)
CLIP_OPTIONS = {"crf": "28", "bf": "3", "preset": "veryfast"}
RSS_TOLERANCE = 1.10


def make_bench_clip(folder: Path, size: str, frames: int) -> Path:
    from tests.clips import make_clip

    path = folder / f"bench_{size}_{frames}.mp4"
    if not path.exists():
        pan = size != "static"
        opts = CLIP_OPTIONS
        make_clip(path, size=SIZES[size], frames=frames, options=opts, audio=True, pan=pan)
    return path


class PassThrough:
    """An engine that changes nothing: what is left is the pipeline's floor."""

    def process(self, frames, info, stages="auto", side_info="auto"):
        from enhancer.engine import FrameReport

        for frame in frames:
            yield frame, FrameReport(frame.index, 0, "none", frame.side.qp, 0.0)


def timed(fn: Callable[[], int]) -> dict[str, float]:
    start = time.perf_counter()
    frames = fn()
    seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": round(seconds, 3), "fps": round(frames / seconds, 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s of an n x n matmul (n = 2048 on CPU, 8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _is_shape4(value: Any) -> bool:
    return isinstance(value, (list, tuple, torch.Size)) and len(value) == 4


@register_flop_formula([torch.ops.mkldnn._convolution_pointwise])
def _fused_conv_flop(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
    """The network's CPU inference runs its convolutions as fused oneDNN ops
    (enhancer.network.conv3x3), which FlopCounterMode does not count by itself.
    ``.default`` is (X, W, B, ...), ``.binary`` (X, other, W, B, ...)."""
    w_shape = third if _is_shape4(third) else second
    return conv_flop_count(x_shape, w_shape, out_shape)


@register_flop_formula([torch.ops.mkldnn._convolution_pointwise_])
def _fused_conv_inplace_flop(_other, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``_convolution_pointwise_.binary`` (other, X, W, B, ...): the residual add in place."""
    return conv_flop_count(x_shape, w_shape, out_shape)


def decode_all(path: Path) -> tuple[list[Any], Any]:
    with open_video(path) as reader:
        return list(reader), reader.info


def model_flops(engine: Any, frames: list[Any], info: Any) -> dict[str, float]:
    """FLOPs per frame of the whole engine, and of its convolutions alone."""
    with FlopCounterMode(display=False) as counter:
        for _ in engine.process(iter(frames), info):
            pass
    total = counter.get_total_flops()
    conv = sum(
        n for op, n in counter.get_flop_counts().get("Global", {}).items() if "conv" in str(op)
    )
    share = conv / total if total else 0.0
    return {"gflop_per_frame": round(total / len(frames) / 1e9, 3), "conv_share": round(share, 3)}


def plain_transcode(src: Path, dst: Path, crf: float, preset: str) -> int:
    """PyAV decode + libx264 encode of the video alone: the yardstick of the speed target."""
    import av

    count = 0
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        vout = out.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        vout.options = {"crf": f"{crf:g}", "preset": preset}
        for frame in inp.decode(vin):
            frame.pict_type = av.video.frame.PictureType.NONE
            for packet in vout.encode(frame):
                out.mux(packet)
            count += 1
        for packet in vout.encode():
            out.mux(packet)
    return count


def bench_size(folder: Path, size: str, frames: int, engine: Any, options: EnhanceOptions):
    clip = make_bench_clip(folder, size, frames)
    out = folder / f"out_{size}.mkv"
    decoded, info = decode_all(clip)
    row: dict[str, Any] = {"size": size, "resolution": "x".join(map(str, SIZES[size]))}
    row["decode"] = timed(lambda: len(decode_all(clip)[0]))
    row["floor"] = timed(lambda: Pipeline(PassThrough()).run(clip, out, options).frames)
    for _ in engine.process(iter(decoded[:2]), info, options.stages):  # warm-up: allocator, kernels
        pass

    def model_only() -> int:
        count = 0
        for _frame, _report in engine.process(iter(decoded), info, options.stages):
            count += 1
        sync(engine.device)
        return count

    row["model"] = timed(model_only)
    reports = [r for _, r in engine.process(iter(decoded), info, options.stages)]
    row["transferred"] = round(sum(r.transferred for r in reports) / len(reports), 3)
    results = []

    def pipeline() -> int:
        results.append(Pipeline(engine).run(clip, out, options))
        return results[-1].frames

    row["pipeline"] = timed(pipeline)
    result = results[0]
    row["output_crf"] = result.crf
    crf = result.crf if result.crf is not None else 23.0
    preset = options.preset or "medium"
    row["transcode"] = timed(lambda: plain_transcode(clip, folder / "plain.mkv", crf, preset))
    row["ratio"] = round(row["pipeline"]["seconds"] / row["transcode"]["seconds"], 2)
    # The default may pass the video through (the output rate finds no CRF that keeps the
    # gain): then the same CRF given explicitly makes the model run on every frame.
    forced = options.model_copy(update={"crf": crf})
    row["forced"] = timed(lambda: Pipeline(engine).run(clip, out, forced).frames)
    row["forced_ratio"] = round(row["forced"]["seconds"] / row["transcode"]["seconds"], 2)
    row.update(model_flops(engine, decoded[: min(4, len(decoded))], info))
    row["model_gflops"] = round(row["gflop_per_frame"] * row["model"]["fps"], 2)
    return row


def make_engine(args: argparse.Namespace) -> Any:
    from enhancer.engine import Engine

    return Engine(weights=args.weights, device=args.device)


def rss_child(args: argparse.Namespace) -> int:
    """Subprocess body: run the pipeline once, print frames and peak RSS as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        options = EnhanceOptions(preset="veryfast", stages=args.stages)
        result = Pipeline(make_engine(args)).run(args.rss_child, Path(tmp) / "out.mkv", options)
    print(json.dumps({"frames": result.frames, "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}))
    return 0


def peak_rss_kb() -> int:
    """This process's peak resident set, KiB.

    Linux's ``ru_maxrss`` survives ``execve``: a child forked from a big parent
    reports the parent's peak. ``VmHWM`` belongs to the new address space, so
    it is used when /proc has it; ``ru_maxrss`` elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(clip: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.throughput",
        "--rss-child",
        str(clip),
        "--device",
        args.device,
        "--stages",
        str(args.stages),
    ]
    if args.weights:
        cmd += ["--weights", str(args.weights)]
    done = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]], peaks: dict[str, float], rss: dict[str, Any]) -> None:
    cols = ("decode", "transcode", "floor", "model", "pipeline", "forced")
    print(
        f"{'clip':7s} {'size':>9s} " + " ".join(f"{c:>10s}" for c in cols)
        + f" {'vs plain':>9s} {'forced':>7s} {'transfer':>8s} {'GFLOP/frame':>12s} {'GFLOP/s':>8s}"
        f" {'% peak':>7s}"
    )  # fmt: skip
    peak = peaks["engine_dtype_gflops"]
    for r in rows:
        fps = [f"{r[k]['fps']:8.2f}/s" for k in cols]
        print(
            f"{r['size']:7s} {r['resolution']:>9s} {' '.join(f'{x:>10s}' for x in fps)}"
            f" {r['ratio']:8.1f}x {r['forced_ratio']:6.1f}x {100 * r['transferred']:7.0f}%"
            f" {r['gflop_per_frame']:12.2f}"
            f" {r['model_gflops']:8.1f} {100 * r['model_gflops'] / peak:6.1f}%"
        )
    print(
        f"matmul peak: {peaks['fp32_gflops']:.1f} GFLOP/s fp32,"
        f" {peak:.1f} GFLOP/s in {peaks['engine_dtype']}"
    )
    short, long = rss["short"], rss["long"]
    print(
        f"peak RSS: {short['peak_rss_mb']} MB for {short['frames']} frames, "
        f"{long['peak_rss_mb']} MB for {long['frames']} frames "
        f"(x{rss['ratio']:.3f}, {'ok' if rss['ok'] else 'GROWS'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20, help="frames per timed clip")
    parser.add_argument(
        "--sizes", default="272p,360p,static,720p,1080p", help=f"among {', '.join(SIZES)}"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", default="auto")
    parser.add_argument("--weights", type=Path, default=None, help="model file (default: shipped)")
    parser.add_argument(
        "--rss-frames",
        type=int,
        default=30,
        help="frames of the short RSS clip (the long one has 10x); enough "
        "to fill the queues and the encoder's lookahead",
    )
    parser.add_argument("--rss-size", choices=SIZES, default="360p")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = args.stages if args.stages == "auto" else int(args.stages)
    if args.rss_child:
        return rss_child(args)

    engine = make_engine(args)
    options = EnhanceOptions(preset="veryfast", stages=args.stages)
    # The engine's precision, not its tensors' dtype: on CPU bf16 runs under autocast.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {
        "fp32_gflops": round(matmul_peak(engine.device, torch.float32), 1),
        "engine_dtype": engine.precision,
    }
    peaks["engine_dtype_gflops"] = (
        peaks["fp32_gflops"]
        if engine.precision == "fp32"
        else round(matmul_peak(engine.device, dtype[engine.precision]), 1)
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [bench_size(folder, s, args.frames, engine, options) for s in args.sizes.split(",")]
        short = measure_rss(make_bench_clip(folder, args.rss_size, args.rss_frames), args)
        long = measure_rss(make_bench_clip(folder, args.rss_size, 10 * args.rss_frames), args)
    ratio = long["peak_rss_mb"] / short["peak_rss_mb"]
    rss = {
        "clip": args.rss_size,
        "short": short,
        "long": long,
        "ratio": round(ratio, 3),
        "ok": ratio <= RSS_TOLERANCE,
    }
    print_table(rows, peaks, rss)
    checks = {}
    for r in rows:
        if r["size"] in ("272p", "720p"):
            checks[f"{r['size']}: vqe default within {RATIO_TARGET:g}x a plain transcode"] = (
                r["ratio"] <= RATIO_TARGET
            )
            checks[f"{r['size']}: vqe with the model running within {RATIO_TARGET:g}x"] = (
                r["forced_ratio"] <= RATIO_TARGET
            )
    checks["peak memory grows at most 10% from 1x to 10x the frames"] = rss["ok"]
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {name}")
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "device": str(engine.device),
            "torch": torch.__version__,
        },
        "engine": {
            "stages": args.stages,
            "max_stages": engine.max_stages,
            "weights": str(args.weights or "shipped"),
            "meta": {k: v for k, v in engine.meta.items() if isinstance(v, str | int | float)},
        },
        "frames": args.frames,
        "peaks": peaks,
        "sizes": rows,
        "rss": rss,
        "checks": checks,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0 if rss["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
