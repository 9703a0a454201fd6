"""Tests for `vqe inspect`, run as a subprocess the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitstream.visualize import qp_colours
from tests.clips import make_audio_only

REPO = Path(__file__).resolve().parents[2]


def vqe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def h264(clip) -> Path:
    return clip("inspect.mp4", options={"crf": "23", "bf": "2", "preset": "veryfast"}, frames=10)


def test_json_report(h264):
    res = vqe("inspect", h264, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    stream = report["stream"]
    assert stream["codec"] == "h264" and stream["profile"] == "High"
    assert (stream["width"], stream["height"], stream["frames"]) == (176, 144, 10)
    assert stream["pix_fmt"] == "yuv420p" and stream["frame_rate"] == 25.0
    assert stream["encoder"] == "x264"
    assert stream["rate_control"] == {"mode": "crf", "crf": 23.0, "qp": None, "bitrate": None}
    assert report["side_info"]["motion_vectors"] == "bitstream"
    assert report["side_info"]["qp_map"] == "bitstream"
    assert report["side_info"]["partitions"] == "bitstream"
    frames = report["frames"]
    assert [f["index"] for f in frames] == list(range(10))
    assert set(frames[0]) >= {
        "index",
        "pts",
        "pict_type",
        "qp",
        "mv_count",
        "intra_fraction",
        "partitions",
    }
    assert frames[0]["pict_type"] == "I" and frames[0]["partitions"] == {"intra": 99}
    assert any(f["mv_count"] > 0 for f in frames if f["pict_type"] == "P")
    assert all(sum(f["partitions"].values()) == 99 for f in frames)
    assert report["errors"] == []


def test_summary_frames_limit_and_png(h264, tmp_path):
    res = vqe("inspect", h264, "--frames", "4", "--png", tmp_path / "png", "--png-frames", "2")
    assert res.returncode == 0, res.stderr
    assert "h264" in res.stdout and "x264" in res.stdout and "crf=23" in res.stdout
    assert "4 read of 10" in res.stdout
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == [f"frame000{i}_{k}.png" for i in range(2) for k in ("mv", "partition", "qp")]


def test_hevc_json(clip):
    path = clip(
        "h.mkv",
        codec="libx265",
        frames=6,
        options={"x265-params": "qp=32:ipratio=1:pbratio=1:aq-mode=0:log-level=none"},
    )
    report = json.loads(vqe("inspect", path, "--json").stdout)
    assert report["side_info"]["motion_vectors"] == "none"
    assert report["side_info"]["qp"] == "header"
    assert {f["qp"] for f in report["frames"]} == {32.0}


def _assert_clean_failure(code: int, stderr: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqe inspect: error:"), stderr
    assert "Traceback" not in stderr


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "text.txt").write_text("not a video\n" * 10)
    audio = make_audio_only(tmp_path / "a.m4a")
    for path in (tmp_path / "missing.mp4", tmp_path / "junk.bin"):  # the real process
        res = vqe("inspect", path)
        _assert_clean_failure(res.returncode, res.stderr)
    from service.cli import main

    for path in (tmp_path / "empty.mp4", tmp_path / "text.txt", audio):  # in-process: faster
        code = main(["inspect", str(path)])
        _assert_clean_failure(code, capsys.readouterr().err)


def test_bad_option_is_a_user_error(h264):
    res = vqe("inspect", h264, "--frames", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_qp_colours_range():
    rgb = qp_colours(np.array([[10.0, 30.0, 51.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 2, 0] > rgb[0, 2, 2]  # blue low, red high
