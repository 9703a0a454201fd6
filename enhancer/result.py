"""What a run hands back: per-frame statistics folded as frames flow (:class:`FrameStats`)
and the :class:`EnhanceResult` the CLI's ``--json``, the job stats and the web page show.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bitstream.types import DecodedFrame
from bitstream.writer import VideoWriter
from enhancer.output_rate import RateChoice
from enhancer.protocols import Report

__all__ = ["EnhanceResult", "FrameStats", "shape_result"]


@dataclass
class EnhanceResult:
    frames: int
    seconds: float
    fps: float
    stages_histogram: dict[int, int]
    mean_qp: float | None
    side_info: dict[str, str]  # item -> its most frequent source; "engine": the model's path
    output: str
    codec: str = ""
    crf: float | None = None
    warnings: list[str] = field(default_factory=list)
    # One record per enhanced frame: index, pict_type, qp, stages, side_info (the web page).
    frame_log: list[dict[str, Any]] = field(default_factory=list)
    # The output rate (issue 11): the quality asked for, where the CRF came from
    # (calibrated | default | explicit | lossless), the gain the table expects after
    # re-encoding (dB of PSNR-Y over the input; 0 for a pass-through), sizes, GOPs copied.
    quality: str = "balanced"
    rate_source: str = ""
    expected_gain_db: float | None = None
    size_ratio: float | None = None
    gops: int = 0
    gops_copied: int = 0
    passthrough: bool = False  # nothing was re-encoded: the video packets are the input's
    device: str = ""  # where the model ran (cpu, cuda:0); "" for an engine without one
    precision: str = ""  # bf16, fp16 or fp32

    def output_report(self) -> dict[str, Any]:
        """The output-rate fields, as the CLI's --json, the job stats and the web page show them."""
        return {
            "quality": self.quality,
            "output_crf": self.crf,
            "rate_source": self.rate_source,
            "expected_gain_db": self.expected_gain_db,
            "size_ratio": self.size_ratio,
            "gops": self.gops,
            "gops_copied": self.gops_copied,
            "passthrough": self.passthrough,
            "device": self.device,
            "precision": self.precision,
        }


class FrameStats:
    """Per-frame reports folded into the result."""

    def __init__(self) -> None:
        self.frames = 0
        self.stages: Counter[int] = Counter()
        self.qp_sum = 0.0
        self.qp_count = 0
        self.sources: dict[str, Counter[str]] = {}
        self.log: list[dict[str, Any]] = []
        self.mismatch = 0  # enhanced frames in GOPs copied as untouched

    @classmethod
    def remuxed(cls, frames: int) -> FrameStats:
        """A run that copied every frame: none enhanced, all at 0 stages."""
        stats = cls()
        stats.frames = frames
        stats.stages[0] = frames
        return stats

    def add(self, frame: DecodedFrame, report: Report) -> None:
        self.frames += 1
        self.stages[int(report.stages)] += 1
        if report.qp is not None:
            self.qp_sum += float(report.qp)
            self.qp_count += 1
        self.log.append(
            {
                "index": int(frame.index),
                "pict_type": frame.side.pict_type,
                "qp": None if report.qp is None else round(float(report.qp), 2),
                "stages": int(report.stages),
                "side_info": str(report.side_info),
            }
        )
        items = dict(frame.side.sources)
        items["engine"] = str(report.side_info)
        for key, value in items.items():
            self.sources.setdefault(key, Counter())[value] += 1

    @property
    def mean_qp(self) -> float | None:
        return round(self.qp_sum / self.qp_count, 2) if self.qp_count else None

    def side_info(self) -> dict[str, str]:
        return {key: counts.most_common(1)[0][0] for key, counts in self.sources.items()}


def shape_result(
    stats: FrameStats,
    writer: VideoWriter,
    choice: RateChoice,
    *,
    seconds: float,
    output: str,
    size_ratio: float | None,
    device: str,
    precision: str,
) -> EnhanceResult:
    """The result of a finished run; the expected gain scales with the share re-encoded."""
    remux = writer.plan.copy_all  # nothing to enhance: the engine never ran
    encoded = 1.0
    if remux:
        encoded = 0.0
    elif writer.plan.copies and writer.gops:
        encoded = 1 - writer.gops_copied / writer.gops
    gain = None if choice.expected_gain is None else round(choice.expected_gain * encoded, 4)
    return EnhanceResult(
        frames=stats.frames,
        seconds=round(seconds, 3),
        fps=round(stats.frames / seconds, 2) if seconds > 0 else 0.0,
        stages_histogram=dict(sorted(stats.stages.items())),
        mean_qp=stats.mean_qp,
        side_info=stats.side_info(),
        output=output,
        codec="copy" if remux else writer.codec,
        crf=None if remux else writer.crf,
        warnings=list(writer.warnings),
        frame_log=stats.log,
        quality=choice.quality,
        rate_source="copy" if remux else choice.source,
        expected_gain_db=0.0 if remux else gain,
        size_ratio=size_ratio,
        gops=writer.gops,
        gops_copied=writer.gops_copied,
        passthrough=remux,
        device=device,
        precision=precision,
    )
