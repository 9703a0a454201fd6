"""The network on rectangles of a frame (enhancer.regions): crops with context, side by side,
the context cut stage by stage."""

from __future__ import annotations

import pytest
import torch

from enhancer.batch import FrameInputs, collate
from enhancer.regions import run_regions
from tests.enhancer.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 48, 80  # half-res frame: big enough for several separate rectangles
# Tiles of 16 as transfer makes them: one at the frame's corner, two on one row (laid side
# by side), one taller, and one against the right edge.
RECTS = [(0, 16, 0, 16), (16, 32, 16, 48), (16, 32, 64, 80), (32, 48, 32, 48), (0, 32, 48, 64)]


def _frame(coarse: int = 0):
    g = torch.Generator().manual_seed(7)
    model = tiny_model(coarse=coarse)
    cur = torch.rand(6, H, W, generator=g)
    qmap = torch.full((1, H, W), 37.0 / 51)
    item = FrameInputs(cur=cur, qmap=qmap, frame_qp=37.0, seq_qp=35.0, seq_known=True)
    batch = collate([item], model, None)
    return model, batch


@pytest.mark.parametrize("coarse", [0, 8])
@pytest.mark.parametrize("shrink", [None, (4, 3, 2)])
def test_each_rectangle_gets_its_own_pixels_close_to_the_whole_frames(shrink, coarse):
    """With a coarse branch too: it runs on the whole frame, so crops see its context."""
    model, batch = _frame(coarse)
    with torch.no_grad():
        full = model(batch.x, batch.inputs, batch.seq_cond, batch.frame_cond, 3, True)[0]
        seen = []
        for rect, res in run_regions(model, batch, 3, RECTS, 4, shrink):
            y0, y1, x0, x1 = rect
            seen.append(rect)
            assert res.shape == (1, 6, y1 - y0, x1 - x0)
            # Only the context is cut: away from a crop's edges the tile is the frame's.
            err = (res - full[:, :, y0:y1, x0:x1]).abs()
            assert float(err.max()) < 0.01  # one pixel of context everywhere: 0.023
            assert float(err.mean()) < 5e-4
    assert sorted(seen) == sorted(RECTS)


def test_later_stages_run_on_less_context():
    model, batch = _frame()
    widths = {}
    stage_forward = type(model.stages[0]).forward

    def spy(self, feat, emb, head=True):
        widths.setdefault(self, []).append(feat.shape[-2:])
        return stage_forward(self, feat, emb, head)

    rects = [(16, 32, 16, 32)]  # one tile with 4 pixels of context all around
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model.stages[0]), "forward", spy)
        list(run_regions(model, batch, 3, rects, 4, (4, 3, 2)))
    shapes = [widths[s][0] for s in model.stages]
    assert shapes == [(24, 24), (22, 22), (20, 20)]
