"""Model files of format 2 still load (enhancer.checkpoint's old-format reader).

The shipped vqe-v3.pt was format 2 until its output rate was recalibrated (issue 32),
which re-saved it in the current format; this file writes a format-2 file itself, in
that layout, so the old-format reader stays tested without a shipped one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enhancer.checkpoint import FORMAT, load_model, save_model
from enhancer.network import QPEstimator
from enhancer.pixel_qp import PixelQP, PixelQPNet
from enhancer.policy import KINDS, calibrate
from enhancer.training import own_network
from tests.enhancer.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _flat(policy) -> dict:
    """ExitPolicy in format 2's flat layout: one ``edges``, the kind as a field prefix."""
    d = {"tolerance": policy.tolerance, "max_stages": policy.max_stages}
    for kind, table in policy.tables.items():
        d["edges"] = table.edges
        prefix = "" if kind == "h264" else f"{kind}_"
        d |= {f"{prefix}stages": table.stages, f"{prefix}gains": table.gains,
              f"{prefix}strengths": table.strengths}  # fmt: skip
    return d


def _format_2(path, model, est, policy, pixel_qp, meta) -> None:
    """What vqe wrote as ``vqe-model/2``: the pixel CRF estimate base64 inside the policy."""
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    torch.save(
        {
            "format": "vqe-model/2",
            "config": model.cfg.to_dict(),
            "model": half(model.state_dict()),
            "estimator": half(est.state_dict()),
            "policy": _flat(policy) | {"blind_qp": pixel_qp.to_dict()},
            "meta": meta,
        },
        path,
    )


def test_a_format_2_file_loads_and_saves_as_the_current_format(tmp_path):
    torch.manual_seed(3)
    model, est = tiny_model(seed=3), QPEstimator().eval()
    policy = calibrate([(30.0, [0.1, 0.2, 0.25]), (40.0, [0.3, 0.4, 0.5])], max_stages=3)
    pixel_qp = PixelQP(PixelQPNet(8), offset=7.0)
    meta = {"version": "old", "output_rate": {"tables": {}}}
    old = tmp_path / "old.pt"
    _format_2(old, model, est, policy, pixel_qp, meta)
    loaded = load_model(old)
    assert loaded.policy == policy and loaded.meta == meta
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[k], v.half().float())
    assert loaded.pixel_qp and loaded.pixel_qp.offset == 7.0
    y = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    want = PixelQP.from_dict(pixel_qp.to_dict()).frame_qp(y)  # the fp16 weights
    assert loaded.pixel_qp.frame_qp(y) == want
    loaded.save(tmp_path / "new.pt")
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    assert blob["format"] == FORMAT and "blind_qp" not in blob["policy"]
    again = load_model(tmp_path / "new.pt")
    assert again.policy == policy and again.meta == meta
    assert again.pixel_qp.frame_qp(y) == want
    for kind in KINDS:
        for qp in (None, 20.0, 35.0, 45.0):
            assert again.policy.stages_for(qp, kind) == policy.stages_for(qp, kind)


def test_own_network_puts_a_trained_network_on_a_route(tmp_path):
    """training.own_network: the network of one exported file becomes a route's own in
    another, with what it borrows; the main network and the tables stay; another config or
    an unknown route is refused."""
    est = QPEstimator().eval()
    save_model(tmp_path / "into.pt", tiny_model(seed=1), est, None, {"version": "main"})
    save_model(tmp_path / "blind.pt", tiny_model(seed=2), est, None, {"version": "b"})
    args = ["--into", str(tmp_path / "into.pt"), "--network", str(tmp_path / "blind.pt")]
    assert own_network.main([*args, "--route", "blind", "--write", str(tmp_path / "o.pt")]) == 0
    out, into = load_model(tmp_path / "o.pt"), load_model(tmp_path / "into.pt")
    blind = load_model(tmp_path / "blind.pt").network.state_dict()
    assert set(out.own_networks) == {"blind"} and out.references("blind") == "decoded"
    assert out.meta["blind_network"] == "b" and out.meta["version"] == "main"
    for k, v in out.own_networks["blind"][0].state_dict().items():
        assert torch.equal(v, blind[k])
    for k, v in out.network.state_dict().items():
        assert torch.equal(v, into.network.state_dict()[k])
    save_model(tmp_path / "wide.pt", tiny_model(seed=2, partitions=False), est, None, {})
    with pytest.raises(ValueError, match="main network's config"):
        wide = load_model(tmp_path / "wide.pt")
        own_network.with_own_network(into, "blind", wide, "decoded").save(tmp_path / "x.pt")
    with pytest.raises(SystemExit):
        own_network.main([*args, "--route", "av1", "--write", str(tmp_path / "x.pt")])
