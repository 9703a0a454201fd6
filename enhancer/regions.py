"""Running the network on rectangles of a frame instead of the whole of it.

Transfer leaves the network the tiles that changed (engine.py); tiling bounds the
memory of a large frame. Either way each rectangle is cropped with ``context``
half-resolution pixels around it, so that its own pixels see (nearly) what they
would in the whole frame, and crops of one shape are laid side by side and run
as one image: one call per shape instead of one per rectangle, which at
32-luma-pixel tiles cost more in small calls than the tiles saved.

The context may shrink stage by stage (``stage_context``): the first stage's
features need all of it, later stages' much less. Measured as the rms distance
(8-bit levels) of a tile's output from the whole frame's on bench clips (640x272,
x264 CRF 35): 0.13 with 4 pixels at every stage, 0.15-0.16 with 4, 3 and 2, and
0.20 with 3 at every stage, which cost 0.0125 dB at CRF 37 on bench/quality.
4, 3, 2 computes what 3 everywhere does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

Rect = tuple[int, int, int, int]  # half-res (y0, y1, x0, x1)


@dataclass
class _Piece:
    rect: Rect
    xa: int  # the crop's left edge in the frame
    left: int  # context columns on each side, now
    right: int


def _context_rows(rect: Rect, context: int, h: int) -> tuple[int, int]:
    y0, y1 = rect[:2]
    return y0 - max(y0 - context, 0), min(y1 + context, h) - y1


def run_regions(
    model,
    batch,
    stages: int,
    rects: list[Rect],
    context: int,
    stage_context: tuple[int, ...] | None = None,
) -> Iterator[tuple[Rect, torch.Tensor]]:
    """(rect, the network's output on it) for every rectangle; ``stage_context[k]`` is
    the context kept before stage k (at most ``context``; None keeps it all)."""
    x, inp = batch.x, batch.inputs
    _, _, h, w = x.shape
    # Crops whose rows match (height and context above) share a call: their rows are cut
    # alike when the context shrinks.
    groups: dict[tuple[int, int, int], list[_Piece]] = {}
    for rect in rects:
        top, bottom = _context_rows(rect, context, h)
        x0, x1 = rect[2:]
        xa, xb = max(x0 - context, 0), min(x1 + context, w)
        key = (rect[1] - rect[0], top, bottom)
        groups.setdefault(key, []).append(_Piece(rect, xa, x0 - xa, xb - x1))
    for (own_h, top, bottom), pieces in sorted(groups.items()):
        where = [
            (slice(p.rect[0] - top, p.rect[1] + bottom), slice(p.xa, p.rect[3] + p.right))
            for p in pieces
        ]
        xs = torch.cat([x[:, :, r, c] for r, c in where], 3)
        crops = torch.cat([inp[:, :, r, c] for r, c in where], 3)
        crops = crops.contiguous(memory_format=torch.channels_last)
        state = {"top": top, "bottom": bottom}

        def between(k: int, feat: torch.Tensor, xk: torch.Tensor, pieces=pieces, state=state):
            keep = stage_context[k] if stage_context and k < len(stage_context) else context
            cut_top = state["top"] - min(state["top"], keep)
            cut_bottom = state["bottom"] - min(state["bottom"], keep)
            if not (cut_top or cut_bottom or any(max(p.left, p.right) > keep for p in pieces)):
                return feat, xk
            rows_k = slice(cut_top, feat.shape[2] - cut_bottom)
            spans, start = [], 0
            for p in pieces:
                width = p.left + (p.rect[3] - p.rect[2]) + p.right
                cut_left, cut_right = p.left - min(p.left, keep), p.right - min(p.right, keep)
                spans.append(slice(start + cut_left, start + width - cut_right))
                start += width
                p.left, p.right = min(p.left, keep), min(p.right, keep)
            state["top"], state["bottom"] = state["top"] - cut_top, state["bottom"] - cut_bottom
            feat = torch.cat([feat[:, :, rows_k, s] for s in spans], 3)
            feat = feat.contiguous(memory_format=torch.channels_last)
            return feat, torch.cat([xk[:, :, rows_k, s] for s in spans], 3)

        hook = between if stage_context else None
        res = model(xs, crops, batch.seq_cond, batch.frame_cond, stages, True, hook)[0]
        start = 0
        for p in pieces:
            y0, y1, x0, x1 = p.rect
            a = start + p.left
            yield p.rect, res[:, :, state["top"] : state["top"] + own_h, a : a + x1 - x0]
            start += p.left + (x1 - x0) + p.right
