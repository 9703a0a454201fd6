"""`vqe enhance`: JSON summary, stdout output, quiet without a terminal, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from enhancer.features import cpu_has_bf16
from enhancer.pipeline import Progress
from service.cli import main
from service.cli.enhance import ProgressLine
from tests.clips import make_audio_only
from tests.media import packets, serve_folder, video_summary

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--stages", "1", "--device", "cpu"]


def test_json_summary_and_quiet_stderr(clip, tmp_path, capsys):
    src = clip("a.mp4", audio=True, frames=6, size=(64, 48))
    out = tmp_path / "out.mkv"
    assert main(["enhance", str(src), str(out), "--json", *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # stderr is not a terminal: no progress line
    summary = json.loads(captured.out)
    assert summary["frames"] == 6 and summary["output"] == str(out)
    assert sum(summary["stages_histogram"].values()) == 6
    assert {"seconds", "fps", "mean_qp", "side_info", "codec", "crf"} <= summary.keys()
    assert summary["device"] == "cpu"
    assert summary["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert video_summary(out).frames == 6


def test_stdout_output(clip, tmp_path):
    src = clip("a.mp4", audio=True, frames=5, size=(64, 48))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "enhance", str(src), "-", *FAST],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = tmp_path / "piped.mkv"
    out.write_bytes(result.stdout)
    assert video_summary(out).frames == 5
    assert [p.data for p in packets(out, "audio")[0]] == [p.data for p in packets(src, "audio")[0]]


def _bad_inputs(clip, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    ok = clip("c.mp4", frames=3, size=(64, 48))
    odd = clip("odd.mkv", codec="ffv1", size=(63, 47), frames=3)
    return {
        "missing": ([str(tmp_path / "nope.mp4"), str(tmp_path / "o.mp4")], "no such file"),
        "audio-only": (
            [str(make_audio_only(tmp_path / "a.m4a")), str(tmp_path / "o.mp4")],
            "no video stream",
        ),
        "text": ([str(text), str(tmp_path / "o.mp4")], "not a video"),
        "extension": ([str(ok), str(tmp_path / "o.avi")], "cannot tell the container"),
        "json-stdout": ([str(ok), "-", "--json"], "--json"),
        "crf-lossless": (
            [str(ok), str(tmp_path / "o.mkv"), "--codec", "ffv1", "--crf", "20"],
            "lossless",
        ),
        "odd-x264": ([str(odd), str(tmp_path / "o.mp4"), "--codec", "libx264"], "odd size"),
        "high-x264": (
            [str(ok), str(tmp_path / "o.mp4"), "--quality", "high", "--codec", "libx264"],
            "quality high is x265 Main10",
        ),
        "high-y4m": ([str(ok), str(tmp_path / "o.y4m"), "--quality", "high"], "raw enhanced"),
        "folder": ([str(ok), str(tmp_path / "none" / "o.mp4")], "folder does not exist"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "audio-only",
        "text",
        "extension",
        "json-stdout",
        "crf-lossless",
        "odd-x264",
        "high-x264",
        "high-y4m",
        "folder",
    ],
)
def test_bad_input_exits_2_with_one_line(clip, tmp_path, capsys, case):
    argv, message = _bad_inputs(clip, tmp_path)[case]
    assert main(["enhance", *argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqe enhance: error:"), err
    assert message in err
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


def test_progress_line_renders_eta():
    line = ProgressLine.render(Progress("enhancing", 50, 200, 12.5, 12.0))
    assert "50/200" in line and "12.5 fps" in line and "ETA 0:12" in line
    assert "ETA" not in ProgressLine.render(Progress("enhancing", 5, None, 3.0, None))


def test_a_url_is_requested_once(clip, tmp_path, capsys):
    """The source is read once: the GOP scan, the decode and the audio copy all read one
    spool of the single GET (before: four requests)."""
    from collections import Counter

    src = Path(clip("url.mp4", frames=6, audio=True))
    requests: Counter[str] = Counter()
    with serve_folder(src.parent, requests) as base:
        out = tmp_path / "from-url.mp4"
        assert main(["enhance", f"{base}/{src.name}", str(out), "--crf", "30", "--json"]) == 0
        assert requests == {f"/{src.name}": 1}
        assert json.loads(capsys.readouterr().out)["frames"] == 6
        summary = video_summary(out)
        assert summary.frames == 6 and summary.times == video_summary(src).times
        assert packets(out, "audio")[0] and not list(tmp_path.glob(".*.part"))
        assert main(["enhance", f"{base}/missing.mp4", str(tmp_path / "m.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert "404" in err and len(err.splitlines()) == 1


def _planes(path, fmt=None) -> list[tuple]:
    import av

    with av.open(str(path), format=fmt) as c:
        out = []
        for f in c.decode(video=0):
            arr = f.to_ndarray()  # planar yuv420p(10le): Y rows, then U and V
            h, w = f.height, f.width
            out.append((arr[:h].copy(), arr[h:].reshape(2, h // 2, w // 2).copy()))
        return out


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"], ids=["8-bit", "10-bit"])
def test_y4m_file_and_pipe_hold_the_ffv1_frames(clip, tmp_path, pix_fmt):
    """`vqe enhance in.mp4 out.y4m` and `- --format y4m` give the frames of --codec ffv1,
    bit for bit (read back with PyAV's yuv4mpegpipe demuxer); audio is said to be left out."""
    import av
    import numpy as np

    src = clip(f"y4m-{pix_fmt}.mkv", audio=True, frames=6, size=(64, 48), pix_fmt=pix_fmt)
    ffv1, y4m = tmp_path / "ref.mkv", tmp_path / "out.y4m"
    assert main(["enhance", str(src), str(ffv1), "--codec", "ffv1", *FAST]) == 0
    assert main(["enhance", str(src), str(y4m), *FAST]) == 0
    piped = subprocess.run(
        [sys.executable, "-m", "service.cli", "enhance", str(src), "-", "--format", "y4m", *FAST],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr.decode()
    stderr = piped.stderr.decode()
    assert stderr.count("not written") == 1 and "audio" in stderr
    assert piped.stdout.startswith(b"YUV4MPEG2 ")
    header = piped.stdout.split(b"\n", 1)[0].decode()
    assert "W64 H48" in header and "F25:1" in header
    assert ("C420p10" in header) == (pix_fmt == "yuv420p10le")
    pipe_file = tmp_path / "pipe.y4m"
    pipe_file.write_bytes(piped.stdout)
    with av.open(str(y4m)) as c:
        assert c.format.name == "yuv4mpegpipe" and len(c.streams) == 1
    want = _planes(ffv1)
    for path in (y4m, pipe_file):
        got = _planes(path, "yuv4mpegpipe")
        assert len(got) == len(want) == 6
        for (gy, guv), (wy, wuv) in zip(got, want, strict=True):
            assert np.array_equal(gy, wy) and np.array_equal(guv, wuv)


def test_format_is_for_stdout_only(clip, tmp_path, capsys):
    ok = clip("c.mp4", frames=3, size=(64, 48))
    assert main(["enhance", str(ok), str(tmp_path / "o.mkv"), "--format", "y4m"]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["enhance", str(ok), str(tmp_path / "o.y4m"), "--codec", "libx264"]) == 2
    assert "raw frames" in capsys.readouterr().err
