"""Every H.264 conformance/test stream in ../shared/conformance/h264 reads cleanly.

For each stream: the inspect report (built in-process, for speed) succeeds,
its frame count equals a plain PyAV decode's, and inter pictures report
motion vectors. The one stream FFmpeg cannot open fails with a clean error,
checked through the real CLI (exit code 2, one stderr line, no traceback).
Skipped when the directory is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import av
import pytest

from bitstream.types import CorruptStream
from service.cli.inspect import inspect

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(__file__).resolve().parents[2].parent / "shared/conformance/h264"
UNOPENABLE = {"sps_subsetsps_bothVUI.264"}  # SPS + subset SPS: FFmpeg cannot probe it
STREAMS = (
    sorted(p.name for p in CONFORMANCE.iterdir() if p.is_file()) if CONFORMANCE.is_dir() else []
)
READABLE = [name for name in STREAMS if name not in UNOPENABLE]

pytestmark = pytest.mark.skipif(not STREAMS, reason=f"no conformance streams in {CONFORMANCE}")


@cache
def plain_count(name: str) -> int:
    with av.open(str(CONFORMANCE / name)) as container:
        return sum(1 for _ in container.decode(video=0))


@cache
def report(name: str) -> dict[str, Any]:
    return inspect(str(CONFORMANCE / name))


@pytest.mark.parametrize("name", READABLE)
def test_stream_reads_like_plain_pyav(name):
    rep = report(name)
    assert rep["stream"]["codec"] == "h264"
    assert len(rep["frames"]) == plain_count(name)
    assert rep["side_info"]["motion_vectors"] == "bitstream"
    assert rep["side_info"]["qp_map"] == "bitstream"
    for f in rep["frames"]:
        assert f["pict_type"] in ("I", "P", "B")
        assert f["qp"] is not None and 0 <= f["qp"] <= 51
        if f["pict_type"] == "I":
            assert f["mv_count"] == 0
    for ptype in ("P", "B"):
        inter = [f for f in rep["frames"] if f["pict_type"] == ptype]
        if inter:
            assert any(f["mv_count"] > 0 for f in inter), f"no {ptype} frame has vectors"


@pytest.mark.parametrize("name", sorted(UNOPENABLE & set(STREAMS)))
def test_unopenable_stream_is_a_clean_error(name):
    with pytest.raises(CorruptStream):
        inspect(str(CONFORMANCE / name))
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "inspect", str(CONFORMANCE / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert name in lines[0]


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in (
            "BA_MW_D_IDR_LOST.264",
            "CVPCMNL1_SVA_C.264",
            "Cisco_Men_whisper_640x320_CABAC_Bframe_9.264",
        )
        if n in READABLE
    ],
)
def test_cli_json_on_conformance(name):
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "inspect", "--json", str(CONFORMANCE / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert len(rep["frames"]) == plain_count(name)
