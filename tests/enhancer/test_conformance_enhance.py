"""Every H.264 conformance stream enhances end to end with the frame count of a plain decode.

The streams live in ``../shared/conformance/h264`` (skipped when absent). By
default a representative subset runs, capped at ``SUBSET_FRAMES`` frames;
``-m slow`` runs every stream in full (``VQE_CONFORMANCE_FRAMES`` caps it).
The SVC stream PyAV cannot open must fail with exit 2 and one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import pytest

from bitstream.reader import open_video
from enhancer.pipeline import EnhanceOptions, Pipeline
from service.cli import main
from tests.media import fast_engine

CONFORMANCE = Path(__file__).resolve().parents[2].parent / "shared/conformance/h264"
UNOPENABLE = "sps_subsetsps_bothVUI.264"
SUBSET_FRAMES = 6
SUBSET = [
    "BA_MW_D_IDR_LOST.264",  # baseline CAVLC, lost IDR
    "CVFC1_Sony_C.jsv",  # frame cropping to 326x168
    "CVPCMNL1_SVA_C.264",  # PCM macroblocks
    "Cisco_Men_whisper_640x320_CABAC_Bframe_9.264",  # CABAC, B frames
    "MR2_TANDBERG_E.264",  # multiple reference frames
    "Error_I_P.264",  # damaged: decode errors concealed
    "test_scalinglist_jm.264",  # scaling lists, 320x192
]

pytestmark = pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="no ../shared/conformance/h264")


def all_streams() -> list[str]:
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p.name for p in CONFORMANCE.iterdir() if p.name != UNOPENABLE)


def plain_frame_count(path: Path, cap: int | None) -> int:
    with open_video(path, side_info=False) as reader:
        count = 0
        for _ in reader:
            count += 1
            if cap is not None and count == cap:
                break
        return count


def enhance_and_count(name: str, tmp_path: Path, cap: int | None) -> None:
    src, out = CONFORMANCE / name, tmp_path / "out.mkv"
    options = EnhanceOptions(preset="ultrafast", max_frames=cap)
    result = Pipeline(fast_engine()).run(src, out, options)
    expected = plain_frame_count(src, cap)
    with av.open(str(out)) as container:
        written = sum(1 for _ in container.decode(video=0))
    assert result.frames == written == expected


@pytest.mark.parametrize("name", SUBSET)
def test_subset(name, tmp_path):
    enhance_and_count(name, tmp_path, SUBSET_FRAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", all_streams())
def test_every_stream(name, tmp_path):
    cap = int(os.environ.get("VQE_CONFORMANCE_FRAMES", "0")) or None
    enhance_and_count(name, tmp_path, cap)


def test_unopenable_stream_exits_2(tmp_path, capsys):
    out = tmp_path / "o.mkv"
    assert main(["enhance", str(CONFORMANCE / UNOPENABLE), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqe enhance: error:") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())
