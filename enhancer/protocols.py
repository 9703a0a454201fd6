"""What the pipeline asks of an engine, as types: the real ``enhancer.engine.Engine`` meets
them all; a test double or a bench engine needs only :class:`FrameEngine`.

The optional parts are checked with ``isinstance`` (runtime-checkable protocols), in place
of ``getattr`` with a default: an engine that can plan a frame's stages from its side info
alone (:class:`PlansStages`) lets the pipeline copy untouched GOPs; one that checks options
(:class:`ChecksOptions`) refuses them before any frame is decoded; one with weights meta
(:class:`Calibrated`) brings its output-rate table; one that says where it runs
(:class:`Placed`) has that reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from bitstream.types import DecodedFrame, FrameSideInfo, SequenceInfo

__all__ = ["Calibrated", "ChecksOptions", "FrameEngine", "Placed", "PlansStages", "Report"]


class Report(Protocol):
    """What the engine says of one enhanced frame (``enhancer.engine.FrameReport``)."""

    @property
    def stages(self) -> int: ...

    @property
    def qp(self) -> float | None: ...

    @property
    def side_info(self) -> str: ...


class FrameEngine(Protocol):
    def process(
        self, frames: Iterable[DecodedFrame], info: SequenceInfo, stages: str | int, side_info: str
    ) -> Iterator[tuple[DecodedFrame, Report]]:
        """Enhance ``frames`` (display order); one report per frame, in order."""
        ...


@runtime_checkable
class ChecksOptions(Protocol):
    def check(self, stages: str | int, side_info: str) -> str | int:
        """Raise ValueError for options these weights cannot run."""
        ...


@runtime_checkable
class PlansStages(Protocol):
    def plan_stages(
        self, side: FrameSideInfo, info: SequenceInfo, stages: str | int, side_info: str
    ) -> int | None:
        """The stages ``process`` will run on a frame; None when the pixels decide."""
        ...


@runtime_checkable
class Calibrated(Protocol):
    meta: dict[str, Any] | None  # the weights file's meta ("output_rate" among it)


@runtime_checkable
class Placed(Protocol):
    device: Any  # torch.device or its name
    precision: str  # bf16, fp16 or fp32
