"""Load test of the job API: N concurrent clients submit small clips and poll until done.

Unless ``--url`` is given it starts ``vqe serve`` itself on embedded defaults
(SQLite, in-process executor with ``--workers`` threads) in a temporary data
directory. Each client submits ``--jobs`` generated clips one after another
(``stages=1``), polls ``GET /v1/jobs/{id}`` every ``--poll`` seconds, downloads
the result and decodes it with PyAV. Checks: every job succeeded and every
result has the input's frame count. Prints throughput (jobs/s, frames/s) and
the latency of the status route (p50/p95/max) and of submissions, and writes
JSON (``--out``)::

    python -m bench.load [--clients 20] [--jobs 1] [--frames 8] [--size 64x64]
                         [--workers 2] [--poll 0.25] [--url URL] [--api-key KEY]
                         [--out bench/results/load.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_OUT = ROOT / "results" / "load.json"
FINISHED = ("succeeded", "failed", "canceled")


@dataclass
class JobRecord:
    id: str = ""
    status: str = ""
    submit_s: float = 0.0
    total_s: float = 0.0
    frames: int = 0
    polls: list[float] = field(default_factory=list)
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def make_clip(path: Path, size: tuple[int, int], frames: int) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.clips import make_clip as make

    return make(path, size=size, frames=frames)


def count_frames(data: bytes, folder: Path, name: str) -> int:
    path = folder / name
    path.write_bytes(data)
    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def local_server(workers: int, folder: Path) -> Iterator[str]:
    """``vqe serve`` on a free loopback port with its data in ``folder``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VQE_WORKERS": str(workers), "PYTHONPATH": str(REPO)}
    for name in ("VQE_QUEUE_URL", "VQE_API_KEYS", "VQE_DATABASE_URL", "VQE_STORAGE_DIR"):
        env.pop(name, None)
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--data-dir",
            str(folder / "data"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {(folder / 'serve.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server did not start in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def run_client(
    url: str,
    headers: dict[str, str],
    clip: Path,
    jobs: int,
    poll: float,
    timeout: float,
    folder: Path,
    index: int,
) -> list[JobRecord]:
    records = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        for n in range(jobs):
            rec = JobRecord()
            records.append(rec)
            began = time.perf_counter()
            try:
                with open(clip, "rb") as fh:
                    r = http.post("/v1/jobs", files={"file": (clip.name, fh)}, data={"stages": "1"})
                rec.submit_s = time.perf_counter() - began
                if r.status_code != 202:
                    rec.status, rec.error = "refused", f"HTTP {r.status_code}: {r.text[:200]}"
                    continue
                rec.id = r.json()["id"]
                deadline = time.monotonic() + timeout
                while True:
                    t = time.perf_counter()
                    r = http.get(f"/v1/jobs/{rec.id}")
                    rec.polls.append(time.perf_counter() - t)
                    body = r.json()
                    if body.get("status") in FINISHED:
                        rec.status = body["status"]
                        break
                    if time.monotonic() > deadline:
                        rec.status = "timeout"
                        break
                    time.sleep(poll)
                rec.total_s = time.perf_counter() - began
                if rec.status == "succeeded":
                    result = http.get(f"/v1/jobs/{rec.id}/result")
                    rec.frames = count_frames(result.content, folder, f"r{index}_{n}.mp4")
                else:
                    rec.error = json.dumps(body.get("error"))
            except Exception as exc:  # noqa: BLE001 - a failed client is a result too
                rec.status, rec.error = rec.status or "error", f"{type(exc).__name__}: {exc}"
    return records


def summarize(
    records: list[JobRecord], wall: float, args: argparse.Namespace, frames: int, url: str
) -> dict[str, Any]:
    polls = [p for r in records for p in r.polls]
    ok = [r for r in records if r.status == "succeeded" and r.frames == frames]
    return {
        "server": url if args.url else f"local vqe serve, {args.workers} worker thread(s)",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "jobs": len(records),
        "clip": {"size": args.size, "frames": frames},
        "wall_seconds": round(wall, 2),
        "throughput_jobs_per_s": round(len(ok) / wall, 3),
        "throughput_frames_per_s": round(len(ok) * frames / wall, 2),
        "job_seconds_p50": round(percentile([r.total_s for r in records], 50), 2),
        "job_seconds_p95": round(percentile([r.total_s for r in records], 95), 2),
        "status_requests": len(polls),
        "status_latency_ms_p50": round(1000 * percentile(polls, 50), 1),
        "status_latency_ms_p95": round(1000 * percentile(polls, 95), 1),
        "status_latency_ms_max": round(1000 * max(polls, default=float("nan")), 1),
        "status_latency_ms_mean": round(1000 * statistics.fmean(polls), 1) if polls else None,
        "submit_latency_ms_p50": round(1000 * percentile([r.submit_s for r in records], 50), 1),
        "submit_latency_ms_p95": round(1000 * percentile([r.submit_s for r in records], 95), 1),
        "all_succeeded": all(r.status == "succeeded" for r in records),
        "all_frame_counts_ok": all(r.frames == frames for r in records),
        "failures": [asdict(r) | {"polls": len(r.polls)} for r in records if r not in ok],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer <key>`")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1, help="jobs per client")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", default="64x64", help="WxH of the generated clip")
    p.add_argument("--workers", type=int, default=2, help="job threads of the local server")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between status polls")
    p.add_argument("--timeout", type=float, default=900.0, help="per job")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tempfile.TemporaryDirectory(prefix="vqe-load-") as tmp:
        folder = Path(tmp)
        clip = make_clip(folder / "clip.mp4", (width, height), args.frames)
        server = (
            contextlib.nullcontext(args.url) if args.url else local_server(args.workers, folder)
        )
        with server as url:
            began = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                futures = [
                    pool.submit(
                        run_client,
                        url,
                        headers,
                        clip,
                        args.jobs,
                        args.poll,
                        args.timeout,
                        folder,
                        i,
                    )
                    for i in range(args.clients)
                ]
                records = [r for f in futures for r in f.result()]
            wall = time.perf_counter() - began
    summary = summarize(records, wall, args, args.frames, args.url or "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for key, value in summary.items():
        if key != "failures":
            print(f"{key:>26}: {value}")
    for failure in summary["failures"][:5]:
        print("FAILED", failure)
    print(f"written to {args.out}")
    return 0 if summary["all_succeeded"] and summary["all_frame_counts_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
