"""Batch jobs: ``/v1/jobs`` (submit, list) and ``/v1/jobs/{id}`` (status, result, cancel)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from enhancer.options import parse_options
from service.api import auth
from service.api.deps import API_PREFIX, ERROR_RESPONSES, MEDIA_TYPES, Service
from service.api.presenters import job_model
from service.api.routes.submit import (
    REPLAYED,
    check_cursor,
    replayed,
    request_body,
    webhook_of,
)
from service.api.schemas import (
    OPTION_FIELDS,
    WEBHOOK_FIELDS,
    Job,
    JobCreateRequest,
    JobList,
    JobOptions,
    JobStatus,
)
from service.api.uploads import multipart_schema, read_json_object, receive_multipart
from service.config import Settings
from service.ingest.fetch import fetch_source
from service.ingest.probe import ProbeReport, check_limits, probe_file
from service.jobs.storage import new_job_id
from service.jobs.store import NewJob
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
            if ctype == b"application/json":
                new = await _job_from_json(request, job_id, tmp)
            else:
                new = await _job_from_upload(request, job_id, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        new = replace(new, idempotency_key=idempotency_key, owner_key=auth.owner())
        row, created = await run_in_threadpool(service.submit, new)
        headers = {} if created else REPLAYED
        return _job_response(row, 202, **headers)

    async def _job_from_upload(request: Request, job_id: str, tmp: Path) -> NewJob:
        upload = await receive_multipart(request, tmp, settings.limits.max_upload_bytes, sync=False)
        options = parse_options(upload.fields, JobOptions)
        hook = await run_in_threadpool(webhook_of, service, options)
        report = await run_in_threadpool(_probe_checked, tmp, settings)
        service.storage.adopt_input(job_id, tmp)
        return NewJob(
            id=job_id,
            source_kind="upload",
            options=options.model_dump(exclude=set(WEBHOOK_FIELDS)),
            source_filename=upload.filename,
            source_bytes=upload.size,
            result_ext=report.result_ext,
            frames_total=report.frames,
            **hook,
        )

    async def _job_from_json(request: Request, job_id: str, tmp: Path) -> NewJob:
        req = parse_options(await read_json_object(request), JobCreateRequest)
        hook = await run_in_threadpool(webhook_of, service, req)
        fetched = await run_in_threadpool(
            fetch_source,
            req.source_url,
            tmp,
            service.ctx.policy,
            settings.limits,
            settings.url_timeout,
        )
        if fetched.local:
            service.storage.adopt_input(job_id, tmp)
        options = {k: v for k, v in req.model_dump().items() if k in OPTION_FIELDS}
        return NewJob(
            id=job_id,
            source_kind="url",
            options=options,
            source_url=req.source_url,
            source_bytes=fetched.size,
            input_ready=fetched.local,
            result_ext=fetched.report.result_ext if fetched.local else ".mkv",
            frames_total=fetched.report.frames,
            **hook,
        )

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
        row = await run_in_threadpool(service.jobs.request_cancel, job_id) or row
        if JobStatus(row.status).finished:  # it was queued: canceled at once
            await run_in_threadpool(service.storage.remove_job, job_id)
            return _job_response(row, 200)
        return _job_response(row, 202)

    return router


def _job_response(row: JobRow, status: int, **headers: str) -> JSONResponse:
    headers.setdefault("Location", f"{API_PREFIX}/jobs/{row.id}")
    return JSONResponse(job_model(row).model_dump(mode="json"), status_code=status, headers=headers)


def _probe_checked(path: Path, settings: Settings) -> ProbeReport:
    report = probe_file(path)
    check_limits(report, settings.limits)
    return report
