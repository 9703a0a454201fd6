"""Torch side: side info -> tensors, the early-exit model, training, inference engine.

The library's entry point is :func:`enhancer.enhance` (see :mod:`enhancer.api`),
:func:`enhancer.enhance_many` for many videos with one model load, and
:func:`enhancer.frames` for the enhanced frames as arrays (:mod:`enhancer.frame_stream`);
they are imported lazily so ``import enhancer.network`` stays as light as before.
"""

import os
from typing import Any

# oneDNN keeps 1024 compiled convolutions. Transfer runs the network on crops of many
# shapes (about 220 in 96 frames at 640x272, 17 convolutions each), so the default cache
# thrashed and most calls compiled their kernels again: 4096 made the network 6 % faster
# from the first frame and 19 % once a video's shapes repeat, at the same peak memory.
# It is read when oneDNN first compiles, so it is set before anything imports torch here.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

__all__ = ["BatchResult", "EnhanceOptions", "Summary", "enhance", "enhance_many", "frames"]


def __getattr__(name: str) -> Any:
    if name == "frames":
        from enhancer.frame_stream import frames

        return frames
    if name in __all__:
        from enhancer import api

        return getattr(api, name)
    raise AttributeError(f"module 'enhancer' has no attribute {name!r}")
