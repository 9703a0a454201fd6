"""Torch side: side info -> tensors, the early-exit model, training, inference engine.

The library's entry point is :func:`enhancer.enhance` (see :mod:`enhancer.api`),
:func:`enhancer.enhance_many` for many videos with one model load, and
:func:`enhancer.frames` for the enhanced frames as arrays (:mod:`enhancer.frame_stream`);
they are imported lazily so ``import enhancer.network`` stays as light as before.
"""

from typing import Any

__all__ = ["BatchResult", "EnhanceOptions", "Summary", "enhance", "enhance_many", "frames"]


def __getattr__(name: str) -> Any:
    if name == "frames":
        from enhancer.frame_stream import frames

        return frames
    if name in __all__:
        from enhancer import api

        return getattr(api, name)
    raise AttributeError(f"module 'enhancer' has no attribute {name!r}")
