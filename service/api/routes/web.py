"""The web page at ``/`` and the API routes only it needs.

``install_web(app, service)`` adds:

* ``GET /`` (the page) and ``/static/*`` (its CSS and JS; plain files from
  ``service/static``, no build step, nothing loaded from other hosts);
* ``GET /v1/jobs/{id}/frames``: the per-frame log (QP, picture type, stages)
  the executor stores next to a succeeded job's result;
* ``GET /v1/jobs/{id}/preview/{kind}.png?frame=N``: frame N before and after
  enhancement and its side-information pictures (:mod:`service.api.previews`).

Both API routes answer like the rest of the API: 404 for an unknown job, 409
while it is not succeeded, 410 once its files are gone, JSON errors always.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import API_PREFIX, ERROR_RESPONSES, Service
from service.api.previews import PreviewCache, PreviewKind
from service.api.schemas import FrameInfo, JobFrames
from service.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MAX_FRAME = 10_000_000


def router(service: Service) -> APIRouter:
    """The page and the frames/preview routes (the app mounts ``/static``)."""
    router = APIRouter()
    previews = PreviewCache()
    storage = service.storage

    @router.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = await run_in_threadpool((STATIC_DIR / "index.html").read_text, "utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @router.get(
        f"{API_PREFIX}/jobs/{{job_id}}/frames",
        tags=["jobs"],
        response_model=JobFrames,
        responses=ERROR_RESPONSES,
    )
    async def job_frames(job_id: str) -> JobFrames:
        """Per-frame QP, picture type and enhancement stages of a succeeded job."""

        def load() -> JobFrames:
            service.stored_result(job_id)
            log = storage.read_frames(job_id)
            if log is None:
                raise ApiError(410, "no_frame_log", "this job has no stored per-frame log")
            frames = [FrameInfo.model_validate(f) for f in log]
            return JobFrames(
                job_id=job_id,
                count=len(frames),
                frames=frames,
                preview_kinds=[k.value for k in PreviewKind],
                input_available=storage.input_path(job_id).is_file(),
            )

        return await run_in_threadpool(load)

    @router.get(
        f"{API_PREFIX}/jobs/{{job_id}}/preview/{{kind}}.png",
        tags=["jobs"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "The picture."},
            **ERROR_RESPONSES,
        },
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
            _row, result = service.stored_result(job_id)
            log = storage.read_frames(job_id)
            if log is not None and frame >= len(log):
                raise ApiError(404, "frame_not_found", f"the job has {len(log)} frames")
            return previews.get(job_id, frame, kind, storage.input_path(job_id), result)

        png = await run_in_threadpool(render)
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    return router
