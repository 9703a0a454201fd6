"""Early-exit policy: frame degradation level (QP) -> number of stages to run.

Calibrated on validation data and saved next to the weights. For each QP
bin it picks the fewest stages whose mean ΔPSNR-Y is within ``tolerance``
(0.05 dB) of the best stage count (that is, of running every stage when gains
grow with depth); if that count does not gain in the bin, it picks 0 (the
frame is passed through untouched).

Records measured through the engine (enhancer.training.recalibrate) add two
things: the source of each frame, so that no count is chosen under which a
source loses more than ``guard`` in the bin, and the network time of each
count, so that a stage is run only where it earns ``price`` dB per stage of
time: the deeper stages go where the frames are compressed hardest. They
can also hold each frame's gain at several *strengths* of the network's
correction (output = input + strength x correction): the network
over-corrects lightly compressed frames (measured: at CRF 15 half of its
correction gains twice as much as all of it), so each bin also stores the
strength that gains most there.

The blind path (pixels only) and streams that carry neither a frame QP nor
the encoder's CRF have tables of their own, binned by the CRF estimated from
the decoded pixels (enhancer.pixel_qp, whose network the policy also
stores): the network then reads no QP it could trust, so its gains per bin
differ from the codec-aware ones.

Tables, by ``kind``: "h264" (by frame QP), "hevc" (by CRF), "blind" and
"blind_hevc" (by the pixel estimate, on H.264 and HEVC streams). An empty
table falls back to "h264".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_EDGES = [0.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0, 44.0, 48.0, 99.0]


@dataclass
class ExitPolicy:
    edges: list[float] = field(default_factory=lambda: list(DEFAULT_EDGES))
    stages: list[int] = field(default_factory=list)  # one per bin
    gains: list[list[float]] = field(default_factory=list)  # per bin, per stage count 1..S
    tolerance: float = 0.05
    max_stages: int = 3
    # The same for HEVC streams, binned by the stream's CRF and calibrated on x265
    # validation encodes (the model gains less on them); empty: use ``stages``.
    hevc_stages: list[int] = field(default_factory=list)
    hevc_gains: list[list[float]] = field(default_factory=list)
    # Strength of the correction per bin (empty: 1.0 everywhere).
    strengths: list[float] = field(default_factory=list)
    hevc_strengths: list[float] = field(default_factory=list)
    # The blind path's without a CRF, by the CRF estimated from the pixels (``blind_qp``:
    # PixelQP's dict, enhancer.pixel_qp), on H.264 streams.
    blind_stages: list[int] = field(default_factory=list)
    blind_gains: list[list[float]] = field(default_factory=list)
    blind_strengths: list[float] = field(default_factory=list)
    blind_qp: dict = field(default_factory=dict)
    # The same on HEVC streams without a CRF (the estimate reads x265 differently).
    blind_hevc_stages: list[int] = field(default_factory=list)
    blind_hevc_gains: list[list[float]] = field(default_factory=list)
    blind_hevc_strengths: list[float] = field(default_factory=list)

    def has(self, kind: str) -> bool:
        """Whether the ``kind`` table is calibrated (else "h264" stands in for it)."""
        return bool(self.stages if kind == "h264" else getattr(self, f"{kind}_stages"))

    def table(self, kind: str) -> tuple[list[int], list[float]]:
        """(stages, strengths) per bin of the ``kind`` table, or of "h264" if it is empty."""
        if kind != "h264" and self.has(kind):
            return getattr(self, f"{kind}_stages"), getattr(self, f"{kind}_strengths")
        return self.stages, self.strengths

    def set_table(self, kind: str, other: ExitPolicy, other_kind: str = "h264") -> None:
        """Take ``other``'s ``other_kind`` table (by default calibrate's result) as ``kind``."""
        for name in ("stages", "gains", "strengths"):
            value = getattr(other, name if other_kind == "h264" else f"{other_kind}_{name}")
            setattr(self, name if kind == "h264" else f"{kind}_{name}", value)

    def _bin(self, table: list, qp: float) -> int:
        i = int(np.searchsorted(self.edges, qp, side="right")) - 1
        return min(max(i, 0), len(table) - 1)

    def stages_for(self, qp: float | None, kind: str = "h264") -> int:
        table = self.table(kind)[0]
        if not table or qp is None or not np.isfinite(qp):
            return self.max_stages
        return table[self._bin(table, qp)]

    def strength_for(self, qp: float | None, kind: str = "h264") -> float:
        table = self.table(kind)[1]
        if not table or qp is None or not np.isfinite(qp):
            return 1.0
        return table[self._bin(table, qp)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExitPolicy:
        """From ``to_dict``; tables this version no longer has are dropped."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def calibrate(
    records: list[tuple[float, list]],
    max_stages: int,
    edges: list[float] | None = None,
    tolerance: float = 0.05,
    sources: list[str] | None = None,
    costs: list[float] | None = None,
    price: float = 0.0,
    guard: float = 0.03,
    min_frames: int = 4,
    strengths: list[float] | None = None,
    caps: list[int] | None = None,
) -> ExitPolicy:
    """records: (frame QP, [ΔPSNR-Y after stage 1..S]) for validation frames, or with
    ``strengths``, (frame QP, [[Δ after stage 1..S] per strength]).

    ``sources``: the source of each record (enables the worst-source guard, over
    sources with at least ``min_frames`` frames in a bin); ``costs``: network time of
    1..S stages relative to one; ``price``: dB a unit of that time must earn;
    ``caps``: the most stages each bin may run.
    """
    edges = list(edges or DEFAULT_EDGES)
    levels = list(strengths or [1.0])
    qps = np.array([r[0] for r in records], dtype=np.float64)
    gains = np.array([r[1] for r in records], dtype=np.float64)
    gains = gains.reshape(len(records), len(levels), max_stages)  # (N, strength, stages)
    bins = np.clip(np.searchsorted(edges, qps, side="right") - 1, 0, len(edges) - 2)
    src = np.array(sources if sources is not None else [""] * len(records))
    cost = np.array([0.0] + list(costs or range(1, max_stages + 1)), dtype=np.float64)
    chosen, picked, table = [], [], []
    for b in range(len(edges) - 1):
        sel = bins == b
        if not sel.any():
            table.append([])
            chosen.append(-1)
            picked.append(1.0)
            continue
        mean = gains[sel].mean(0)  # (strength, stages)
        allowed = np.ones_like(mean, bool)
        if sources is not None:
            for s in np.unique(src[sel]):
                mine = sel & (src == s)
                if mine.sum() >= min_frames:
                    allowed &= gains[mine].mean(0) >= -guard
        # Per stage count, the strength that gains most among those no source loses by.
        masked = np.where(allowed, mean, -np.inf)
        best_a = masked.argmax(0)
        per_k = masked[best_a, np.arange(max_stages)]
        table.append([round(float(g), 4) for g in mean[levels.index(1.0) if 1.0 in levels else -1]])
        value = np.concatenate([[0.0], per_k]) - price * cost  # index: stages run
        if caps is not None:
            value[caps[b] + 1 :] = -np.inf
        best = value.max()  # stage count 0 (pass-through) is always allowed
        # Within tolerance of the best count (= all stages when gains grow with depth).
        k = next((k for k in range(1, max_stages + 1) if value[k] >= best - tolerance), 0)
        if value[k] <= 0:
            k = 0
        chosen.append(k)
        picked.append(float(levels[best_a[k - 1]]) if k else 1.0)
    # Bins with no validation frames borrow the nearest calibrated bin.
    known = [i for i, c in enumerate(chosen) if c >= 0]
    if not known:
        return ExitPolicy(edges=edges, stages=[], gains=table, max_stages=max_stages)
    for i, c in enumerate(chosen):
        if c < 0:
            j = min(known, key=lambda j: abs(j - i))
            chosen[i], picked[i] = chosen[j], picked[j]
    return ExitPolicy(
        edges=edges,
        stages=[int(c) for c in chosen],
        gains=table,
        tolerance=tolerance,
        max_stages=max_stages,
        strengths=picked if strengths else [],
    )
