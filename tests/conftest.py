"""Shared pytest fixtures: tiny synthetic clips (see ``tests/clips.py``), cached per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.clips import make_clip


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``clip("name.mp4", **make_clip_kwargs) -> Path``.

    Identical requests share one file for the whole session, so tests can ask
    for the clip they need without paying for the encode twice.
    """
    root = tmp_path_factory.mktemp("clips")
    cache: dict[str, Path] = {}

    def factory(name: str = "clip.mp4", **kwargs: Any) -> Path:
        key = name + json.dumps(kwargs, sort_keys=True, default=str)
        if key not in cache:
            sub = root / f"c{len(cache)}"
            sub.mkdir()
            cache[key] = make_clip(sub / name, **kwargs)
        return cache[key]

    return factory
