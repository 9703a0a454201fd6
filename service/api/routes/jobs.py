"""Batch jobs: ``/v1/jobs`` (submit, list) and ``/v1/jobs/{id}`` (status, result, cancel)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from enhancer.options import parse_options
from service.api import auth
from service.api.deps import API_PREFIX, ERROR_RESPONSES, MEDIA_TYPES, Service
from service.api.intake import job_fields, take_input
from service.api.presenters import job_model
from service.api.routes.submit import REPLAYED, check_cursor, replayed, request_body
from service.api.schemas import (
    Job,
    JobCreateRequest,
    JobList,
    JobOptions,
    JobStatus,
)
from service.api.uploads import FilePart, multipart_schema, read_json_object, receive_multipart
from service.jobs.storage import new_job_id
from service.jobs.tables import JobRow


def router(service: Service) -> APIRouter:
    """The routes of this resource, bound to ``service``."""
    settings = service.settings
    router = APIRouter()

    @router.post(
        f"{API_PREFIX}/jobs",
        tags=["jobs"],
        status_code=202,
        response_model=Job,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(multipart_schema(), "JobCreateRequest"),
    )
    async def create_job(
        request: Request,
        idempotency_key: str | None = Header(None, max_length=255),
    ) -> JSONResponse:
        """Submit a job: a multipart upload (`file` + options) or JSON
        `{"source_url": ..., options}`. The input is probed first; the answer is 202 with
        the job and its links. Repeating a request with the same `Idempotency-Key`
        returns the original job."""
        idempotency_key = auth.scoped(idempotency_key)
        existing = await replayed(request, idempotency_key, service.jobs.get_by_idempotency_key)
        if existing is not None:
            return _job_response(existing, 202, **REPLAYED)
        ctype, _ = parse_options_header(request.headers.get("content-type", ""))
        job_id = new_job_id()
        tmp = service.storage.tmp_path()
        try:
            source: FilePart | str
            if ctype == b"application/json":
                req = parse_options(await read_json_object(request), JobCreateRequest)
                options: JobOptions = req
                source = req.source_url
            else:
                limit = settings.limits.max_upload_bytes
                upload = await receive_multipart(request, tmp, limit, sync=False)
                options = parse_options(upload.fields, JobOptions)
                source = FilePart(tmp, upload.filename, upload.size)
            fields = await run_in_threadpool(
                job_fields, service, options, auth.owner(), idempotency_key=idempotency_key
            )
            new = await run_in_threadpool(take_input, service, job_id, source, fields)
        finally:
            tmp.unlink(missing_ok=True)
        row, created = await run_in_threadpool(service.submit, new)
        headers = {} if created else REPLAYED
        return _job_response(row, 202, **headers)

    @router.get(
        f"{API_PREFIX}/jobs", tags=["jobs"], response_model=JobList, responses=ERROR_RESPONSES
    )
    async def list_jobs(
        status: JobStatus | None = None,
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = Query(None, max_length=64),
    ) -> JobList:
        """Jobs, newest first; follow `next_cursor` for the next page."""
        check_cursor(cursor)
        rows, next_cursor = await run_in_threadpool(
            service.jobs.list, status, limit, cursor, auth.owner(), auth.is_admin()
        )
        return JobList(items=[job_model(r) for r in rows], next_cursor=next_cursor)

    @router.get(
        f"{API_PREFIX}/jobs/{{job_id}}",
        tags=["jobs"],
        response_model=Job,
        responses=ERROR_RESPONSES,
    )
    async def get_job(job_id: str) -> Job:
        """Status, phase, progress, timing, error and stats of a job."""
        return job_model(await run_in_threadpool(service.job_or_404, job_id))

    @router.get(
        f"{API_PREFIX}/jobs/{{job_id}}/result",
        tags=["jobs"],
        response_class=FileResponse,
        responses={
            200: {
                "content": {"video/mp4": {}, "video/x-matroska": {}},
                "description": "The enhanced video (HTTP Range supported).",
            },
            206: {"description": "Part of the video (Range request)."},
            **ERROR_RESPONSES,
        },
    )
    async def job_result(job_id: str) -> FileResponse:
        """Download the result of a succeeded job. Supports `Range`."""
        _row, path = await run_in_threadpool(service.stored_result, job_id)
        return FileResponse(
            path, media_type=MEDIA_TYPES[path.suffix], filename=f"{job_id}{path.suffix}"
        )

    @router.delete(
        f"{API_PREFIX}/jobs/{{job_id}}",
        tags=["jobs"],
        response_model=Job,
        responses={
            202: {"model": Job, "description": "Cancellation requested."},
            **ERROR_RESPONSES,
        },
    )
    async def delete_job(job_id: str) -> JSONResponse:
        """Cancel a queued or running job (202 while a running job stops), or delete a
        finished job's files (200). The job record stays and says so."""
        row = await run_in_threadpool(service.job_or_404, job_id)
        if JobStatus(row.status).finished:
            await run_in_threadpool(service.storage.remove_job, job_id)
            row = await run_in_threadpool(service.jobs.mark_deleted, job_id) or row
            return _job_response(row, 200)
        row = await run_in_threadpool(service.cancel, job_id) or row
        return _job_response(row, 200 if JobStatus(row.status).finished else 202)

    return router


def _job_response(row: JobRow, status: int, **headers: str) -> JSONResponse:
    headers.setdefault("Location", f"{API_PREFIX}/jobs/{row.id}")
    return JSONResponse(job_model(row).model_dump(mode="json"), status_code=status, headers=headers)
