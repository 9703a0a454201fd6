"""Benchmark: decoding with side information (MVs, QP map, dense grids) vs a plain decode.

Generates a 720p x264 clip with B-frames (cached next to the results), then
times, interleaved run by run so machine load hits both alike:

* ``pyav``   - bare PyAV decode, default threading (reference only);
* ``plain``  - ``open_video(side_info=False)``: frames + numpy planes;
* ``side``   - ``open_video()``: the same plus exported MVs/QP and dense maps.

Prints a table and writes JSON (``--json-out``). The figure of merit is
``side / plain`` (target <= 1.3).

    python -m bench.side_info [--frames 60] [--repeats 3] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import av

from bitstream.reader import open_video

ROOT = Path(__file__).resolve().parent
DEFAULT_JSON = ROOT / "results" / "side_info.json"


def make_bench_clip(path: Path, frames: int) -> Path:
    """The 720p x264 test clip (B-frames, CRF 23), encoded once and reused."""
    from tests.clips import make_clip

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_clip(
            path,
            size=(1280, 720),
            frames=frames,
            options={"crf": "23", "bf": "3", "preset": "veryfast"},
        )
    return path


def run_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def run_reader(path: Path, side_info: bool) -> int:
    with open_video(path, side_info=side_info) as reader:
        return sum(1 for _ in reader)


def bench(path: Path, repeats: int) -> dict[str, list[float]]:
    modes: dict[str, Callable[[], int]] = {
        "pyav": lambda: run_pyav(path),
        "plain": lambda: run_reader(path, side_info=False),
        "side": lambda: run_reader(path, side_info=True),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    counts = {m: fn() for m, fn in modes.items()}  # warm-up (page cache, imports)
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"modes decoded different frame counts: {counts}")
    for _ in range(repeats):
        for mode, fn in modes.items():  # interleaved: one run of each per round
            t0 = time.perf_counter()
            fn()
            times[mode].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip", type=Path, default=ROOT / "results" / "bench_720p.mp4")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    clip = make_bench_clip(args.clip, args.frames)
    with av.open(str(clip)) as container:
        frames = container.streams.video[0].frames or args.frames
    times = bench(clip, args.repeats)
    med = {m: statistics.median(t) for m, t in times.items()}
    best = {m: min(t) for m, t in times.items()}
    ratio = med["side"] / med["plain"]
    ratio_best = best["side"] / best["plain"]

    print(f"clip: {clip} (1280x720, {frames} frames, x264 CRF 23, B-frames)")
    print(f"{'mode':<8}{'median s':>10}{'min s':>8}{'fps':>8}   runs")
    for mode, t in times.items():
        runs = " ".join(f"{x:.3f}" for x in t)
        print(f"{mode:<8}{med[mode]:>10.3f}{best[mode]:>8.3f}{frames / med[mode]:>8.1f}   {runs}")
    print(
        f"side / plain = {ratio:.2f}x median, {ratio_best:.2f}x best run (target <= 1.3);  "
        f"side / pyav = {med['side'] / med['pyav']:.2f}x median"
    )

    result = {
        "clip": str(clip),
        "frames": frames,
        "size": [1280, 720],
        "repeats": args.repeats,
        "seconds": times,
        "median_s": med,
        "min_s": best,
        "ratio_side_over_plain": ratio,
        "ratio_side_over_plain_best": ratio_best,
        "ratio_side_over_pyav": med["side"] / med["pyav"],
        "target_ratio": 1.3,
        "machine": {
            "python": platform.python_version(),
            "av": av.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
