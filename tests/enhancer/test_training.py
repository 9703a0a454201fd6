"""enhancer.training: sources, encodes, the cached dataset, samples, metrics, and one real run.

The run is tiny: three 512x384 synthetic photos, 6-frame 128x128 sequences,
two validation CRFs, an 8-channel 2-stage model and a handful of steps.
"""

from __future__ import annotations

import copy
import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitstream.reader import open_video
from enhancer.batch import collate
from enhancer.checkpoint import load_model, save_model
from enhancer.engine import Engine
from enhancer.pixel_qp import PixelQP, PixelQPNet
from enhancer.references import input_plan, reference_indices
from enhancer.training import data, train
from enhancer.training.anchors import attach_all
from enhancer.training.evaluate import estimator_spread, format_table, luma, psnr_y, score
from enhancer.training.samples import attach_pixel_crf, frame_inputs, true_qp_map
from enhancer.training.sources import (
    VALIDATION_SOURCES,
    clean_sequence,
    footage_sources,
    split_sources,
)

FRAMES, SIZE, VAL_CRFS = 6, (128, 128), (27, 42)  # photo_sequence needs 120 px


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_footage(root: Path) -> Path:
    """Three small synthetic photos: one validation source (Kite), two for training."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    assert "Kite" in VALIDATION_SOURCES
    for seed, name in enumerate(["Kite", "alpha", "beta"]):
        rng = np.random.default_rng(seed)
        coarse = rng.integers(0, 256, (25, 33, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((512, 384), Image.BICUBIC), np.int16)
        img = img + rng.integers(-12, 13, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(photos / f"{name}.png")
    (root / "photos" / "notes.txt").write_text("not a photo\n")
    return root


# ---------------------------------------------------------------- sources and encodes


def test_footage_sources_and_split_by_source(tmp_path):
    footage = make_footage(tmp_path / "f")
    (footage / "clips").mkdir()
    (footage / "clips" / "vtest.mp4").write_bytes(b"")
    (footage / "clips" / "walk.mkv").write_bytes(b"")
    sources = footage_sources(footage)
    assert [n for n, _ in sources] == ["Kite", "alpha", "beta", "vtest", "walk"]  # photos first
    assert [n for n, _ in split_sources(sources, True)] == ["Kite", "vtest"]
    assert [n for n, _ in split_sources(sources, False)] == ["alpha", "beta", "walk"]
    assert footage_sources(tmp_path / "nothing") == []


def test_clean_sequence_from_a_photo(tmp_path):
    footage = make_footage(tmp_path / "f")
    photos = sorted((footage / "photos").glob("*.png"))
    seq = clean_sequence(photos[0], photos, {}, np.random.default_rng(0), 4, (144, 128))
    assert len(seq) == 4
    for y, u, v in seq:
        assert y.shape == (128, 144) and u.shape == v.shape == (64, 72)
        assert y.dtype == u.dtype == np.uint8
    assert not np.array_equal(seq[0][0], seq[3][0])  # the camera moves
    again = clean_sequence(photos[0], photos, {}, np.random.default_rng(0), 4, (144, 128))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(seq, again, strict=True))


def test_encode_settings_options():
    assert data.EncodeSettings(crf=27).options() == {"crf": "27", "preset": "medium"}
    s = data.EncodeSettings(crf=31.5, preset="fast", bframes=2, b_pyramid="none", ref=1, keyint=12)
    assert s.options() == {"crf": "31.5", "preset": "fast",
                           "x264-params": "bframes=2:keyint=12:b-pyramid=none:ref=1"}  # fmt: skip
    h = data.EncodeSettings(codec="libx265", crf=30, bframes=0, b_pyramid="none", ref=2)
    assert h.options() == {"crf": "30", "preset": "medium",
                           "x265-params": "bframes=0:log-level=none"}  # fmt: skip


def test_random_settings_are_seeded_and_plausible():
    draws = [data.random_settings(np.random.default_rng([0, k])) for k in range(40)]
    again = [data.random_settings(np.random.default_rng([0, k])) for k in range(40)]
    assert draws == again
    assert {s.codec for s in draws} == {"libx264", "libx265"}
    for s in draws:
        assert 14 <= s.crf <= 51 and s.preset in data.PRESETS
        if s.codec == "libx265":
            assert s.b_pyramid is None and s.ref is None


# ---------------------------------------------------------------- metrics


def test_psnr_y_score_and_table():
    x = torch.full((1, 6, 4, 4), 100 / 255)
    assert float(psnr_y(x, x)) > 100
    assert float(psnr_y(x + 1 / 255, x)) == pytest.approx(20 * np.log10(255), abs=1e-3)
    assert float(psnr_y(x + 5.0, x)) == pytest.approx(float(psnr_y(torch.ones_like(x), x)))
    result = {"crf": {27.0: {"input": 30.0, "s1": 0.1, "s2": 0.2, "blind": -0.1},
                      42.0: {"input": 25.0, "s1": 0.2, "s2": 0.3, "blind": 0.1}}}  # fmt: skip
    # Mean of both paths at full depth, losses counted double: (0.2 - 0.2 + 0.3 + 0.1) / 4.
    assert score(result, 2) == pytest.approx(0.1)
    assert score(result, 2, paths=("blind",)) == pytest.approx((-0.2 + 0.1) / 2)
    assert score(result, 2, paths=("aware",)) == pytest.approx(0.25)
    table = format_table(result, 2).splitlines()
    assert table[0].split() == ["CRF", "input", "s1", "s2", "blind"]
    assert table[1].split() == ["27", "30.00", "+0.100", "+0.200", "-0.100"]
    assert len(table) == 3
    assert estimator_spread(result) is None  # no blind estimates in this result
    result["crf"][27.0]["est_qp"], result["crf"][42.0]["est_qp"] = 34.9, 34.9
    assert estimator_spread(result) == 0.0  # what the collapsed estimator gave
    assert format_table(result, 2).splitlines()[1].split()[-1] == "34.90"
    weights = train.qp_weight(torch.tensor([37.0, 31.0, 60.0])).tolist()
    assert weights == pytest.approx([1.0, 2.0, 2 ** (-14 / 6)])  # QP clamped to 51


# ---------------------------------------------------------------- one real run


def train_args(footage: Path, work: Path, steps: int, *extra: str) -> list[str]:
    return ["--footage", str(footage), "--work", str(work), "--version", "tiny",
            "--train-count", "2", "--steps", str(steps), "--batch", "2", "--patch", "32",
            "--channels", "8", "--stages", "2", "--blocks", "1", "--val-every", "2",
            "--val-frames", "1", "--log-every", "2", "--workers", "1", "--threads", "1",
            *extra]  # fmt: skip


def fork_work(src: Path, dst: Path, files=("last.pt", "best.pt", "train.log")) -> Path:
    """A copy of a work folder's checkpoints and log, sharing the (read-only) cache."""
    dst.mkdir(parents=True)
    for name in files:
        shutil.copy2(src / name, dst / name)
    (dst / "cache").symlink_to(src / "cache")
    return dst


def log_after(path: Path, marker: str | None = None) -> str:
    text = path.read_text()
    return text[text.rindex(marker) :] if marker else text


@pytest.fixture(scope="module")
def small_data():
    """Shrink the dataset (6 frames of 64x48, two validation CRFs) for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "FRAMES", FRAMES)
        mp.setattr(data, "SIZE", SIZE)
        mp.setattr(data, "VAL_SIZE", SIZE)
        mp.setattr(data, "VAL_CRFS", VAL_CRFS)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """One real `python -m enhancer.training.train` run: build, 4 steps, validation, export."""
    root = tmp_path_factory.mktemp("train")
    footage = make_footage(root / "footage")
    work = root / "work"
    assert train.main(train_args(footage, work, 4)) == 0
    return root, footage, work


def test_train_builds_trains_validates_and_exports(trained):
    _, _, work = trained
    cache = work / "cache"
    val = sorted(p.stem for p in (cache / "val").glob("*.npz"))
    assert val == sorted(f"Kite_crf{c}" for c in VAL_CRFS)  # only the validation source
    hevc = sorted(p.stem for p in (cache / "val-hevc").glob("*.npz"))
    assert hevc == sorted(f"Kite_libx265_crf{c}" for c in VAL_CRFS)
    assert sorted(p.stem for p in (cache / "train").glob("*.npz")) == ["s00000", "s00001"]
    log = (work / "train.log").read_text()
    assert "dataset val: wrote 2" in log and "dataset train: wrote 2" in log
    assert "dataset val-hevc: wrote 2" in log
    assert "loaded 2 train / 2 validation samples; device cpu" in log
    assert "step 2 lr" in log and "step 4 lr" in log
    for step in (2, 4):
        assert f"validation at step {step}" in log
    assert "new best" in log
    header = re.findall(r"CRF\s+input\s+s1\s+s2\s+blind\s+est_qp\n", log)
    assert len(header) == 4  # two validations, the final one and the x265 one
    assert "x265 validation" in log and "HEVC exit policy: stages" in log
    for crf in VAL_CRFS:  # one row per CRF and table, each with 5 finite numbers
        rows = re.findall(rf"^\s+{crf} ((?:\s+[-+]?\d+\.\d+){{5}})$", log, re.M)
        assert len(rows) == 4, crf
    assert "exit policy: edges" in log and "exported" in log
    last = torch.load(work / "last.pt", weights_only=False)
    best = torch.load(work / "best.pt", weights_only=False)
    assert last["step"] == 4 and best["step"] in (2, 4)
    tiny = load_model(work / "tiny.pt")
    model, pol, meta = tiny.network, tiny.policy, tiny.meta
    assert (model.cfg.channels, model.cfg.stages, model.cfg.blocks_per_stage) == (8, 2, 1)
    h264, hevc = pol.tables["h264"], pol.tables["hevc"]
    assert pol.max_stages == 2 and len(h264.stages) == len(h264.edges) - 1
    assert len(hevc.stages) == len(hevc.edges) - 1
    assert meta["version"] == "tiny" and meta["step"] == best["step"]
    assert tiny.pixel_qp  # the default weights' estimate is carried over
    assert "pixel CRF estimate of 4 sequences" in log
    assert sorted(float(k) for k in meta["validation"]) == list(map(float, VAL_CRFS))
    for k, v in best["model"].items():  # the export is the best checkpoint in fp16
        assert torch.equal(model.state_dict()[k], v.half().float())


def test_cached_samples_hold_the_planned_references(trained):
    _, _, work = trained
    samples = data.load_cache(work / "cache" / "train") + data.load_cache(work / "cache" / "val")
    assert len(samples) == 4
    w, h = SIZE
    for s in samples:
        assert s["dec"].shape == s["clean"].shape == (FRAMES, h * 3 // 2, w)
        assert s["qp_map"].shape == s["partition"].shape == (FRAMES, h // 16, w // 16)
        picts = ["IPB?"[int(p)] for p in s["pict"]]
        assert picts[0] == "I"
        codec = str(s["codec"])
        for name, kind in data.SLOTS:
            plan = input_plan(codec, "auto" if kind == "peaks" else "blind")
            past, future = reference_indices(picts, plan)
            idx = s[f"{name}_idx"].tolist()
            assert idx == (past if name.endswith("past") else future), name
            assert s[name].shape == s["dec"].shape
            cost = s[f"{name}_cost"].astype(np.float32)
            assert cost.shape == (FRAMES, h // 8, w // 8)
            assert ((cost >= 0) & (cost <= 1)).all()
            for t, j in enumerate(idx):
                if j < 0:  # no reference: nothing stored, the worst cost
                    assert s[name][t].max() == 0 and (cost[t] == 1).all()
                else:
                    assert s[name][t].max() > 0 and cost[t].mean() < 0.2
        if codec == "libx264":
            assert np.isfinite(s["qp_map"]).all() and np.isfinite(s["frame_qp"]).all()
    crfs = sorted(float(s["crf"]) for s in samples if str(s["codec"]) == "libx264")
    assert {27.0, 42.0} <= set(crfs)


def test_frame_inputs_follow_the_input_plan(trained):
    _, _, work = trained
    sample = data.load_cache(work / "cache" / "val")[0]  # Kite at CRF 27, libx264
    assert str(sample["codec"]) == "libx264" and float(sample["crf"]) == 27.0
    picts = ["IPB?"[int(p)] for p in sample["pict"]]
    t = next(i for i in range(1, FRAMES) if sample["peak_past_idx"][i] >= 0)
    item, target = frame_inputs(sample, t)
    assert item.cur.shape == target.shape == (6, 64, 64)
    assert item.pict_type == picts[t] and item.frame_qp == pytest.approx(sample["frame_qp"][t])
    assert item.seq_qp == 27.0 and item.seq_known
    assert item.qmap.shape == (1, 64, 64) and item.parts.shape == (4, 64, 64)
    j = int(sample["peak_past_idx"][t])
    assert item.refs[0].qp == pytest.approx(sample["frame_qp"][j])
    assert item.refs[0].pixels.shape == (6, 64, 64) and item.refs[0].cost.shape == (1, 64, 64)
    assert (item.refs[1] is None) == (sample["peak_future_idx"][t] < 0)
    # The first frame has no past anchor.
    assert frame_inputs(sample, 0)[0].refs[0] is None
    # Crops keep the block grid; dropped references are missing.
    crop, ctarget = frame_inputs(sample, t, (16, 32, 32), drop_refs=(True, False))
    assert crop.cur.shape == ctarget.shape == (6, 16, 16) and crop.refs[0] is None
    assert torch.equal(crop.cur, item.cur[:, 8:24, 16:32])
    assert torch.equal(crop.qmap, item.qmap[:, 8:24, 16:32])
    # Blind: the adjacent frames, no QP map, picture type or frame QP; the CRF stays.
    blind, _ = frame_inputs(sample, t, blind=True)
    assert blind.qmap is None and blind.parts is None
    assert blind.pict_type == "?" and blind.frame_qp is None
    assert blind.seq_qp == 27.0 and all(r is None or r.qp is None for r in blind.refs)
    assert int(sample["adj_past_idx"][t]) == t - 1 and blind.refs[0] is not None
    assert torch.equal(blind.cur, item.cur)
    # With the pixel estimate attached, the blind path is told it (plus training noise),
    # as the engine tells it: on frame t the estimate of frames 0..t; the codec-aware path
    # keeps the stream's CRF.
    reads = PixelQP(PixelQPNet(4).eval(), offset=5.0)
    assert attach_pixel_crf([sample], reads) == 1
    qps = [reads.frame_qp(data.unpack_yuv(p)[0]) for p in sample["dec"]]
    assert len(sample["pixel_crf"]) == len(qps)
    assert sample["pixel_crf"][0] == pytest.approx(reads.crf(qps[:1]))
    told = float(sample["pixel_crf"][t])
    assert told == pytest.approx(reads.crf(qps[: t + 1])) and told != 27.0
    assert frame_inputs(sample, t, blind=True)[0].seq_qp == pytest.approx(told)
    noisy = frame_inputs(sample, t, blind=True, crf_noise=-2.0)[0]
    assert noisy.seq_qp == pytest.approx(told - 2.0) and noisy.seq_known
    assert frame_inputs(sample, t)[0].seq_qp == 27.0


def test_truth_guidance_hands_the_clean_references_on_the_same_flows(trained):
    _, _, work = trained
    sample = data.load_cache(work / "cache" / "val")[0]
    t = next(i for i in range(1, FRAMES) if sample["peak_past_idx"][i] >= 0)
    j = int(sample["peak_past_idx"][t])
    dec, _ = frame_inputs(sample, t)
    truth, target = frame_inputs(sample, t, truth=True)
    # Same side information and costs; only the reference pixels change.
    assert torch.equal(truth.cur, dec.cur) and torch.equal(truth.refs[0].cost, dec.refs[0].cost)
    clean_j = torch.from_numpy(sample["clean"][j].astype(np.int16))
    dec_j = torch.from_numpy(sample["dec"][j].astype(np.int16))
    assert not torch.equal(clean_j, dec_j)
    # The stored decoded reference is the decoded anchor warped by the stored flow; the
    # clean one is the clean anchor warped by the same flow, so it lies nearer the target.
    err = lambda r: float((r.pixels - target).abs().mean())  # noqa: E731
    assert err(truth.refs[0]) < err(dec.refs[0])
    crop, _ = frame_inputs(sample, t, (16, 32, 32), truth=True)
    assert torch.equal(crop.refs[0].pixels, truth.refs[0].pixels[:, 8:24, 16:32])


def test_pixel_crf_estimates_are_kept_for_the_next_start(trained, tmp_path):
    _, _, work = trained
    samples = data.load_cache(work / "cache" / "val")
    reads = PixelQP(PixelQPNet(4).eval(), offset=5.0)
    assert attach_pixel_crf(samples, reads, tmp_path) == len(samples)
    (kept,) = tmp_path.glob("pixel_crf-*.npz")

    class Unread(PixelQP):  # the same weights; reading a frame again would be a bug
        def frame_qp(self, y, bit_depth=8):
            raise AssertionError("recomputed")

    again = data.load_cache(work / "cache" / "val")
    assert attach_pixel_crf(again, Unread(reads.net, 5.0), tmp_path) == len(again)
    for a, b in zip(samples, again, strict=True):
        assert np.array_equal(a["pixel_crf"], b["pixel_crf"])
    rebuilt = data.load_cache(work / "cache" / "val")[:1]  # other frames, same file name
    rebuilt[0]["dec"] = rebuilt[0]["dec"] ^ 1
    with pytest.raises(AssertionError, match="recomputed"):
        attach_pixel_crf(rebuilt, Unread(reads.net, 5.0), tmp_path)
    other = PixelQP(PixelQPNet(4).eval(), offset=6.0)  # another estimate: its own file
    attach_pixel_crf(data.load_cache(work / "cache" / "val"), other, tmp_path)
    assert len(list(tmp_path.glob("pixel_crf-*.npz"))) == 2 and kept.exists()


def test_patch_sampler_is_seeded_and_fits(trained):
    _, _, work = trained
    samples = data.load_cache(work / "cache" / "train")
    a = train.PatchSampler(samples, 32, seed=3, blind_p=0.5, drop_ref_p=0.5)
    b = train.PatchSampler(samples, 32, seed=3, blind_p=0.5, drop_ref_p=0.5)
    items, target = a.batch(4)
    items_b, target_b = b.batch(4)
    assert target.shape == (4, 6, 16, 16) and torch.equal(target, target_b)
    for it, ib in zip(items, items_b, strict=True):
        assert it.cur.shape == (6, 16, 16) and torch.equal(it.cur, ib.cur)
        assert len(it.refs) == 2
        for r in it.refs:
            assert r is None or (r.pixels.shape == (6, 16, 16) and r.cost.shape == (1, 16, 16))
    with pytest.raises(SystemExit, match="--patch 144 is larger than every training sample"):
        train.PatchSampler(samples, 144, 0, 0.0, 0.0)  # 128 px samples: no 144 patch


def test_patch_sampler_gives_the_estimator_the_true_map_on_either_path(trained):
    """The QP estimator's target is the stream's QP map on blind samples too, where the
    network is not given it: the map the same crop has on the codec-aware path."""
    _, _, work = trained
    samples = [s for s in data.load_cache(work / "cache" / "train") if s["codec"] == "libx264"]
    sample, crop = samples[0], (16, 16, 32)
    aware, _ = frame_inputs(sample, 2, crop)
    blind, _ = frame_inputs(sample, 2, crop, blind=True)
    assert blind.qmap is None and aware.qmap is not None
    assert torch.equal(true_qp_map(sample, 2, (16, 16, 32, 32)), aware.qmap)
    sampler = train.PatchSampler(samples, 32, seed=3, blind_p=0.5, drop_ref_p=0.0)
    items, _ = sampler.batch(16)
    assert any(it.qmap is None for it in items) and any(it.qmap is not None for it in items)
    for it, truth in zip(items, sampler.qmaps, strict=True):
        assert truth.shape == (1, 16, 16)
        assert it.qmap is None or torch.equal(it.qmap, truth)


def test_train_resumes_from_last_checkpoint(trained, tmp_path):
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / "w")
    assert train.main(train_args(footage, work2, 6)) == 0
    log = log_after(work2 / "train.log", "dataset val: 2 samples cached")
    assert "dataset train: 2 samples cached" in log and "wrote 2" not in log  # nothing rebuilt
    assert "resumed from step 4" in log
    assert "validation at step 6" in log and "validation at step 2" not in log
    assert "step 6 lr" in log and "step 2 lr" not in log
    assert torch.load(work2 / "last.pt", weights_only=False)["step"] == 6
    assert load_model(work2 / "tiny.pt").meta["step"] in (2, 4, 6)


def test_train_export_only(trained, tmp_path):
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / "w")
    before = (work2 / "last.pt").read_bytes()
    assert train.main(train_args(footage, work2, 6, "--export-only", "--skip-build")) == 0
    log = log_after(work2 / "train.log", "final validation")
    assert "exported" in log
    log = log_after(work2 / "train.log")[len((work / "train.log").read_text()) :]
    assert "loaded" not in log and "validation at step" not in log and "dataset" not in log
    assert (work2 / "last.pt").read_bytes() == before  # no training happened
    best = torch.load(work2 / "best.pt", weights_only=False)
    resumed = load_model(work2 / "tiny.pt")
    model, meta = resumed.network, resumed.meta
    assert meta["step"] == best["step"]
    for k, v in best["model"].items():
        assert torch.equal(model.state_dict()[k], v.half().float())


def test_train_on_one_codecs_sequences(trained, tmp_path):
    """--codec trains on that codec's sequences and selects on its validation set; a cache
    without that codec's sequences is refused."""
    _, footage, work = trained
    train_files = sorted((work / "cache" / "train").glob("*.npz"))
    codecs = [str(np.load(p)["codec"]) for p in train_files]
    assert sorted(codecs) == ["libx264", "libx265"]  # the fixture's seed gives one of each
    for codec in codecs:
        work2 = fork_work(work, tmp_path / codec)
        assert train.main([*train_args(footage, work2, 6, "--skip-build"), "--codec", codec]) == 0
        log = log_after(work2 / "train.log")[len((work / "train.log").read_text()) :]
        assert "loaded 1 train / 2 validation samples" in log
        assert f"--codec {codec}: its training sequences only" in log
    # The same cache with its x264 sequence only.
    only = fork_work(work, tmp_path / "x264-only")
    (only / "cache").unlink()
    (only / "cache" / "train").mkdir(parents=True)
    for entry in (work / "cache").iterdir():
        if entry.name != "train":
            (only / "cache" / entry.name).symlink_to(entry)
    x264 = train_files[codecs.index("libx264")]
    (only / "cache" / "train" / x264.name).symlink_to(x264)
    args = [*train_args(footage, only, 6, "--skip-build"), "--codec", "libx265"]
    with pytest.raises(SystemExit, match="--codec libx265: no training sequence"):
        train.main(args)


def test_train_the_blind_path_alone(trained, tmp_path, monkeypatch):
    """--blind-only: every sample blind, no anchor refresh, selected on the blind column."""
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / "blind")
    asked = []

    def scored(result, stages, paths=None):  # the trainer's own score, paths recorded
        asked.append(paths)
        return score(result, stages, paths)

    monkeypatch.setattr(train, "score", scored)
    real_batch = train.PatchSampler.batch
    blind_flags = []

    def batch(self, n):
        blind_flags.append(self.blind_p)
        return real_batch(self, n)

    monkeypatch.setattr(train.PatchSampler, "batch", batch)
    assert train.main([*train_args(footage, work2, 8, "--skip-build"), "--blind-only"]) == 0
    log = log_after(work2 / "train.log")[len((work / "train.log").read_text()) :]
    assert "--blind-only: every sample blind" in log
    assert "enhanced the anchors" not in log
    assert asked and set(asked) == {("blind",)} and blind_flags and set(blind_flags) == {1.0}


def test_log_mse_loss_measures_what_the_psnr_gain_averages():
    """Doubling a patch's error costs log 4, whatever its scale: each sample's PSNR counts
    alike (the Charbonnier distance weighs large errors more)."""
    torch.manual_seed(0)
    target = torch.rand(2, 6, 8, 8)
    err = torch.randn(2, 6, 8, 8) * torch.tensor([0.01, 0.1]).view(2, 1, 1, 1)
    step = train.log_mse(target + 2 * err, target) - train.log_mse(target + err, target)
    assert torch.allclose(step, torch.full((2,), float(np.log(4.0))), atol=1e-4)


@pytest.mark.parametrize("loss", ["psnr", "mixed", "charbonnier"])
def test_train_with_the_psnr_loss(trained, tmp_path, monkeypatch, loss):
    """--loss psnr / mixed: the log squared error of every stage's output is minimised
    (alone, or added to the Charbonnier distance); the default leaves it out."""
    _, footage, work = trained
    work2 = fork_work(work, tmp_path / loss)
    minimised = []
    real = torch.Tensor.backward

    def backward(self, *a, **k):
        minimised.append(float(self.detach()))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    calls = []
    real_log = train.log_mse
    monkeypatch.setattr(train, "log_mse", lambda a, b: calls.append(1) or real_log(a, b))
    assert train.main([*train_args(footage, work2, 6, "--skip-build"), "--loss", loss]) == 0
    assert "resumed from step 4" in log_after(work2 / "train.log")
    assert len(calls) == (0 if loss == "charbonnier" else 2 * 2)  # two steps, two stages
    # The log of squared errors below 1 is negative; the Charbonnier distance is not.
    assert len(minimised) == 2
    if loss != "mixed":
        assert all((v < 0) == (loss == "psnr") for v in minimised)


def test_export_keeps_the_init_files_output_rate(trained, tmp_path):
    """A fine-tune's export keeps the rate tables of the model file it started from, what
    its engine hands the network from the anchors, and the routes' own networks."""
    _, footage, work = trained
    init = load_model(work / "tiny.pt")
    table = {"balanced": {"22": {"margin": 4}}, "calibrated": "test"}
    init.meta["output_rate"] = table
    init.meta["references"] = "enhanced"
    hevc = copy.deepcopy(init.network)
    with torch.no_grad():
        hevc.inp.bias.add_(0.5)
    init = replace(init, own_networks={"hevc": (hevc, init.estimator)})
    init.meta["hevc_references"] = "decoded"
    init.save(tmp_path / "init.pt")
    work2 = fork_work(work, tmp_path / "w")
    args = train_args(footage, work2, 6, "--export-only", "--skip-build")
    assert train.main([*args, "--init", str(tmp_path / "init.pt")]) == 0
    out = load_model(work2 / "tiny.pt")
    meta = out.meta
    assert meta["output_rate"] == table and meta["references"] == "enhanced"
    assert list(out.own_networks) == ["hevc"] and meta["hevc_references"] == "decoded"
    kept = out.own_networks["hevc"][0].state_dict()
    assert all(torch.equal(v, hevc.state_dict()[k].half().float()) for k, v in kept.items())
    assert meta["output_rate_source"].startswith(str(tmp_path / "init.pt"))
    assert train.main(train_args(footage, work2, 6, "--export-only", "--skip-build")) == 0
    meta = load_model(work2 / "tiny.pt").meta
    assert "output_rate" not in meta and "references" not in meta  # nothing to keep


@pytest.mark.parametrize("source", ["exported", "checkpoint"])
def test_train_init_from_model_file(trained, tmp_path, source):
    _, footage, work = trained
    init = work / ("tiny.pt" if source == "exported" else "best.pt")
    init_step = torch.load(work / "best.pt", weights_only=False)["step"]
    work2 = tmp_path / "w"
    work2.mkdir()
    (work2 / "cache").symlink_to(work / "cache")
    # lr 0: the weights must come out exactly as they went in.
    args = train_args(footage, work2, 2, "--skip-build", "--init", str(init), "--lr", "0")
    assert train.main(args) == 0
    log = (work2 / "train.log").read_text()
    assert f"initialised from {init} (trained {init_step} steps)" in log
    assert "resumed" not in log
    out, ref = load_model(work2 / "tiny.pt"), load_model(work / "tiny.pt")
    out, out_est, ref, ref_est = out.network, out.estimator, ref.network, ref.estimator
    for k, v in ref.state_dict().items():
        assert torch.equal(out.state_dict()[k], v), k
    for k, v in ref_est.state_dict().items():
        assert torch.equal(out_est.state_dict()[k], v), k


def test_coarse_branch_grows_from_a_network_without_one(trained, tmp_path):
    """--coarse with --init: the body starts as the init's and the new branch at zero
    output, so step 0 is the init network; the branch then trains at --coarse-lr."""
    _, footage, work = trained
    work2 = tmp_path / "w"
    work2.mkdir()
    (work2 / "cache").symlink_to(work / "cache")
    init = work / "tiny.pt"
    args = [
        "--skip-build",
        "--init",
        str(init),
        "--coarse",
        "8",
        "--lr",
        "0",
        "--coarse-lr",
        "1e-2",
    ]
    assert train.main(train_args(footage, work2, 2, *args)) == 0
    grown, ref = load_model(work2 / "tiny.pt").network, load_model(init).network
    assert grown.cfg.coarse == 8 and ref.coarse is None
    for k, v in ref.state_dict().items():  # lr 0: the body is the init's
        assert torch.equal(grown.state_dict()[k], v), k
    assert grown.coarse.out.weight.abs().max() > 0  # it left zero: the branch trains
    work3 = tmp_path / "w3"
    work3.mkdir()
    (work3 / "cache").symlink_to(work / "cache")
    for other in (["--channels", "4"], ["--stages", "3"]):
        with pytest.raises(SystemExit, match="does not fit"):
            train.main(train_args(footage, work3, 2, "--skip-build", "--init", str(init),
                                  *other))  # fmt: skip


def _ema_lag(ck: dict, start: dict) -> float:
    """How far a checkpoint's average moved from ``start``, relative to its raw weights."""
    moved = [
        (ck["model"][k] - v).abs().max() / (ck["train_model"][k] - v).abs().max()
        for k, v in start.items()
        if (ck["train_model"][k] - v).abs().max() > 0
    ]
    assert moved
    return float(max(moved))


def test_ema_weights_are_validated_and_exported(trained, tmp_path):
    """--ema: the average is what best.pt holds and the export ships; training goes on raw."""
    _, footage, work = trained
    work2 = tmp_path / "w"
    work2.mkdir()
    (work2 / "cache").symlink_to(work / "cache")
    init = work / "tiny.pt"
    args = train_args(footage, work2, 2, "--skip-build", "--init", str(init), "--ema", "0.999")
    assert train.main(args) == 0
    last = torch.load(work2 / "last.pt", weights_only=False)
    assert _ema_lag(last, load_model(init).network.state_dict()) < 0.01  # 2 steps at 0.999
    shipped = load_model(work2 / "tiny.pt").network.state_dict()
    best = torch.load(work2 / "best.pt", weights_only=False)
    for k, v in best["model"].items():
        assert torch.equal(shipped[k], v.half().float())
    assert train.main(train_args(footage, work2, 4, "--skip-build", "--ema", "0.999")) == 0
    again = torch.load(work2 / "last.pt", weights_only=False)
    assert "resumed from step 2" in (work2 / "train.log").read_text()
    # The resumed average goes on from the saved one, not from the raw weights.
    assert _ema_lag(again, last["model"]) < 0.01


def test_enhanced_anchors_are_what_the_engine_borrows(trained, tmp_path):
    """Training's enhanced-anchor inputs give the recurrent engine's output, frame for frame."""
    root, footage, work = trained
    tiny = load_model(work / "tiny.pt")
    model, est, policy, meta = tiny.network, tiny.estimator, tiny.policy, tiny.meta
    with torch.no_grad():  # a model whose output moves far from its input, refs included
        for stage in model.stages:
            stage.head.weight.mul_(300.0)
    weights = tmp_path / "loud.pt"
    save_model(weights, model, est, policy, meta)
    loud = load_model(weights)
    model, est = loud.network, loud.estimator
    photos = sorted((footage / "photos").glob("*.png"))
    clean = clean_sequence(photos[1], photos, {}, np.random.default_rng(5), 9, SIZE)
    settings = data.EncodeSettings(crf=37, bframes=2, keyint=250)
    stream = data.encode_planes(clean, settings)
    sample = data.decode_sample(stream, clean, settings)
    picts = ["IPB?"[int(p)] for p in sample["pict"]]
    assert "B" in picts and picts.count("P") >= 2
    assert sample["peak_past_flow"].shape == (9, 2, SIZE[1] // 8, SIZE[0] // 8)
    attach_all([sample], model, est, bf16=False)
    with open_video(io.BytesIO(stream)) as reader:
        info, frames = reader.info, list(reader)
    # Transfer off: the comparison is of the network's inputs, frame by frame.
    engine = Engine(weights, device="cpu", precision="fp32", recurrent=True, transfer=False)
    got = [f.planes[0] for f, _ in engine.process(iter(frames), info, stages=2)]

    def predicted(t: int, enhanced: bool) -> np.ndarray:
        item, _ = frame_inputs(sample, t, enhanced=enhanced)
        with torch.no_grad():
            batch = collate([item], model, est)
            out = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond)[-1]
        return (luma(out).clamp(0, 1) * 255).round()[0, 0].numpy()

    borrowed = [t for t in range(9) if sample["peak_past_idx"][t] > 0 or picts[t] == "B"]
    assert borrowed
    for t in borrowed:
        engine_y = got[t].astype(np.float64)
        assert np.abs(predicted(t, True) - engine_y).mean() < 0.2, t
        assert np.abs(predicted(t, False) - engine_y).mean() > 1.0, t
