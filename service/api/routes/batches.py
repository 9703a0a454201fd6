"""Batches: ``/v1/batches`` (submit, list) and ``/v1/batches/{id}`` (status, cancel).

A batch is many videos with one set of options: one job per video, grouped. The
request is multipart (one ``file`` part per upload, ``source_url`` fields, the
option fields of ``POST /v1/jobs``) or JSON ``{"source_urls": [...], options}``.
Each input is checked like a job's (probed, URL rules, limits); one that is refused
becomes a job that is already ``failed`` with its error, and the others run. What
fails the whole request (4xx, nothing stored): bad options or webhook URL, more than
``VQE_BATCH_MAX_FILES`` videos, uploads over ``VQE_BATCH_MAX_BYTES`` together, no
video at all. ``Idempotency-Key``, API-key ownership and webhooks (per job, with
the job's ``batch_id``) work as for jobs.
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from enhancer.options import parse_options
from service.api import auth
from service.api.deps import API_PREFIX, ERROR_RESPONSES, Service
from service.api.intake import job_fields, take_input
from service.api.presenters import batch_model
from service.api.routes.submit import REPLAYED, check_cursor, replayed, request_body
from service.api.schemas import (
    Batch,
    BatchCreateRequest,
    BatchList,
    JobOptions,
    JobStatus,
)
from service.api.uploads import (
    FilePart,
    batch_multipart_schema,
    read_json_object,
    receive_batch,
    too_many,
)
from service.errors import ApiError
from service.jobs.batches import NewBatch
from service.jobs.storage import is_job_id, new_job_id
from service.jobs.store import NewJob
from service.jobs.tables import BatchRow


def router(service: Service) -> APIRouter:
    """The routes of this resource, bound to ``service``."""
    settings = service.settings
    storage = service.storage
    batches = service.batches
    router = APIRouter()

    @router.post(
        f"{API_PREFIX}/batches",
        tags=["batches"],
        status_code=202,
        response_model=Batch,
        responses=ERROR_RESPONSES,
        openapi_extra=request_body(batch_multipart_schema(), "BatchCreateRequest"),
    )
    async def create_batch(
        request: Request,
        idempotency_key: str | None = Header(None, max_length=255),
    ) -> JSONResponse:
        """Submit several videos with shared options: multipart (`file` parts, `source_url`
        fields, options) or JSON `{"source_urls": [...], options}`. The answer is 202 with
        the batch: one job per video (uploads first, then URLs, in the order given); an
        input that is refused is a failed job with its error. Repeating a request with the
        same `Idempotency-Key` returns the original batch."""
        idempotency_key = auth.scoped(idempotency_key)
        existing = await replayed(request, idempotency_key, batches.get_by_idempotency_key)
        if existing is not None:
            return await _answer(existing, 202, **REPLAYED)
        ctype, _ = parse_options_header(request.headers.get("content-type", ""))
        batch_id = new_job_id()
        files: list[FilePart] = []
        jobs: list[NewJob] = []
        try:
            if ctype == b"application/json":
                req = parse_options(await read_json_object(request), BatchCreateRequest)
                if len(req.source_urls) > settings.batch_max_files:
                    raise too_many(settings.batch_max_files)
                options: JobOptions = req
                urls = req.source_urls
            else:
                upload = await receive_batch(
                    request,
                    storage.tmp_path,
                    settings.limits.max_upload_bytes,
                    settings.batch_max_bytes,
                    settings.batch_max_files,
                )
                files, urls = upload.files, upload.source_urls
                options = parse_options(upload.fields, JobOptions)
            fields = await run_in_threadpool(
                job_fields, service, options, auth.owner(), batch_id=batch_id
            )
            for source in [*files, *urls]:  # uploads first, then URLs; a refused one fails
                new_job = await run_in_threadpool(
                    take_input, service, new_job_id(), source, fields, keep_refused=True
                )
                jobs.append(new_job)
            new = NewBatch(
                id=batch_id,
                options=fields["options"],
                owner_key=fields["owner_key"],
                idempotency_key=idempotency_key,
                webhook_url=fields["webhook_url"],
            )
            batch, created = await run_in_threadpool(service.submit_batch, new, jobs)
        except BaseException:
            for job in jobs:
                storage.remove_job(job.id)
            raise
        finally:
            for part in files:
                part.path.unlink(missing_ok=True)
        return await _answer(batch, 202, **({} if created else REPLAYED))

    async def _answer(batch: BatchRow, status: int, **headers: str) -> JSONResponse:
        jobs = (await run_in_threadpool(batches.jobs, [batch.id]))[batch.id]
        headers.setdefault("Location", f"{API_PREFIX}/batches/{batch.id}")
        body = batch_model(batch, jobs).model_dump(mode="json")
        return JSONResponse(body, status_code=status, headers=headers)

    def _batch_or_404(batch_id: str) -> BatchRow:
        row = batches.get(batch_id) if is_job_id(batch_id) else None
        if row is None or not auth.may_see(row.owner_key):
            raise ApiError(404, "not_found", f"no batch {batch_id!r}")
        return row

    @router.get(
        f"{API_PREFIX}/batches",
        tags=["batches"],
        response_model=BatchList,
        responses=ERROR_RESPONSES,
    )
    async def list_batches(
        limit: int = Query(20, ge=1, le=100),
        cursor: str | None = Query(None, max_length=64),
    ) -> BatchList:
        """Batches, newest first, each with its jobs; follow `next_cursor` for the next page."""
        check_cursor(cursor)
        rows, next_cursor = await run_in_threadpool(
            batches.list, limit, cursor, auth.owner(), auth.is_admin()
        )
        jobs = await run_in_threadpool(batches.jobs, [r.id for r in rows])
        return BatchList(items=[batch_model(r, jobs[r.id]) for r in rows], next_cursor=next_cursor)

    @router.get(
        f"{API_PREFIX}/batches/{{batch_id}}",
        tags=["batches"],
        response_model=Batch,
        responses=ERROR_RESPONSES,
    )
    async def get_batch(batch_id: str) -> JSONResponse:
        """Aggregate status and progress, counts per status, and each job with its links."""
        return await _answer(await run_in_threadpool(_batch_or_404, batch_id), 200)

    @router.delete(
        f"{API_PREFIX}/batches/{{batch_id}}",
        tags=["batches"],
        response_model=Batch,
        responses={
            202: {"model": Batch, "description": "Cancellation requested of running jobs."},
            **ERROR_RESPONSES,
        },
    )
    async def cancel_batch(batch_id: str) -> JSONResponse:
        """Cancel the batch's jobs that have not finished: queued ones at once (200), running
        ones when their worker notices (202). Finished jobs and their results stay."""
        return await run_in_threadpool(_cancel, batch_id)

    def _cancel(batch_id: str) -> JSONResponse:
        batch = _batch_or_404(batch_id)
        batches.mark_cancel(batch.id)
        pending = False
        for job in batches.jobs([batch.id])[batch.id]:
            if not JobStatus(job.status).finished:
                row = service.cancel(job.id) or job
                pending = pending or not JobStatus(row.status).finished
        batch = batches.get(batch.id) or batch
        jobs = batches.jobs([batch.id])[batch.id]
        body = batch_model(batch, jobs).model_dump(mode="json")
        return JSONResponse(body, status_code=202 if pending else 200)

    return router
