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
4, 3, 2 computes what 3 everywhere does. A network's coarse context branch
(network.CoarseContext) runs once on the whole frame and is cut like the inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

Rect = tuple[int, int, int, int]  # half-res (y0, y1, x0, x1)


@dataclass(frozen=True)
class _Piece:
    rect: Rect
    xa: int  # the crop's left edge in the frame
    left: int  # context columns on each side
    right: int

    def width(self, keep) -> int:
        return keep(self.left) + self.rect[3] - self.rect[2] + keep(self.right)


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
    context_map: torch.Tensor | None = None,
) -> Iterator[tuple[Rect, torch.Tensor]]:
    """(rect, the network's output on it) for every rectangle; ``stage_context[k]`` is
    the context kept before stage k (at most ``context``; None keeps it all).
    ``context_map``: ``model.context`` of the whole frame, where the caller has it
    (one call per tile of a large frame); None computes it."""
    x, inp = batch.x, batch.inputs
    _, _, h, w = x.shape
    if context_map is None:
        context_map = model.context(inp)  # None without a coarse branch

    def kept(k: int):
        """side's context -> what of it is kept before stage k."""
        return lambda side: min(side, *stage_context[: k + 1]) if stage_context else side

    # Crops whose rows match (height and context above and below) share a call: their
    # rows are cut alike when the context shrinks.
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
        ctx = None
        if context_map is not None:
            ctx = torch.cat([context_map[:, :, r, c] for r, c in where], 3)
        last = [0]  # the last stage the network reached

        def between(k: int, feat: torch.Tensor, xk: torch.Tensor, pieces=pieces, top=top,
                    bottom=bottom, last=last):  # fmt: skip
            last[0] = k
            was, now = kept(k - 1), kept(k)

            def cut(side: int) -> int:
                return was(side) - now(side)

            sides = (top, bottom, *(c for p in pieces for c in (p.left, p.right)))
            if not any(cut(c) for c in sides):
                return feat, xk
            rows = slice(cut(top), feat.shape[2] - cut(bottom))
            spans, start = [], 0
            for p in pieces:
                spans.append(slice(start + cut(p.left), start + p.width(was) - cut(p.right)))
                start += p.width(was)
            feat = torch.cat([feat[:, :, rows, s] for s in spans], 3)
            feat = feat.contiguous(memory_format=torch.channels_last)
            return feat, torch.cat([xk[:, :, rows, s] for s in spans], 3)

        hook = between if stage_context else None
        res = model(xs, crops, batch.seq_cond, batch.frame_cond, stages, True, hook, ctx)[0]
        final = kept(last[0])
        start = 0
        for p in pieces:
            y0, y1, x0, x1 = p.rect
            a = start + final(p.left)
            yield p.rect, res[:, :, final(top) : final(top) + own_h, a : a + x1 - x0]
            start += p.width(final)
