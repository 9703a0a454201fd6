"""Where a frame's time goes: the codec-aware path against blind, and vqe against a transcode.

Held-out footage only (never trained on, see enhancer.training.sources):

* ``vtest`` - the real static-camera clip (people walking), scaled;
* ``bridge`` - the Bridge photo under a synthetic moving camera with moving
  layers (training's photo_sequence): every block moves.

Each is made at 272p (640x272), 360p, 720p and 1080p and encoded with libx264
at CRF 35, preset medium (B-frames, the encoder's defaults): the input the
default enhances on every frame. Then, one run each with nothing else on the
machine:

* ``transcode`` - PyAV decode + libx264 at the CRF vqe chose, preset medium,
  the faster of two runs: the yardstick of the speed issue (vqe <= 15x);
* ``vqe`` - ``Pipeline.run`` with the default options (``vqe enhance in.mp4
  out.mp4``), its ``seconds`` as ``--json`` reports them;
* per path, ``aware`` (the bitstream's side information) and ``blind``
  (``--side-info blind``), both with ``--codec ffv1`` on the same input: the
  fastest of ``--rounds`` runs (interleaved: aware, blind, blind, aware, ...)
  in ms per frame, each round's aware/blind ratio, and its parts - ``decode``
  (PyAV, no export options),
  ``side info`` (decoding with the export options and building the maps, less
  the plain decode), ``align`` (aligning and warping the references),
  ``network``, ``transfer`` (choosing and warping what is copied from
  enhanced anchors), ``engine other`` (tensors, inputs, policy), ``encode``
  (FFV1 of the frames alone) and ``waiting`` (the run's wall time the engine
  did not use: queues, threads); plus the share of the frame transferred.
  Decode and encode run on their own threads, so the parts add up to more
  than the run.

It also times one plain 3x3 convolution of the network's width on the frame's
half-resolution map in the engine's precision and reports the network's
throughput (FLOPs of a whole frame at every stage, counted) as a share of it.

Prints a table, checks the speed issue's targets (codec-aware >= 1.5x blind;
vqe <= 15x a transcode, required on CPUs with AMX only) and writes JSON::

    python -m bench.frame_time --footage ../shared/footage [--frames 48]
        [--sizes 272p,360p,720p,1080p] [--sources vtest,bridge] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.throughput import plain_transcode
from bitstream.reader import open_video
from bitstream.writer import VideoWriter
from enhancer.engine import Engine
from enhancer.features import cpu_has_amx
from enhancer.pipeline import EnhanceOptions, Pipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "frame_time.json"
SIZES = {"272p": (640, 272), "360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
CRF, PRESET = 35, "medium"
AWARE_OVER_BLIND = 1.5  # the speed issue: codec-aware at least 1.5x faster than blind
TRANSCODE_RATIO = 15.0  # and vqe at most 15x a plain transcode (on CPUs with AMX)
PATHS = {"aware": "auto", "blind": "blind"}
PARTS = ("decode", "side_info", "align", "network", "transfer", "engine_other", "encode")


def _yuv_frames(source: str, footage: Path, size: tuple[int, int], frames: int):
    """Clean yuv420p av.VideoFrames of ``source`` at ``size``."""
    w, h = size
    if source == "vtest":
        with av.open(str(footage / "clips" / "vtest.avi")) as c:
            for i, f in enumerate(c.decode(video=0)):
                if i >= frames:
                    return
                # Scale to the width, crop the height (the clip is 4:3).
                sh = round(f.height * w / f.width / 2) * 2
                rgb = f.reformat(width=w, height=max(sh, h), format="rgb24").to_ndarray()
                top = (rgb.shape[0] - h) // 2
                crop = np.ascontiguousarray(rgb[top : top + h])
                yield av.VideoFrame.from_ndarray(crop, format="rgb24").reformat(format="yuv420p")
        return
    from enhancer.training.sources import photo_sequence

    photos = sorted((footage / "photos").glob("*.jpg"))
    path = next(p for p in photos if p.stem.lower() == source)
    others = [p for p in photos if p != path][:3]
    rng = np.random.default_rng(35)
    for rgb in photo_sequence(path, others, rng, size, frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        yield frame.reformat(format="yuv420p")


def make_clip(folder: Path, source: str, footage: Path, size: str, frames: int) -> Path:
    """``source`` at ``size``, x264 CRF 35 preset medium; made once per folder."""
    path = folder / f"{source}_{size}_{frames}_crf{CRF}.mp4"
    if path.exists():
        return path
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = SIZES[size]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(CRF), "preset": PRESET}
        for i, frame in enumerate(_yuv_frames(source, footage, SIZES[size], frames)):
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return path


def _per_frame(seconds: float, frames: int) -> float:
    return round(1000 * seconds / max(frames, 1), 2)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _decode(clip: Path, side_info: bool) -> tuple[float, int]:
    count = 0

    def run() -> None:
        nonlocal count
        with open_video(clip, side_info=side_info) as reader:
            count = sum(1 for _ in reader)

    return _timed(run), count


def _encode(clip: Path, frames: list, info: Any, out: Path) -> float:
    def run() -> None:
        writer = VideoWriter(out, info, codec="ffv1")
        for frame in frames:
            writer.write(frame)
        writer.close()

    return _timed(run)


def path_parts(
    engine: Engine, clip: Path, work: Path, side_info: str, run_seconds: float
) -> dict[str, Any]:
    """One path's parts of a frame's time (ms per frame), given its run's wall time."""
    bitstream = side_info != "blind"
    plain, n = _decode(clip, side_info=False)
    with_side, _ = _decode(clip, side_info=bitstream)
    with open_video(clip, side_info=bitstream) as reader:
        info, decoded = reader.info, list(reader)
    for _ in engine.process(iter(decoded[:2]), info, side_info=side_info):  # warm-up
        pass
    start = time.perf_counter()
    reports = [r for _, r in engine.process(iter(decoded), info, side_info=side_info)]
    engine_s = time.perf_counter() - start
    encode_s = _encode(clip, decoded, info, work / f"enc_{side_info}.mkv")
    align = sum(r.align_seconds for r in reports)
    network = sum(r.model_seconds for r in reports)
    transfer = sum(r.transfer_seconds for r in reports)
    parts = {
        "decode": _per_frame(plain, n),
        "side_info": _per_frame(max(with_side - plain, 0.0), n) if bitstream else 0.0,
        "align": _per_frame(align, n),
        "network": _per_frame(network, n),
        "transfer": _per_frame(transfer, n),
        "engine_other": _per_frame(max(engine_s - align - network - transfer, 0.0), n),
        "encode": _per_frame(encode_s, n),
        "waiting": _per_frame(max(run_seconds - engine_s, 0.0), n),
    }
    return {
        "engine_ms": _per_frame(engine_s, n),
        "parts": parts,
        "transferred": round(float(np.mean([r.transferred for r in reports])), 3),
        "stages": round(float(np.mean([r.stages for r in reports])), 2),
    }


def paired_runs(engine: Engine, clip: Path, work: Path, rounds: int) -> dict[str, list]:
    """Each path's ``vqe enhance --codec ffv1`` runs, interleaved aware, blind, blind,
    aware, ... so that a slow spell of the machine (other tenants, clocks: 5-10 % on one
    run) falls on both paths alike rather than on one."""
    runs: dict[str, list] = {name: [] for name in PATHS}
    order = list(PATHS)
    for k in range(rounds):
        for name in order if k % 2 == 0 else order[::-1]:
            options = EnhanceOptions(codec="ffv1", side_info=PATHS[name])
            runs[name].append(Pipeline(engine).run(clip, work / f"run_{name}.mkv", options))
    return runs


def best_seconds(engine: Engine, fn, repeat: int = 5) -> float:
    """The fastest of ``repeat`` calls of ``fn`` in the engine's precision (after one
    warm-up), in seconds."""
    with torch.inference_mode(), engine._amp():
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            times.append(time.perf_counter() - start)
    return min(times)


def whole_frame_network(engine: Engine, size: tuple[int, int]):
    """A call of the engine's network on a whole (width, height) frame at every stage,
    on random inputs of the half-resolution map."""
    w, h = size
    hh, hw = (h + 15) // 16 * 8, (w + 15) // 16 * 8  # the half-resolution map
    cfg = engine.model.cfg
    dev, dtype = engine.device, engine.dtype
    x = torch.rand(1, 6, hh, hw, device=dev, dtype=dtype)
    inputs = torch.rand(1, cfg.in_channels(), hh, hw, device=dev, dtype=dtype)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    seq = torch.rand(1, 2, device=dev, dtype=dtype)
    frame = torch.rand(1, 10, device=dev, dtype=dtype)
    return lambda: engine.model(x, inputs, seq, frame, cfg.stages, last_only=True)


def conv_share(engine: Engine, size: tuple[int, int]) -> dict[str, float]:
    """The network's GFLOP/s on a whole frame at every stage, and a plain 3x3 conv's."""
    w, h = size
    hh, hw = (h + 15) // 16 * 8, (w + 15) // 16 * 8  # the half-resolution map
    cfg = engine.model.cfg
    dev, dtype = engine.device, engine.dtype
    feat = torch.rand(1, cfg.channels, hh, hw, device=dev, dtype=dtype)
    feat = feat.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cfg.channels, cfg.channels, 3, 1, 1).to(dev, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    net = whole_frame_network(engine, size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), engine._amp():
        net()
    flops = counter.get_total_flops()
    conv_s = best_seconds(engine, lambda: conv(feat), 10)
    conv_gflops = 2 * cfg.channels**2 * 9 * hh * hw / conv_s / 1e9
    net_gflops = flops / best_seconds(engine, net) / 1e9
    return {
        "conv_gflops": round(conv_gflops, 1),
        "network_gflops": round(net_gflops, 1),
        "share": round(net_gflops / conv_gflops, 3),
        "gflop_per_frame": round(flops / 1e9, 2),
    }


def bench_clip(
    engine: Engine, clip: Path, size: str, work: Path, rounds: int = 3
) -> dict[str, Any]:
    row: dict[str, Any] = {"size": size, "resolution": "x".join(map(str, SIZES[size]))}
    default = Pipeline(engine).run(clip, work / "default.mp4", EnhanceOptions())
    row["vqe"] = {"seconds": default.seconds, "fps": default.fps, "crf": default.crf}
    crf = default.crf if default.crf is not None else 23.0
    transcode = min(_timed(lambda: plain_transcode(clip, work / "plain.mkv", crf, PRESET))
                    for _ in range(2))  # fmt: skip
    row["transcode"] = {"seconds": round(transcode, 3), "fps": round(default.frames / transcode, 2)}
    row["vs_transcode"] = round(default.seconds / transcode, 1)
    runs = paired_runs(engine, clip, work, rounds)
    for name, mode in PATHS.items():
        run = min(runs[name], key=lambda r: r.seconds)  # the faster, as for the transcode
        row[name] = {
            "frames": run.frames,
            "ms_per_frame": _per_frame(run.seconds, run.frames),
            "fps": run.fps,
            "runs_ms": [_per_frame(r.seconds, r.frames) for r in runs[name]],
            **path_parts(engine, clip, work, mode, run.seconds),
        }
    row["aware_over_blind"] = round(row["blind"]["ms_per_frame"] / row["aware"]["ms_per_frame"], 3)
    pairs = zip(row["blind"]["runs_ms"], row["aware"]["runs_ms"], strict=True)
    row["aware_over_blind_rounds"] = [round(b / a, 3) for b, a in pairs]
    row["conv"] = conv_share(engine, SIZES[size])
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["ms/frame", *PARTS, "waiting", "transferred"]
    print(f"{'clip':16s} {'path':6s} " + " ".join(f"{h:>9s}" for h in head))
    for r in rows:
        for name in PATHS:
            p = r[name]
            cells = [p["ms_per_frame"], *(p["parts"][k] for k in PARTS), p["parts"]["waiting"]]
            print(
                f"{r['source'] + ' ' + r['size']:16s} {name:6s} "
                + " ".join(f"{c:9.1f}" for c in cells)
                + f" {100 * p['transferred']:8.0f}%"
            )
    print()
    cols = (
        "aware/blind",
        "rounds",
        "vqe fps",
        "transcode",
        "vqe/transcode",
        "net GFLOP/s",
        "conv GFLOP/s",
    )
    print(f"{'clip':16s} " + " ".join(f"{c:>13s}" for c in cols) + f" {'share':>6s}")
    for r in rows:
        c = r["conv"]
        rounds = "{:.2f}-{:.2f}".format(*_span(r["aware_over_blind_rounds"]))
        print(
            f"{r['source'] + ' ' + r['size']:16s} {r['aware_over_blind']:12.3f}x"
            f" {rounds:>13s}"
            f" {r['vqe']['fps']:13.2f} {r['transcode']['fps']:13.1f} {r['vs_transcode']:12.1f}x"
            f" {c['network_gflops']:13.1f} {c['conv_gflops']:13.1f} {100 * c['share']:5.0f}%"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--footage", type=Path, default=Path("../shared/footage"))
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--sizes", default="272p,360p,720p,1080p", help=", ".join(SIZES))
    ap.add_argument("--sources", default="vtest,bridge")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--clips", type=Path, default=Path(tempfile.gettempdir()) / "vqe-bench-clips")
    ap.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    engine = Engine(args.weights, device=args.device)
    args.clips.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqe-frame-time-") as tmp:
        for source in args.sources.split(","):
            for size in args.sizes.split(","):
                clip = make_clip(args.clips, source, args.footage, size, args.frames)
                row = bench_clip(engine, clip, size, Path(tmp), args.rounds)
                row["source"] = source
                rows.append(row)
                print(f"done {source} {size}", file=sys.stderr, flush=True)
    print_table(rows)
    amx = cpu_has_amx()
    checks = {}
    for r in rows:
        name = f"{r['source']} {r['size']}"
        checks[f"{name}: codec-aware >= {AWARE_OVER_BLIND}x blind"] = (
            r["aware_over_blind"] >= AWARE_OVER_BLIND
        )
        if r["size"] in ("272p", "720p"):
            key = f"{name}: vqe <= {TRANSCODE_RATIO:g}x a transcode" + ("" if amx else " (no AMX)")
            checks[key] = r["vs_transcode"] <= TRANSCODE_RATIO
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISS'}] {name}")
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "amx": amx,
            "torch_threads": torch.get_num_threads(),
            "device": str(engine.device),
            "precision": engine.precision,
            "torch": torch.__version__,
        },
        "input": {"codec": "libx264", "crf": CRF, "preset": PRESET, "frames": args.frames},
        "rows": rows,
        "checks": checks,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


def _span(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
