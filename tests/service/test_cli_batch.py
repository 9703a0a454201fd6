"""`vqe enhance` on many videos (and `enhancer.enhance_many`): one model load, a failed
video does not stop the others, existing outputs are skipped, usage errors exit 2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import enhancer.engine
from enhancer import enhance_many
from enhancer.multi import BatchItem, BatchProgress
from enhancer.pipeline import Progress
from service.cli import main
from service.cli.batch import BatchLine
from tests.clips import noise_bytes
from tests.service_fixtures import count_frames

FAST = ["--stages", "1", "--device", "cpu"]
FRAMES = {"a.mp4": 3, "b.mkv": 4, "c.mov": 5, "d.mp4": 6}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model load in this process (the real one, counted)."""
    calls: list[str] = []
    real = enhancer.engine.load_model

    def counted(*args, **kwargs):
        calls.append("load_model")
        return real(*args, **kwargs)

    monkeypatch.setattr(enhancer.engine, "load_model", counted)
    return calls


@pytest.fixture
def folder(clip, tmp_path: Path) -> Path:
    """Four small clips, one corrupt "video" and a text file that is not a video."""
    root = tmp_path / "in"
    root.mkdir()
    for name, frames in FRAMES.items():
        (root / name).write_bytes(
            clip(name, size=(64, 48), frames=frames, seed=frames).read_bytes()
        )
    (root / "bad.mp4").write_bytes(noise_bytes(2000))
    (root / "notes.txt").write_text("not a video, and not taken for one\n")
    return root


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_folder_with_a_corrupt_video_then_resume(folder, tmp_path, capsys, loads):
    out = tmp_path / "out"
    assert main(["enhance", str(folder), str(out), *FAST]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted(FRAMES)  # no bad.mp4, no .part
    for name, frames in FRAMES.items():
        assert count_frames(out / name) == frames
    assert len(loads) == 1  # one model load for the whole batch
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].count("bad.mp4") == 1, captured.err
    assert errors[0].startswith("vqe enhance: error:") and "Traceback" not in captured.err
    table = captured.out.splitlines()
    assert table[0].split()[:3] == ["file", "result", "frames"]
    rows = {line.split()[0]: line for line in table[1:-1]}
    assert set(rows) == {*FRAMES, "bad.mp4"} and "FAILED" in rows["bad.mp4"]
    assert all(rows[n].split()[1:3] == ["done", str(f)] for n, f in FRAMES.items()), table
    assert "4 done, 0 skipped (output exists), 1 failed" in table[-1]

    # Again: the four outputs are skipped (untouched), the bad one fails again.
    before = _mtimes(out)
    assert main(["enhance", str(folder), str(out), *FAST]) == 1
    captured = capsys.readouterr()
    assert _mtimes(out) == before
    assert "0 done, 4 skipped (output exists), 1 failed" in captured.out.splitlines()[-1]

    # Without the bad one, nothing is left to do: exit 0 and the model is not even loaded.
    (folder / "bad.mp4").unlink()
    loads.clear()
    assert main(["enhance", str(folder), "-o", str(out), *FAST]) == 0
    assert loads == [] and _mtimes(out) == before
    assert "0 done, 4 skipped" in capsys.readouterr().out


def test_files_with_o_overwrite_and_json(clip, tmp_path, capsys, loads):
    a = clip("a.mp4", size=(64, 48), frames=3)
    raw = clip("e.264", size=(64, 48), frames=4)  # a raw stream: written as e.mkv
    out = tmp_path / "out"
    argv = ["enhance", str(a), str(raw), "-o", str(out), "--json", *FAST]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["done"] == 2 and summary["failed"] == 0 and len(loads) == 1
    assert [f["output"] for f in summary["files"]] == [str(out / "a.mp4"), str(out / "e.mkv")]
    assert [f["frames"] for f in summary["files"]] == [3, 4]
    assert summary["files"][0]["summary"]["stages_histogram"] == {"1": 3}
    assert count_frames(out / "e.mkv") == 4
    before = _mtimes(out)
    assert main([*argv, "--overwrite"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["done"] == 2 and again["skipped"] == 0
    assert all(_mtimes(out)[n] != t for n, t in before.items())


def test_python_api_one_load_and_per_video_errors(folder, tmp_path, loads):
    batch = enhance_many(
        [folder / "a.mp4", folder / "bad.mp4", folder / "b.mkv"],
        tmp_path / "lib-out",
        {"stages": 1},
        device="cpu",
    )
    assert [i.status for i in batch.items] == ["done", "failed", "done"]
    assert [i.result.frames for i in batch.items if i.result] == [3, 4]
    error = batch.items[1].error
    assert error and "\n" not in error and "not a video" in error, error
    assert len(loads) == 1 and not batch.ok and len(batch.failed) == 1


def _usage_errors(folder: Path, tmp_path: Path) -> dict[str, list[str]]:
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.mp4").write_bytes((folder / "a.mp4").read_bytes())
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    return {
        "no output": [str(folder / "a.mp4")],
        "three without -o": [str(folder / "a.mp4"), str(folder / "b.mkv"), str(tmp_path / "o")],
        "missing input": [str(folder / "nope.mp4"), "-o", str(tmp_path / "o")],
        "same folder": [str(folder), "-o", str(folder)],
        "same output name": [
            str(folder / "a.mp4"),
            str(other / "a.mp4"),
            "-o",
            str(tmp_path / "o"),
        ],
        "output is a file": [str(folder), "-o", str(a_file)],
        "empty folder": [str(tmp_path / "empty"), str(tmp_path / "o")],
        "bad option": [str(folder), str(tmp_path / "o"), "--stages", "9"],
        "stdout": [str(folder), "-o", "-"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "no output",
        "three without -o",
        "missing input",
        "same folder",
        "same output name",
        "output is a file",
        "empty folder",
        "bad option",
        "stdout",
    ],
)
def test_usage_errors_exit_2_with_one_line(folder, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    argv = _usage_errors(folder, tmp_path)[case]
    assert main(["enhance", *argv, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("vqe enhance: error:"), (
        captured.err
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_batch_line_shows_the_batch_and_the_file():
    stream = io.StringIO()
    line = BatchLine(stream, live=True)
    item = BatchItem("in/b.mp4", "out/b.mp4")
    line(BatchProgress(1, 5, item, Progress("enhancing", 10, 30, 5.0, 4.0)))
    assert "[2/5] b.mp4" in stream.getvalue() and "10/30" in stream.getvalue()
    item.status, item.error = "failed", "not a video"
    line(BatchProgress(1, 5, item))
    assert stream.getvalue().endswith("vqe enhance: error: in/b.mp4: not a video\n")
