"""Early-exit policy: frame degradation level (QP) -> number of stages to run.

Calibrated on validation data and saved next to the weights. For each QP
bin it picks the fewest stages whose mean ΔPSNR-Y is within ``tolerance``
(0.05 dB) of the best stage count (that is, of running every stage when gains
grow with depth); if that count does not gain in the bin, it picks 0 (the
frame is passed through untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def stages_for(self, qp: float | None, hevc: bool = False) -> int:
        table = self.hevc_stages if hevc and self.hevc_stages else self.stages
        if not table or qp is None or not np.isfinite(qp):
            return self.max_stages
        i = int(np.searchsorted(self.edges, qp, side="right")) - 1
        return table[min(max(i, 0), len(table) - 1)]

    def to_dict(self) -> dict:
        return {
            "edges": self.edges,
            "stages": self.stages,
            "gains": self.gains,
            "tolerance": self.tolerance,
            "max_stages": self.max_stages,
            "hevc_stages": self.hevc_stages,
            "hevc_gains": self.hevc_gains,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExitPolicy:
        return cls(**d)


def calibrate(
    records: list[tuple[float, list[float]]],
    max_stages: int,
    edges: list[float] | None = None,
    tolerance: float = 0.05,
) -> ExitPolicy:
    """records: (frame QP, [ΔPSNR-Y after stage 1..S]) for validation frames."""
    edges = list(edges or DEFAULT_EDGES)
    qps = np.array([r[0] for r in records], dtype=np.float64)
    gains = np.array([r[1] for r in records], dtype=np.float64).reshape(len(records), max_stages)
    bins = np.clip(np.searchsorted(edges, qps, side="right") - 1, 0, len(edges) - 2)
    chosen, table = [], []
    for b in range(len(edges) - 1):
        sel = bins == b
        if not sel.any():
            table.append([])
            chosen.append(-1)
            continue
        mean = gains[sel].mean(0)
        table.append([round(float(g), 4) for g in mean])
        # Within tolerance of the best count (= all stages when gains grow with depth).
        k = next(s for s in range(1, max_stages + 1) if mean[s - 1] >= mean.max() - tolerance)
        chosen.append(k if mean[k - 1] > 0 else 0)
    # Bins with no validation frames borrow the nearest calibrated bin.
    known = [i for i, c in enumerate(chosen) if c >= 0]
    if not known:
        return ExitPolicy(edges=edges, stages=[], gains=table, max_stages=max_stages)
    for i, c in enumerate(chosen):
        if c < 0:
            chosen[i] = chosen[min(known, key=lambda j: abs(j - i))]
    return ExitPolicy(
        edges=edges, stages=chosen, gains=table, tolerance=tolerance, max_stages=max_stages
    )
