"""The output rate: which CRF re-encodes the enhanced frames without losing the gain.

Re-encoding costs a generation loss; the model gains 0.05-0.4 dB. So the output
CRF is not a constant offset: it is calibrated, for the weights it ships with,
on held-out sources, and stored in the weights file's meta under
``"output_rate"`` (enhancer.training.rate_calibration measures it)::

    python -m enhancer.training.rate_calibration --weights W --footage ../shared/footage

For each input CRF (x264, preset medium) it measures, per source, the net
ΔPSNR-Y of the re-encoded output over the input (both against the clean
source) and the output/input size at output CRF = input CRF - margin for a
range of margins, then picks per quality:

* ``balanced`` (the default): among margins whose worst source loses at most
  ``CALIBRATION_WORST_DB`` and whose mean size is at most ``CALIBRATION_MAX_SIZE``
  times the input's (half and 0.9 of the promise's ``WORST_DB`` and ``MAX_SIZE``),
  the smallest margin (smallest file) that keeps at least ``KEEP`` of the best
  mean net gain reachable there;
* ``compact``: the smallest margin with a mean net gain of at least
  ``COMPACT_MIN_DB`` (and the same worst-source bound);
* ``high``: ``balanced``'s rule over re-encodes with x265 Main10 (yuv420p10le, even
  from 8-bit input; margins ``HIGH_MARGINS`` on the x264 scale, the x265 CRF is
  ``crf_on_scale``'s), the encoder that keeps the most of the gain (bench/output.py),
  keeping ``HIGH_KEEP`` instead of ``KEEP`` of the best net gain (at ``KEEP`` x265
  Main10 lands at about the input's size, a smaller file than ``balanced``'s, not more
  of the gain);
* ``archive``: no table: lossless FFV1, all of the gain.

Where no margin qualifies, re-encoding loses more than the model gains at
that level: the entry says ``copy`` and the pipeline passes the video
through (a remux, net 0 dB, same size) unless the user forces a CRF.

Without a calibrated table (an older weights file) :data:`DEFAULT_TABLE` is
used: vqe-v1's measured table, expected gain reported unknown (see its comment);
a calibrated table without ``high`` (calibrated before it existed) takes
:data:`DEFAULT_TABLE`'s ``high`` the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

from bitstream.writer import crf_on_scale
from enhancer.options import QUALITIES

__all__ = [
    "DEFAULT_TABLE",
    "QUALITIES",
    "OutputRate",
    "RateChoice",
    "RateEntry",
    "choose_rate",
    "output_crf",
]

INPUT_CRFS = (18, 22, 27, 32, 37, 42)
MARGINS = (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
# x265 Main10 keeps its gain at larger margins (bench/output.py: input CRF 37 best at x265
# CRF 19, margin 23 on the x264 scale; CRF 27 at 13, margin 19).
HIGH_MARGINS = (8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28)
KEEP = 0.5
HIGH_KEEP = 0.9
WORST_DB = -0.05
MAX_SIZE = 3.0
# The bounds a margin must meet on the calibration's crops, tighter than the promise so
# that it holds on other crops of a video: vqe-v5's CRF 27 entry met the promise there
# (worst source -0.032 dB, 2.81x) and missed it on bench/output's (-0.083 dB, 3.06x).
CALIBRATION_WORST_DB = WORST_DB / 2
CALIBRATION_MAX_SIZE = 0.9 * MAX_SIZE
COMPACT_MIN_DB = 0.02
# Without any hint of the input's level: x264's default CRF.
UNKNOWN_LEVEL = 23.0
CRF_LIMITS = (0.0, 51.0)


@dataclass
class RateEntry:
    level: float  # input CRF (x264 scale)
    margin: float  # output CRF = level - margin (the best net gain when ``copy``)
    copy: bool  # re-encoding loses the gain here: pass the video through
    net_gain: float  # mean net ΔPSNR-Y of the output over the input, dB (0 when copy)
    worst: float  # the worst source's
    size_ratio: float  # mean output size / input size (1 when copy)
    lossless_gain: float  # the enhanced frames before re-encoding (what archive keeps)


@dataclass
class RateChoice:
    """What the pipeline does with one video's output."""

    quality: str
    crf: float | None  # None: lossless (archive)
    preset: str
    copy: bool  # pass the whole video through (nothing worth re-encoding)
    expected_gain: float | None  # dB, from the table (None: unknown)
    expected_size: float | None  # output/input, from the table
    level: float | None  # the input's level the choice was made for
    source: str  # "calibrated" | "default" | "explicit" | "lossless"


@dataclass
class OutputRate:
    tables: dict[str, list[RateEntry]]
    preset: str = "medium"
    # Mean frame QP minus CRF of the calibration encodes: bitstream.writer.input_level
    # reads an input's level from its mean QP with it.
    qp_offset: float = 2.0
    source: str = "calibrated"
    measured: dict[str, Any] = field(default_factory=dict)  # the raw grid, for the record
    defaulted: frozenset[str] = frozenset()  # qualities taken from DEFAULT_TABLE

    def to_dict(self) -> dict:
        return {
            "tables": {q: [asdict(e) for e in t] for q, t in self.tables.items()},
            "preset": self.preset,
            "qp_offset": self.qp_offset,
            "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibrated") -> OutputRate:
        tables = {q: [RateEntry(**e) for e in t] for q, t in d["tables"].items()}
        missing = frozenset(DEFAULT_TABLE["tables"]) - frozenset(tables)
        for q in missing:  # a table calibrated before the level existed
            tables[q] = [RateEntry(**e) for e in DEFAULT_TABLE["tables"][q]]
        return cls(
            tables,
            d.get("preset", "medium"),
            float(d.get("qp_offset", 2.0)),
            source,
            d.get("measured", {}),
            missing if source != "default" else frozenset(),
        )

    @classmethod
    def from_meta(cls, meta: dict | None) -> OutputRate:
        """The weights' calibrated table, else :data:`DEFAULT_TABLE`."""
        if meta and isinstance(meta.get("output_rate"), dict):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return cls.from_dict(meta["output_rate"])
        return cls.from_dict(DEFAULT_TABLE, source="default")

    def entry(self, level: float | None, quality: str) -> RateEntry:
        table = sorted(self.tables[quality], key=lambda e: e.level)
        level = UNKNOWN_LEVEL if level is None else level
        return min(table, key=lambda e: abs(e.level - level))

    def choose(
        self, level: float | None, quality: str = "balanced", codec: str = "libx264"
    ) -> RateChoice:
        """The output CRF for an input at ``level`` (x264 CRF scale), nearest calibrated level."""
        if quality == "archive":
            gain = None
            if "balanced" in self.tables and self.source != "default":
                gain = self.entry(level, "balanced").lossless_gain
            return RateChoice(quality, None, self.preset, False, gain, None, level, "lossless")
        e = self.entry(level, quality)
        base = UNKNOWN_LEVEL if level is None else level
        # The default table measured nothing of these weights.
        source = "default" if quality in self.defaulted else self.source
        known = source != "default"
        return RateChoice(
            quality,
            round(output_crf(base, e.margin, codec), 1),
            self.preset,
            e.copy,
            e.net_gain if known else None,
            e.size_ratio if known else None,
            level,
            source,
        )


def output_crf(level: float, margin: float, codec: str) -> float:
    """The output CRF as ``codec`` reads it for an input at ``level`` (x264 scale) and
    ``margin``: level - margin within the CRF limits, on the codec's scale (the one rule
    of the table's choice and of its calibration)."""
    crf = min(max(level - margin, CRF_LIMITS[0]), CRF_LIMITS[1])
    return min(crf_on_scale(codec, crf), CRF_LIMITS[1])


def choose_rate(
    meta: dict | None, level: float | None, quality: str, codec: str, crf: float | None
) -> RateChoice:
    """The pipeline's entry point: an explicit ``crf`` wins over the table."""
    rate = OutputRate.from_meta(meta)
    choice = rate.choose(level, quality, codec)
    if crf is not None and quality != "archive":
        choice.crf, choice.copy, choice.source = float(crf), False, "explicit"
        choice.expected_gain = choice.expected_size = None
    return choice


# For a weights file without its own table: the table measured on vqe-v1 (this command,
# --dry-run, 7 held-out sources, 320x256, 16 frames, x264 medium, 11 minutes on 2 busy
# cores; bench/results/output_rate-vqe-v1.json). v1's gain (0.0-0.3 dB on the enhanced
# frames) does not survive a re-encode below CRF 42 at any margin up to 18 within 3x the
# size, so those levels say copy: the video is passed through, which is never worse than
# the input. A flat margin is not safe: input - 14 measured -0.78 dB at 7.9x (CRF 22).
# Expected gains are reported as unknown for other weights (they measured nothing of them).
_V1_ROWS = [  # quality, input CRF, margin, copy, net dB, worst dB, size, lossless dB
    ("balanced", 18, 18, True, 0.0, 0.0, 1.0, -0.0034),
    ("balanced", 22, 18, True, 0.0, 0.0, 1.0, 0.0332),
    ("balanced", 27, 18, True, 0.0, 0.0, 1.0, 0.0964),
    ("balanced", 32, 18, True, 0.0, 0.0, 1.0, 0.1365),
    ("balanced", 37, 18, True, 0.0, 0.0, 1.0, 0.2333),
    ("balanced", 42, 14, False, 0.1196, -0.0484, 1.639, 0.2943),
    ("compact", 18, 18, True, 0.0, 0.0, 1.0, -0.0034),
    ("compact", 22, 18, True, 0.0, 0.0, 1.0, 0.0332),
    ("compact", 27, 18, True, 0.0, 0.0, 1.0, 0.0964),
    ("compact", 32, 18, True, 0.0, 0.0, 1.0, 0.1365),
    ("compact", 37, 18, True, 0.0, 0.0, 1.0, 0.2333),
    ("compact", 42, 14, False, 0.1196, -0.0484, 1.639, 0.2943),
]
# ``high`` had no table when v1 was measured: a weights file without one (or calibrated
# before the level existed) gets vqe-v3's (python -m enhancer.training.rate_calibration
# --quality high: x265 Main10, preset medium, the same 7 held-out sources, 320x256, 16
# frames; 10 minutes on 2 busy cores; bench/results/output_rate-vqe-v3-high.json), expected
# gain reported unknown.
_V3_HIGH_ROWS = [  # quality, input CRF, margin, copy, net dB, worst dB, size, lossless dB
    ("high", 18, 18, True, 0.0, 0.0, 1.0, 0.0006),
    ("high", 22, 22, True, 0.0, 0.0, 1.0, 0.1713),
    ("high", 27, 18, False, 0.3507, 0.0431, 2.444, 0.3437),
    ("high", 32, 20, False, 0.4177, 0.1722, 2.373, 0.4414),
    ("high", 37, 22, False, 0.5, 0.158, 2.366, 0.5119),
    ("high", 42, 22, False, 0.4721, 0.1518, 1.845, 0.5118),
]
_FIELDS = ("level", "margin", "copy", "net_gain", "worst", "size_ratio", "lossless_gain")
DEFAULT_TABLE: dict = {
    "preset": "medium",
    "qp_offset": 2.55,
    "tables": {
        q: [dict(zip(_FIELDS, row[1:], strict=True)) for row in rows if row[0] == q]
        for q, rows in (
            ("balanced", _V1_ROWS),
            ("compact", _V1_ROWS),
            ("high", _V3_HIGH_ROWS),
        )
    },
}
