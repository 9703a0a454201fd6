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
the decoded pixels (enhancer.pixel_qp, stored beside the policy in the model
file): the network then reads no QP it could trust, so its gains per bin
differ from the codec-aware ones.

On those tables each bin can also store an *offset* to the estimate that the
network is told (told CRF = estimate + offset): the network was trained on
estimates as accurate as they are on its training sources, and on other
footage it gains more at CRF 22-27 when told a CRF a few steps lower than the
estimate (measured: +0.06 dB at x264 CRF 27 told 4 lower), less at CRF 37.
The table's bin is still looked up by the estimate itself.

Grain: lightly compressed frames keep their source's sensor or film noise,
which the network takes for coding noise (enhancer.grain). Each kind may have
a second table, "<kind>_clean", calibrated on the frames that show no more
grain than ``grain_limit``; a frame that clean is looked up there, any other
in the kind's own table, which is calibrated on every frame, grainy ones
included (so it passes them through where any correction would lose).

Coarsely coded H.264 streams: the early-exit budget binds at CRF 22, where
frames of QP 24-28 are B-frames, and took stages from the I- and P-frames of
CRF 25-27 streams in the same bins. H.264 streams that say their CRF (or
constant QP) and say at least ``coarse_crf`` use the "h264_coarse" table,
fitted on such streams alone and outside the budget. Finely coded ones (a
CRF below ``coarse_crf``) use "h264_fine", fitted to the budget on their own
frames: in the budgeted "h264" table the frames of coarser streams in the
same QP bins weighed on where CRF 22 spends its budget. Streams that say no
CRF keep "h264", fitted on every stream's frames.

A policy is data: ``tables`` maps a kind (KINDS: "h264" by frame QP,
"h264_coarse" by frame QP for streams of CRF ``coarse_crf`` and up,
"h264_fine" by frame QP for streams of a lower CRF, "hevc"
by CRF, "blind" and "blind_hevc" by the pixel estimate, on H.264 and HEVC
streams, and their "_clean" tables) to its ExitTable. A kind without a
calibrated table falls back to "h264". ``to_dict`` writes that layout;
``from_dict`` also reads the flat one of model format 2 (vqe-v3.pt:
``stages``, ``hevc_stages``, ``blind_gains``... with one ``edges`` for all) and
refuses fields and kinds it does not know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

DEFAULT_EDGES = [0.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0, 44.0, 48.0, 99.0]
BASE_KINDS = ("h264", "h264_coarse", "h264_fine", "hevc", "blind", "blind_hevc")
CLEAN = "_clean"
KINDS = BASE_KINDS + tuple(kind + CLEAN for kind in BASE_KINDS)


@dataclass
class ExitTable:
    """One kind's table: per level bin (``edges[i] <= level < edges[i + 1]``, the end bins
    clamped) the stages to run, the strength of the correction (empty: 1.0 everywhere), the
    offset to the estimated CRF the network is told (blind kinds; empty: 0 everywhere) and
    the mean ΔPSNR-Y measured with 1..S stages (empty for a bin without frames)."""

    edges: list[float] = field(default_factory=lambda: list(DEFAULT_EDGES))
    stages: list[int] = field(default_factory=list)
    strengths: list[float] = field(default_factory=list)
    gains: list[list[float]] = field(default_factory=list)
    offsets: list[float] = field(default_factory=list)

    @property
    def calibrated(self) -> bool:
        """Whether it picks stages (an uncalibrated one defers to another table)."""
        return bool(self.stages)

    def lookup(self, values: list, level: float | None, default):
        """``values``' (stages or strengths) entry for the bin of ``level``; ``default``
        without a level or values."""
        if not values or level is None or not np.isfinite(level):
            return default
        return values[min(self.bin(level), len(values) - 1)]

    def bin(self, level: float) -> int:
        """The index of ``level``'s bin (the end bins clamped)."""
        i = int(np.searchsorted(self.edges, level, side="right")) - 1
        return min(max(i, 0), len(self.edges) - 2)

    @classmethod
    def from_dict(cls, d: dict) -> ExitTable:
        return cls(**_known(cls, d, "exit table"))


def _refuse_unknown(what: str, names, known) -> None:
    """A ValueError naming what of ``names`` is not ``known`` (a file from a newer vqe)."""
    if unknown := sorted(set(names) - set(known)):
        raise ValueError(
            f"unknown {what} {', '.join(map(repr, unknown))} (this vqe knows"
            f" {', '.join(sorted(known))}): written by a newer vqe?"
        )


def _known(cls, d: dict, what: str) -> dict:
    """``d``, if all its keys are fields of ``cls``."""
    _refuse_unknown(f"{what} field(s)", d, [f.name for f in fields(cls)])
    return d


def _check_kinds(kinds) -> None:
    _refuse_unknown("exit table kind(s)", kinds, KINDS)


@dataclass
class ExitPolicy:
    tables: dict[str, ExitTable] = field(default_factory=dict)
    tolerance: float = 0.05
    max_stages: int = 3
    grain_limit: float | None = None  # frames at most this grainy use the "_clean" tables
    # H.264 streams of at least this CRF use "h264_coarse", those of a lower one "h264_fine"
    coarse_crf: float | None = None

    def __post_init__(self) -> None:
        _check_kinds(self.tables)

    def has(self, kind: str) -> bool:
        """Whether the ``kind`` table is calibrated (else "h264" stands in for it)."""
        _check_kinds([kind])
        table = self.tables.get(kind)
        return table is not None and table.calibrated

    def table(self, kind: str = "h264") -> ExitTable:
        """The ``kind`` table, or "h264"'s if it is not calibrated (or an empty one)."""
        if self.has(kind):
            return self.tables[kind]
        return self.tables.get("h264") or ExitTable()

    def set_table(self, kind: str, table: ExitTable | ExitPolicy) -> None:
        """Store ``table`` as ``kind`` (a policy: its "h264" table, as calibrate returns)."""
        _check_kinds([kind])
        self.tables[kind] = table.table("h264") if isinstance(table, ExitPolicy) else table

    def h264_kind(self, crf: float | None) -> str:
        """The table of an H.264 stream that says ``crf`` (None: says none)."""
        if crf is None or self.coarse_crf is None:
            return "h264"
        kind = "h264_coarse" if crf >= self.coarse_crf else "h264_fine"
        return kind if self.has(kind) else "h264"

    def kind_for(self, kind: str, grain: float | None) -> str:
        """The table a frame of ``kind`` is looked up in, given its grain level (None:
        not measured): the "_clean" one where it is at most ``grain_limit`` and calibrated."""
        clean = kind + CLEAN
        if grain is None or self.grain_limit is None or not self.has(clean):
            return kind
        return clean if grain <= self.grain_limit else kind

    def grain_decides(self, qp: float | None, kind: str = "h264", strength: bool = False) -> bool:
        """Whether a frame's grain changes the stages it runs at this level (``strength``:
        or the strength of its correction, or the offset of the CRF it is told)."""
        clean = kind + CLEAN
        if self.grain_limit is None or not self.has(clean):
            return False
        if self.stages_for(qp, clean) != self.stages_for(qp, kind):
            return True
        if not strength:
            return False
        return (self.strength_for(qp, clean), self.offset_for(qp, clean)) != (
            self.strength_for(qp, kind),
            self.offset_for(qp, kind),
        )

    def stages_for(self, qp: float | None, kind: str = "h264", grain: float | None = None) -> int:
        table = self.table(self.kind_for(kind, grain))
        return table.lookup(table.stages, qp, self.max_stages)

    def strength_for(
        self, qp: float | None, kind: str = "h264", grain: float | None = None
    ) -> float:
        table = self.table(self.kind_for(kind, grain))
        return table.lookup(table.strengths, qp, 1.0)

    def offset_for(self, level: float | None, kind: str, grain: float | None = None) -> float:
        """What is added to the estimated CRF ``level`` before the network is told it."""
        table = self.table(self.kind_for(kind, grain))
        return table.lookup(table.offsets, level, 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExitPolicy:
        """From ``to_dict``, or from the flat layout of model format 2 (vqe-v3.pt)."""
        if "tables" not in d:
            d = _from_flat(d)
        d = dict(_known(cls, d, "exit policy"))
        _check_kinds(d.get("tables", {}))
        d["tables"] = {k: ExitTable.from_dict(t) for k, t in d.get("tables", {}).items()}
        return cls(**d)


def _from_flat(d: dict) -> dict:
    """Model format 2's policy: ``stages``, ``gains``, ``strengths`` for "h264" and the same
    prefixed by the kind ("hevc_stages"...) for the others, one ``edges`` for all."""
    d = dict(d)
    if "blind_qp" in d:
        raise ValueError(
            "the exit policy holds the pixel CRF estimate (blind_qp): the model file's loader"
            " (enhancer.checkpoint.load_model) takes it out first"
        )
    edges = d.pop("edges", list(DEFAULT_EDGES))
    tables = {}
    for kind in BASE_KINDS:
        prefix = "" if kind == "h264" else f"{kind}_"
        parts = {name: d.pop(prefix + name, []) for name in ("stages", "strengths", "gains")}
        if any(parts.values()):
            tables[kind] = {"edges": list(edges), **parts}
    return d | {"tables": tables}


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
    offsets: list[float] | None = None,
    offset_margin: float = 0.0,
) -> ExitPolicy:
    """A policy whose "h264" table is fitted to ``records``: (frame QP, [ΔPSNR-Y after
    stage 1..S]) for validation frames, or with
    ``strengths``, (frame QP, [[Δ after stage 1..S] per strength]), and with ``offsets``
    too, the strengths' lists for each offset of the told CRF in turn.

    ``sources``: the source of each record (enables the worst-source guard, over
    sources with at least ``min_frames`` frames in a bin); ``costs``: network time of
    1..S stages relative to one; ``price``: dB a unit of that time must earn;
    ``caps``: the most stages each bin may run; ``offset_margin``: of the offsets whose
    best strength gains within this much of the best, the one nearest 0 is picked.
    """
    edges = list(edges or DEFAULT_EDGES)
    levels = [(o, a) for o in offsets or [0.0] for a in strengths or [1.0]]
    plain = levels.index((0.0, 1.0)) if (0.0, 1.0) in levels else -1
    qps = np.array([r[0] for r in records], dtype=np.float64)
    gains = np.array([r[1] for r in records], dtype=np.float64)
    gains = gains.reshape(len(records), len(levels), max_stages)  # (N, level, stages)
    bins = np.clip(np.searchsorted(edges, qps, side="right") - 1, 0, len(edges) - 2)
    src = np.array(sources if sources is not None else [""] * len(records))
    cost = np.array([0.0] + list(costs or range(1, max_stages + 1)), dtype=np.float64)
    chosen, picked, table = [], [], []
    for b in range(len(edges) - 1):
        sel = bins == b
        if not sel.any():
            table.append([])
            chosen.append(-1)
            picked.append((0.0, 1.0))
            continue
        mean = gains[sel].mean(0)  # (level, stages)
        allowed = np.ones_like(mean, bool)
        if sources is not None:
            for s in np.unique(src[sel]):
                mine = sel & (src == s)
                if mine.sum() >= min_frames:
                    allowed &= gains[mine].mean(0) >= -guard
        # Per stage count, the (offset, strength) that gains most among those no source
        # loses by.
        masked = np.where(allowed, mean, -np.inf)
        best_a = masked.argmax(0)
        ks = np.arange(max_stages)
        if offsets:  # the offset nearest 0 within offset_margin of the best, at its best
            near = np.array([abs(o) for o, _ in levels])[:, None]
            close = masked >= masked[best_a, ks] - offset_margin
            least = np.where(close, near, np.inf).min(0)
            best_a = np.where(near == least, masked, -np.inf).argmax(0)
        per_k = masked[best_a, ks]
        table.append([round(float(g), 4) for g in mean[plain]])
        value = np.concatenate([[0.0], per_k]) - price * cost  # index: stages run
        if caps is not None:
            value[caps[b] + 1 :] = -np.inf
        best = value.max()  # stage count 0 (pass-through) is always allowed
        # Within tolerance of the best count (= all stages when gains grow with depth).
        k = next((k for k in range(1, max_stages + 1) if value[k] >= best - tolerance), 0)
        if value[k] <= 0:
            k = 0
        chosen.append(k)
        picked.append(levels[best_a[k - 1]] if k else (0.0, 1.0))
    # Bins with no validation frames borrow the nearest calibrated bin.
    known = [i for i, c in enumerate(chosen) if c >= 0]
    if not known:
        return ExitPolicy({"h264": ExitTable(edges, [], [], table)}, tolerance, max_stages)
    for i, c in enumerate(chosen):
        if c < 0:
            j = min(known, key=lambda j: abs(j - i))
            chosen[i], picked[i] = chosen[j], picked[j]
    fitted = ExitTable(
        edges,
        [int(c) for c in chosen],
        [float(a) for _, a in picked] if strengths else [],
        table,
        [float(o) for o, _ in picked] if offsets else [],
    )
    return ExitPolicy({"h264": fitted}, tolerance, max_stages)
