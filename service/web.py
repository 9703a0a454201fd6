"""The web page at ``/`` and the API routes only it needs.

``install_web(app, service)`` adds:

* ``GET /`` (the page) and ``/static/*`` (its CSS and JS; plain files from
  ``service/static``, no build step, nothing loaded from other hosts);
* ``GET /v1/jobs/{id}/frames``: the per-frame log (QP, picture type, stages)
  the executor stores next to a succeeded job's result;
* ``GET /v1/jobs/{id}/preview/{kind}.png?frame=N``: frame N before and after
  enhancement and its side-information pictures (:mod:`service.previews`).

Both API routes answer like the rest of the API: 404 for an unknown job, 409
while it is not succeeded, 410 once its files are gone, JSON errors always.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from service.app import API_PREFIX, ERROR_RESPONSES, ApiError, Service, job_model
from service.models import FrameInfo, JobFrames, JobStatus
from service.previews import PreviewCache, PreviewError, PreviewKind
from service.store import JobRow

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_FRAME = 10_000_000


def _succeeded(service: Service, job_id: str) -> JobRow:
    """The job's row when its files can be read; the API's 404/409/410 otherwise."""
    row = service.job_or_404(job_id)
    job = job_model(row)
    if job.deleted:
        raise ApiError(410, "deleted", "the job's files were deleted")
    if job.expired:
        raise ApiError(410, "expired", "the job's files passed their retention")
    if job.status is not JobStatus.succeeded:
        raise ApiError(409, "not_ready", f"the job is {job.status.value}; nothing to show")
    return row


def install_web(app: FastAPI, service: Service) -> None:
    """Add the page, its static files and the frames/preview routes to ``app``."""
    previews = PreviewCache()
    storage = service.storage

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = await run_in_threadpool((STATIC_DIR / "index.html").read_text, "utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}/frames", tags=["jobs"], response_model=JobFrames,
             responses=ERROR_RESPONSES)
    async def job_frames(job_id: str) -> JobFrames:
        """Per-frame QP, picture type and enhancement stages of a succeeded job."""

        def load() -> JobFrames:
            _succeeded(service, job_id)
            log = storage.read_frames(job_id)
            if log is None:
                raise ApiError(410, "no_frame_log", "this job has no stored per-frame log")
            frames = [FrameInfo.model_validate(f) for f in log]
            return JobFrames(job_id=job_id, count=len(frames), frames=frames,
                             preview_kinds=[k.value for k in PreviewKind],
                             input_available=storage.input_path(job_id).is_file())

        return await run_in_threadpool(load)

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/preview/{{kind}}.png",
        tags=["jobs"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "The picture."},
                   **ERROR_RESPONSES},
    )
    async def job_preview(
        job_id: str,
        kind: PreviewKind,
        frame: int = Query(0, ge=0, le=MAX_FRAME, description="Display-order frame index."),
    ) -> Response:
        """Frame `frame` of a succeeded job as PNG: `before` (the input as decoded), `after`
        (the result), or the input's side information: `mv` (motion vectors), `partitions`
        (macroblock partitions), `qp` (QP heat map)."""

        def render() -> bytes:
            _succeeded(service, job_id)
            log = storage.read_frames(job_id)
            if log is not None and frame >= len(log):
                raise ApiError(404, "frame_not_found", f"the job has {len(log)} frames")
            result = storage.find_result(job_id)
            if result is None:
                raise ApiError(410, "expired", "the result is no longer stored")
            try:
                return previews.get(job_id, frame, kind, storage.input_path(job_id), result)
            except PreviewError as exc:
                raise ApiError(exc.status, exc.code, exc.message) from None

        png = await run_in_threadpool(render)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})
