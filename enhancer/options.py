"""The one options model of an enhancement, shared by the CLI, the API and the job runner.

Its bounds come from the layers that enforce them: codecs, presets and the CRF
range from :mod:`bitstream.writer`, the stage count from the loaded weights
(``0..S``; ``auto`` lets the exit policy choose per frame). Anything out of
range is refused here, when the options are read (CLI exit 2, HTTP 422), never
later inside a running job. Where the model runs (device, tiles) is not an
option of the video: it is an argument of :class:`enhancer.pipeline.Pipeline`.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitstream.errors import UserError
from bitstream.writer import CODECS, CRF_RANGE, LOSSLESS, PRESETS

__all__ = [
    "QUALITIES",
    "QUALITY_ENCODERS",
    "SIDE_INFO_MODES",
    "EnhanceOptions",
    "max_stages",
    "options_error",
    "parse_options",
]

# The output's size/quality choices (enhancer.output_rate reads them from here).
QUALITIES = ("archive", "balanced", "compact", "high")


class FixedEncoder(NamedTuple):
    """The encoder a quality level fixes (``--codec`` may only be ``auto`` or this one)."""

    codec: str
    bits: int | None  # the output's least bit depth; None: the input's own
    label: str  # for messages


# ``archive`` is lossless FFV1; ``high`` is x265 Main10, 10-bit 4:2:0 even from 8-bit
# input: the re-encode that keeps the most of the gain (bench/output.py).
QUALITY_ENCODERS = {
    "archive": FixedEncoder("ffv1", None, "lossless FFV1"),
    "high": FixedEncoder("libx265", 10, "x265 Main10 (libx265, 10-bit)"),
}
# The engine's modes (enhancer.engine.SIDE_INFO_MODES, which imports torch).
SIDE_INFO_MODES = ("auto", "bitstream", "blind")


@functools.cache
def max_stages() -> int:
    """Stages of the shipped weights (loaded once per process)."""
    from enhancer.checkpoint import model_config  # torch: only when a stage count is checked

    return int(model_config().stages)


class EnhanceOptions(BaseModel):
    """What to do to one video: the encoder's settings and how much of the model to run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: Literal[CODECS] = Field(  # type: ignore[valid-type]
        "auto", description="Output encoder; `auto` keeps the input's codec family."
    )
    quality: Literal[QUALITIES] = Field(  # type: ignore[valid-type]
        "balanced",
        description="Output size/quality trade-off: `balanced` (default) and `compact` re-encode "
        "at the CRF calibrated with the weights (or pass the video through where re-encoding "
        "would lose the gain); `high` re-encodes with x265 Main10 (10-bit) at its own "
        "calibrated CRF, more of the gain in up to 3x the input's size; `archive` is lossless "
        "FFV1, all of the gain, large files.",
    )
    crf: Annotated[float, Field(ge=CRF_RANGE[0], le=CRF_RANGE[1])] | None = Field(
        None,
        description="Output CRF; default: from the weights' calibrated output rate for the "
        "input's level and `quality`. An explicit CRF wins. Not for ffv1/archive.",
    )
    preset: Literal[PRESETS] = Field("medium", description="Encoder speed preset.")  # type: ignore[valid-type]
    stages: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto",
        description="Enhancement stages per frame, 0..S (S: the loaded weights' stage count, "
        "3 for vqe-v1); `auto` lets the model decide per frame.",
    )
    side_info: Literal[SIDE_INFO_MODES] = Field(  # type: ignore[valid-type]
        "auto",
        description="Use the bitstream's side information (`bitstream`), work from the "
        "pixels alone (`blind`: not even the encoder's CRF is read), or let the service "
        "choose (`auto`).",
    )
    max_frames: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Stop after this many frames (other streams are cut to match)."
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _stages_from_text(cls, value: Any) -> Any:
        # CLI arguments and multipart form fields are strings: "2" means the integer 2.
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("crf", "max_frames", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def output_codec(self) -> str:
        """The encoder to ask the writer for: ``archive`` means FFV1, ``high`` x265."""
        fixed = QUALITY_ENCODERS.get(self.quality)
        return fixed.codec if fixed else self.codec

    @property
    def output_bits(self) -> int | None:
        """The output's least bit depth (``high``: 10), None for the input's own."""
        fixed = QUALITY_ENCODERS.get(self.quality)
        return fixed.bits if fixed else None

    @model_validator(mode="after")
    def _fits_writer_and_weights(self) -> EnhanceOptions:
        fixed = QUALITY_ENCODERS.get(self.quality)
        if fixed and self.codec not in ("auto", fixed.codec):
            raise ValueError(f"quality {self.quality} is {fixed.label}, not {self.codec}")
        if self.crf is not None and self.output_codec in LOSSLESS:
            raise ValueError(f"crf does not apply to {self.output_codec} (lossless)")
        if isinstance(self.stages, int) and self.stages > (top := max_stages()):
            raise ValueError(f"stages must be auto or 0..{top}, not {self.stages}")
        return self


def options_error(exc: ValidationError | Any) -> str:
    """One line for a :class:`ValidationError` (or its ``errors()``): ``field: reason; ...``."""
    parts = []
    errors = exc.errors() if hasattr(exc, "errors") else exc
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid options"


def parse_options(values: dict[str, Any], model: type[BaseModel] = EnhanceOptions) -> Any:
    """``model`` from ``values``; a :class:`UserError` (code ``invalid_options``) otherwise."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise UserError(options_error(exc), code="invalid_options") from None
