"""The HTTP API contract: pydantic models for requests, jobs, batches and errors.

The enhancement's options are :class:`enhancer.options.EnhanceOptions`, the one
model the CLI and the job runner use too; a job's status enums live with the
store (:mod:`service.jobs.status`).

These models are what ``/docs`` (OpenAPI) shows; handlers return them and
nothing else. Field names are stable: add fields, never rename them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from enhancer.options import QUALITIES, EnhanceOptions
from service.jobs.status import BatchStatus, JobPhase, JobStatus


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `unsupported_input`.")
    message: str = Field(description="One line for humans.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this body; never a traceback."""

    error: ErrorInfo


OPTION_FIELDS = tuple(EnhanceOptions.model_fields)


class JobOptions(EnhanceOptions):
    """Options of a batch job: the enhancement's, and where to report its outcome."""

    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="http(s) URL that gets a signed POST when the job ends "
        "(`job.succeeded`, `job.failed`, `job.canceled`); see `service.jobs.webhooks`.",
    )
    webhook_progress: bool = Field(
        False, description="Also POST `job.progress` each time the job passes 10 %."
    )

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _empty_url(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


WEBHOOK_FIELDS = ("webhook_url", "webhook_progress")


class JobCreateRequest(JobOptions):
    """JSON body of `POST /v1/jobs` for a source URL (uploads use multipart instead)."""

    source_url: str = Field(
        description="http, https, rtmp, rtsp or HLS (`hls+http(s)://`) URL of the video.",
        max_length=4096,
    )


class JobSource(BaseModel):
    kind: Literal["upload", "url"]
    filename: str | None = Field(None, description="Name given by the uploader (display only).")
    url: str | None = None
    bytes: int | None = None


class JobStats(BaseModel):
    """Measured on a finished job."""

    frames: int
    seconds: float
    fps: float
    mean_qp: float | None = Field(None, description="Mean QP of the input's frames, if known.")
    stages_histogram: dict[str, int] = Field(
        default_factory=dict, description="Number of frames per count of stages run."
    )
    side_info: dict[str, str] = Field(
        default_factory=dict, description="Where each side-information item came from."
    )
    output_bytes: int | None = None
    warnings: list[str] = Field(default_factory=list)
    # The output rate (issue 11).
    quality: str | None = Field(None, description="The quality asked for: " + ", ".join(QUALITIES))
    output_crf: float | None = Field(None, description="The CRF the output was encoded at.")
    rate_source: str | None = Field(
        None, description="Where the CRF came from: calibrated, default, explicit, lossless, copy."
    )
    expected_gain_db: float | None = Field(
        None, description="Net PSNR-Y gain over the input the calibration expects (dB)."
    )
    size_ratio: float | None = Field(None, description="Output size / input size.")
    gops: int | None = Field(None, description="GOPs of the input (closed, IDR-started).")
    gops_copied: int | None = Field(None, description="GOPs copied from the input as they were.")
    passthrough: bool | None = Field(None, description="The video packets are the input's.")
    device: str | None = Field(None, description="Where the model ran: cpu, cuda:0.")
    precision: str | None = Field(None, description="The model's arithmetic: bf16, fp16, fp32.")


class JobLinks(BaseModel):
    self: str
    result: str
    cancel: str = Field(description="`DELETE` this to cancel the job or remove its files.")


class Job(BaseModel):
    id: str
    status: JobStatus
    phase: JobPhase | None = None
    progress: float | None = Field(None, ge=0, le=1, description="0-1, when the total is known.")
    frames_done: int = 0
    frames_total: int | None = None
    fps: float | None = None
    eta_seconds: float | None = None
    error: ErrorInfo | None = None
    attempts: int = Field(0, description="How many times a worker started this job.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = Field(None, description="When the result will be deleted.")
    expired: bool = Field(False, description="The result passed its retention and is gone.")
    deleted: bool = Field(False, description="The files were removed by `DELETE`.")
    cancel_requested: bool = False
    source: JobSource
    options: EnhanceOptions
    stats: JobStats | None = None
    webhook_url: str | None = Field(None, description="Where the job's events are POSTed.")
    batch_id: str | None = Field(None, description="The batch the job was submitted in.")
    links: JobLinks


class JobList(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to get the next page; null on the last page."
    )


class BatchCreateRequest(JobOptions):
    """JSON body of `POST /v1/batches` for source URLs (uploads use multipart instead:
    one `file` part per video, `source_url` fields, and the option fields)."""

    source_urls: list[str] = Field(
        description="http, https, rtmp, rtsp or HLS URLs, one job each.", min_length=1
    )

    @field_validator("source_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not isinstance(url, str) or not url.strip() or len(url) > 4096:
                raise ValueError("each source URL must be a non-empty string of at most 4096")
        return value


class BatchJob(BaseModel):
    """One video of a batch: its job, in short (`links.self` has the whole job)."""

    id: str
    status: JobStatus
    phase: JobPhase | None = None
    progress: float | None = Field(None, ge=0, le=1)
    frames_done: int = 0
    frames_total: int | None = None
    fps: float | None = None
    error: ErrorInfo | None = Field(None, description="Why the job failed (or was refused).")
    source: JobSource
    stats: JobStats | None = None
    expired: bool = False
    deleted: bool = False
    links: JobLinks


class BatchLinks(BaseModel):
    self: str
    cancel: str = Field(description="`DELETE` this to cancel the jobs that have not finished.")


class Batch(BaseModel):
    id: str
    status: BatchStatus = Field(
        description="From the jobs: queued (none started), running, succeeded (all), "
        "partial (all ended, some succeeded), failed (all ended, none succeeded), canceled."
    )
    progress: float = Field(
        ge=0,
        le=1,
        description="Share of the batch done: ended jobs count whole, running "
        "ones by their frames.",
    )
    counts: dict[str, int] = Field(description="Jobs per status.")
    created_at: datetime
    cancel_requested: bool = False
    options: EnhanceOptions
    jobs: list[BatchJob] = Field(description="One per video, in the order they were given.")
    links: BatchLinks


class BatchList(BaseModel):
    items: list[Batch]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to get the next page; null on the last page."
    )


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(
        default_factory=dict,
        description="`/readyz`: database, storage, disk (free space) and queue (Redis or the "
        "in-process threads), each `ok` or `error: ...`.",
    )
    free_disk_bytes: int | None = Field(None, description="Free space of the storage.")


class FrameInfo(BaseModel):
    """What the bitstream and the model did for one frame of a finished job."""

    index: int = Field(description="Display order, from 0.")
    pict_type: str = Field(description="`I`, `P`, `B` or `?`.")
    qp: float | None = Field(None, description="Frame QP (from the bitstream or estimated).")
    stages: int = Field(description="Enhancement stages run on this frame.")
    side_info: str = Field(description="Where the model's side information came from.")


class JobFrames(BaseModel):
    """Per-frame log of a succeeded job, and where its preview pictures are."""

    job_id: str
    count: int
    frames: list[FrameInfo]
    preview_kinds: list[str] = Field(
        description="Kinds for `GET /v1/jobs/{id}/preview/{kind}.png?frame=N`."
    )
    input_available: bool = Field(
        description="The input is still stored: `before` and side-info previews can be made."
    )
