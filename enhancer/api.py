"""``enhance(input, output, options) -> Summary``: the whole product as one function.

    from enhancer import enhance
    summary = enhance("in.mp4", "out.mp4", {"stages": "auto", "crf": 20})
    print(summary.frames, summary.fps, summary.stages_histogram)

Many videos with one model load: ``enhance_many(inputs, output_dir, options)``
(see :mod:`enhancer.multi`).

It reads ``input`` (a path, a URL or a binary file object) with
:mod:`bitstream.reader`, runs :class:`enhancer.engine.Engine` on every frame
and writes ``output`` with :mod:`bitstream.writer`, streaming (see
:mod:`enhancer.pipeline`). Nothing here needs the service's packages
(FastAPI, SQLAlchemy, Redis). Errors are :class:`bitstream.errors.VqeError`
subclasses with a one-line message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enhancer.multi import BatchResult, enhance_many
from enhancer.options import EnhanceOptions
from enhancer.pipeline import EnhanceResult, Pipeline, Progress, Source

__all__ = ["BatchResult", "EnhanceOptions", "Progress", "Summary", "enhance", "enhance_many"]

Summary = EnhanceResult  # frames, seconds, fps, stages histogram, mean QP, side info, output


def enhance(
    input: Source,  # noqa: A002 - the name a reader expects
    output: str | Path,
    options: EnhanceOptions | Mapping[str, Any] | None = None,
    *,
    device: str = "auto",
    tile: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Summary:
    """Enhance ``input`` into ``output`` (``-``: Matroska on stdout) and say what was done.

    ``options``: an :class:`EnhanceOptions` or a dict of its fields (codec, crf,
    preset, stages, side_info, max_frames); checked before anything is read.
    ``device``: auto | cpu | cuda[:N]. ``progress`` is called from the model's thread;
    setting ``cancel`` stops the run (:class:`enhancer.pipeline.Cancelled`).
    """
    return Pipeline(device=device, tile=tile).run(input, output, options, progress, cancel)
