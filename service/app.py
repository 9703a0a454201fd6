"""The HTTP API (FastAPI): synchronous enhancement for short clips and batch jobs.

``create_app()`` builds the app from :class:`service.config.Settings`; it is
what ``vqe serve`` hands to uvicorn. OpenAPI is served at ``/docs``; the
pydantic models in :mod:`service.models` are the contract.

Uploads are parsed from the request stream and written straight to the
storage directory with a size limit (never held in memory); the input is
probed before a job is queued. Every error is JSON
``{"error": {"code", "message"}}`` with a 4xx status for bad input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitstream.types import BitstreamError, CorruptStream, UnsupportedInput
from service import auth, events, logs, metrics
from service.config import Settings
from service.errors import UserError
from service.executor import Context, InProcessExecutor, pipeline_options, result_stats
from service.models import (
    OPTION_FIELDS,
    WEBHOOK_FIELDS,
    EnhanceOptions,
    ErrorResponse,
    Health,
    Job,
    JobCreateRequest,
    JobLinks,
    JobList,
    JobOptions,
    JobPhase,
    JobSource,
    JobStats,
    JobStatus,
)
from service.pipeline import Pipeline
from service.safety import (
    ProbeReport,
    ServiceInputError,
    check_limits,
    fetch_source,
    probe_file,
)
from service.storage import BoundedWriter, UploadTooLarge, is_job_id, new_job_id
from service.store import JobRow, NewJob, decode_cursor, utcnow
from service.webhooks import WebhookDispatcher, check_url

log = logging.getLogger("vqe.api")

API_PREFIX = "/v1"
MAX_FIELD_BYTES = 4096  # a form field (an option value)
MAX_JSON_BYTES = 64 << 10
MULTIPART_OVERHEAD = 64 << 10  # headers and option fields around the file part
DRAIN_BYTES = 16 << 20  # read and drop this much of a refused body so clients see the answer
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")  # what of an upload's name goes in a header
MEDIA_TYPES = {".mp4": "video/mp4", ".mkv": "video/x-matroska"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 410, 413, 415, 422, 503)
}


class ApiError(Exception):
    """An error answer: ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    body = ErrorResponse.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)


def _status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ServiceInputError):
        return exc.status, exc.code
    if isinstance(exc, UnsupportedInput):
        return 415, "unsupported_input"
    if isinstance(exc, CorruptStream):
        return 422, "corrupt_input"
    if isinstance(exc, BitstreamError):
        return 422, "bitstream_error"
    return 422, "invalid_request"


# -- the job backend: in-process threads or Dramatiq ---------------------------------


class Backend(Protocol):
    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def ready(self) -> bool: ...
    def stop(self) -> None: ...


class _RedisBackend:
    """The API's side of the Redis queue: it only sends job ids."""

    def __init__(self, settings: Settings) -> None:
        from service.queue_redis import RedisQueue

        self.queue = RedisQueue(settings)

    def start(self) -> None:
        pass

    def submit(self, job_id: str) -> None:
        self.queue.submit(job_id)

    def ready(self) -> bool:
        return self.queue.ping()

    def stop(self) -> None:
        self.queue.close()


# -- uploads -------------------------------------------------------------------------


@dataclass
class Upload:
    """A multipart request received to disk: the file part and the option fields."""

    path: Path | None = None
    size: int = 0
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


class _MultipartReceiver:
    """Feeds a request body to python-multipart; the ``file`` part goes to a
    :class:`BoundedWriter`, other parts are small text fields."""

    def __init__(self, dest: Path, limit: int) -> None:
        self.dest = dest
        self.limit = limit
        self.upload = Upload()
        self.writer: BoundedWriter | None = None
        self._headers: dict[str, str] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._field_name: str | None = None
        self._field_value = bytearray()
        self.error: ApiError | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._hname.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._hvalue.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field_name = None
        self._field_value = bytearray()

    def _header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if name == "file":
            if self.writer is not None:
                raise ApiError(400, "invalid_request", "only one `file` part is allowed")
            self.upload.filename = filename.decode("utf-8", "replace")[:255] if filename else None
            self.upload.path = self.dest
            self.writer = BoundedWriter(self.dest, self.limit)
        elif filename is not None:
            raise ApiError(400, "invalid_request", f"unexpected file part {name!r}; use `file`")
        else:
            self._field_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field_name is not None:
            self._field_value.extend(data[start:end])
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise ApiError(
                    400, "invalid_request", f"form field {self._field_name!r} is too long"
                )
        elif self.writer is not None and self.upload.path is not None:
            self.writer.write(data[start:end])

    def _part_end(self) -> None:
        if self._field_name is not None:
            self.upload.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
            self._field_name = None
        elif self.writer is not None:
            self.writer.close()
            self.upload.size = self.writer.size


def _too_large(limit: int, sync: bool) -> ApiError:
    hint = " Submit large videos as a batch job: POST /v1/jobs." if sync else ""
    return ApiError(413, "input_too_large", f"the upload is larger than {limit} bytes.{hint}")


async def _drain(request: Request) -> None:
    """Read (and drop) what is left of a refused body, up to :data:`DRAIN_BYTES`."""
    drained = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                break


async def receive_multipart(request: Request, dest: Path, limit: int, *, sync: bool) -> Upload:
    """Stream a ``multipart/form-data`` body to ``dest`` (the ``file`` part) with a limit."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data with a `file` part")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        await _drain(request)
        raise _too_large(limit, sync)
    receiver = _MultipartReceiver(dest, limit)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadTooLarge:
        await _drain(request)
        raise _too_large(limit, sync) from None
    except ApiError:
        if receiver.writer is not None:
            receiver.writer.abort()
        raise
    except Exception as exc:  # malformed multipart, client went away
        if receiver.writer is not None:
            receiver.writer.abort()
        raise ApiError(400, "invalid_request", f"malformed multipart body: {exc}") from None
    upload = receiver.upload
    if upload.path is None:
        raise ApiError(422, "invalid_request", "the request has no `file` part")
    return upload


def parse_options(values: dict[str, Any], model: type[EnhanceOptions] = EnhanceOptions) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ApiError(422, "invalid_options", _validation_message(exc.errors())) from None


def _validation_message(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# -- the app ---------------------------------------------------------------------------


class _SyncPipelines:
    """Pipelines for POST /v1/enhance, one per concurrent request (``VQE_SYNC_CONCURRENCY``),
    each created on first use and kept (the model stays loaded)."""

    def __init__(self, size: int) -> None:
        self._pool: queue.Queue[Pipeline | None] = queue.Queue()
        for _ in range(size):
            self._pool.put(None)

    @contextlib.contextmanager
    def borrow(self) -> Any:
        pipeline = self._pool.get() or Pipeline()
        try:
            yield pipeline
        finally:
            self._pool.put(pipeline)


class Service:
    """State shared by the handlers of one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = Context.from_settings(settings)
        self.store = self.ctx.store
        self.storage = self.ctx.storage
        self.backend: Backend = (
            _RedisBackend(settings) if settings.uses_redis else InProcessExecutor(self.ctx)
        )
        self.sync = _SyncPipelines(settings.sync_concurrency)
        self.webhooks = WebhookDispatcher(self.store, settings, self.ctx.policy)
        self.heartbeat = (metrics.Heartbeat(self.store, self.backend.runner.identity, "executor",
                                            self.backend.threads)
                          if isinstance(self.backend, InProcessExecutor) else None)  # fmt: skip
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="vqe-sweeper", daemon=True)

    def start(self) -> None:
        self.backend.start()
        self._sweeper.start()
        self.webhooks.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    def stop(self) -> None:
        self._stop.set()
        self.backend.stop()
        self.webhooks.stop()  # after the executor: the events of requeued jobs are out
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.store.close()

    def sweep(self) -> list[str]:
        """Delete the files of jobs past their retention; returns their ids."""
        ids = self.store.expire_due()
        for job_id in ids:
            self.storage.remove_job(job_id)
        self.storage.sweep_tmp()
        return ids

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("sweep failed")

    def job_or_404(self, job_id: str) -> JobRow:
        row = self.store.get(job_id) if is_job_id(job_id) else None
        if row is None or not auth.may_see(row.owner_key):
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return row

    def submit(self, new: NewJob) -> tuple[JobRow, bool]:
        row, created = self.store.create(new)
        if not created:
            if new.id != row.id:
                self.storage.remove_job(new.id)
            return row, False
        try:
            self.backend.submit(row.id)
        except Exception as exc:  # the queue is down: do not leave a job nobody will run
            log.exception("cannot queue job %s", row.id)
            self.store.finish(row.id, None, JobStatus.failed,
                              error=("queue_unavailable", "the job queue is unavailable"))
            self.storage.remove_job(row.id)
            raise ApiError(
                503, "queue_unavailable", "the job queue is unavailable; retry later"
            ) from exc
        return row, True


def job_model(row: JobRow) -> Job:
    status = JobStatus(row.status)
    progress = None
    if status is JobStatus.succeeded:
        progress = 1.0
    elif row.frames_total:
        progress = round(min(1.0, row.frames_done / row.frames_total), 4)
    expired = row.expired or (
        status.finished and row.expires_at is not None and row.expires_at <= utcnow()
    )
    base = f"{API_PREFIX}/jobs/{row.id}"
    stats = None
    if row.stats:
        stats = JobStats.model_validate(
            {k: v for k, v in row.stats.items() if k in JobStats.model_fields}
        )
    error = None
    if row.error_code:
        error = {"code": row.error_code, "message": row.error_message or row.error_code}
    return Job(
        id=row.id,
        status=status,
        phase=JobPhase(row.phase) if row.phase and status is JobStatus.running else None,
        progress=progress,
        frames_done=row.frames_done or 0,
        frames_total=row.frames_total,
        fps=row.fps,
        eta_seconds=row.eta_seconds,
        error=error,
        attempts=row.attempts or 0,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
        expired=expired,
        deleted=row.deleted,
        cancel_requested=row.cancel_requested,
        source=JobSource(kind=row.source_kind, filename=row.source_filename,  # type: ignore[arg-type]
                         url=_redacted(row.source_url), bytes=row.source_bytes),
        options=EnhanceOptions.model_validate(row.options),
        stats=stats,
        webhook_url=_redacted(row.webhook_url),
        links=JobLinks(self=base, result=f"{base}/result", cancel=base),
    )


def _redacted(url: str | None) -> str | None:
    """``url`` without a password in it (``user:***@host``), for display."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _job_response(row: JobRow, status: int, **headers: str) -> JSONResponse:
    headers.setdefault("Location", f"{API_PREFIX}/jobs/{row.id}")
    return JSONResponse(job_model(row).model_dump(mode="json"), status_code=status, headers=headers)


def _multipart_schema() -> dict[str, Any]:
    """OpenAPI schema of the multipart body: the ``file`` part and the option fields."""
    options = JobOptions.model_json_schema()["properties"]
    props: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                      "description": "The video."}, **options}
    return {"type": "object", "properties": props, "required": ["file"]}


def _install_openapi(app: FastAPI) -> None:
    """Add the models only named in ``openapi_extra`` (the JSON job request) to the spec."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default()
            extra = JobCreateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(extra.pop("$defs", {}))
            schemas["JobCreateRequest"] = extra
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app on ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="vqe",
        version="1",
        summary="Codec-aware video quality enhancement",
        description="Upload a video or give a stream URL; get the enhanced video back, "
        "synchronously for short clips (`/v1/enhance`) or as a batch job (`/v1/jobs`).",
        lifespan=lifespan,
    )
    app.state.service = service

    # -- errors: always {"error": {"code", "message"}} --------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(UserError)
    @app.exception_handler(BitstreamError)
    async def _input_error(_r: Request, exc: Exception) -> JSONResponse:
        status, code = _status_of(exc)
        return error_response(status, code, (str(exc).splitlines() or [code])[0])

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")

    # -- health -------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health}})
    async def readyz() -> JSONResponse:
        """The database, the storage and the job backend all answer."""

        def check() -> dict[str, str]:
            checks = {}
            try:
                service.store.ping()
                checks["database"] = "ok"
            except Exception as exc:  # noqa: BLE001
                checks["database"] = f"error: {type(exc).__name__}"
            checks["storage"] = "ok" if service.storage.writable() else "error: not writable"
            checks["queue"] = "ok" if service.backend.ready() else "error: unavailable"
            return checks

        checks = await run_in_threadpool(check)
        ok = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    # -- synchronous enhancement -----------------------------------------------------

    @app.post(
        f"{API_PREFIX}/enhance",
        tags=["enhance"],
        response_class=FileResponse,
        responses={
            200: {"content": {"video/mp4": {}, "video/x-matroska": {}},
                  "description": "The enhanced video."},
            **ERROR_RESPONSES,
        },
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _multipart_schema()}}}},
    )
    async def enhance(request: Request) -> FileResponse:
        """Enhance a short clip and stream the result back (multipart: `file` + options).

        Inputs over `VQE_SYNC_MAX_BYTES` / `VQE_SYNC_MAX_SECONDS` / `VQE_SYNC_MAX_FRAMES`
        are refused with 413: submit those with `POST /v1/jobs`.
        """
        limits = settings.limits
        tmp = service.storage.tmp_path()
        output: Path | None = None
        try:
            upload = await receive_multipart(request, tmp, limits.sync_max_bytes, sync=True)
            options = parse_options(upload.fields)
            report = await run_in_threadpool(probe_file, tmp)
            check_limits(report, limits, sync=True)
            output = service.storage.tmp_path(report.result_ext)

            def run() -> Any:
                with service.sync.borrow() as pipeline:
                    return pipeline.run(tmp, output, pipeline_options(options.model_dump(),
                                                                      settings))

            result = await run_in_threadpool(run)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if output is not None:
                output.unlink(missing_ok=True)
            raise
        stats = result_stats(result, output.stat().st_size)
        name = SAFE_NAME.sub("_", Path(upload.filename or "video").stem)[:100] or "video"
        return FileResponse(
            output,
            media_type=MEDIA_TYPES[report.result_ext],
            filename=f"{name}.enhanced{report.result_ext}",
            headers={"X-VQE-Stats": json.dumps(stats, separators=(",", ":"))},
            background=BackgroundTask(_unlink, tmp, output),
        )

    # -- jobs -------------------------------------------------------------------------------

    @app.post(
        f"{API_PREFIX}/jobs",
        tags=["jobs"],
        status_code=202,
        response_model=Job,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _multipart_schema()},
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreateRequest"}},
        }}},
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
        if idempotency_key:
            existing = service.store.get_by_idempotency_key(idempotency_key)
            if existing is not None:
                await _drain(request)
                return _job_response(existing, 202, **{"Idempotent-Replayed": "true"})
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
        headers = {} if created else {"Idempotent-Replayed": "true"}
        return _job_response(row, 202, **headers)

    async def _job_from_upload(request: Request, job_id: str, tmp: Path) -> NewJob:
        upload = await receive_multipart(request, tmp, settings.limits.max_upload_bytes,
                                         sync=False)
        options = parse_options(upload.fields, JobOptions)
        hook = await run_in_threadpool(_webhook_of, options)
        report = await run_in_threadpool(_probe_checked, tmp, settings)
        service.storage.adopt_input(job_id, tmp)
        return NewJob(id=job_id, source_kind="upload", options=options.model_dump(
                          exclude=set(WEBHOOK_FIELDS)),
                      source_filename=upload.filename, source_bytes=upload.size,
                      result_ext=report.result_ext, frames_total=report.frames, **hook)

    async def _job_from_json(request: Request, job_id: str, tmp: Path) -> NewJob:
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > MAX_JSON_BYTES:
                raise ApiError(413, "request_too_large", "the JSON body is too large")
        try:
            values = json.loads(body)
        except ValueError:
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(values, dict):
            raise ApiError(422, "invalid_request", "the JSON body must be an object")
        req = parse_options(values, JobCreateRequest)
        hook = await run_in_threadpool(_webhook_of, req)
        fetched = await run_in_threadpool(
            fetch_source, req.source_url, tmp, service.ctx.policy, settings.limits,
            settings.url_timeout,
        )
        if fetched.local:
            service.storage.adopt_input(job_id, tmp)
        options = {k: v for k, v in req.model_dump().items() if k in OPTION_FIELDS}
        return NewJob(id=job_id, source_kind="url", options=options, source_url=req.source_url,
                      source_bytes=fetched.size, input_ready=fetched.local,
                      result_ext=fetched.report.result_ext if fetched.local else ".mkv",
                      frames_total=fetched.report.frames, **hook)

    def _webhook_of(options: JobOptions) -> dict[str, Any]:
        url = check_url(options.webhook_url, service.ctx.policy, settings)
        return {"webhook_url": url, "webhook_progress": bool(url and options.webhook_progress)}

    @app.get(f"{API_PREFIX}/jobs", tags=["jobs"], response_model=JobList,
             responses=ERROR_RESPONSES)
    async def list_jobs(
        status: JobStatus | None = None,
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = Query(None, max_length=64),
    ) -> JobList:
        """Jobs, newest first; follow `next_cursor` for the next page."""
        try:
            if cursor:
                decode_cursor(cursor)
        except ValueError:
            raise ApiError(400, "invalid_cursor", "cursor is not valid") from None
        rows, next_cursor = await run_in_threadpool(service.store.list, status, limit, cursor,
                                                    auth.owner())
        return JobList(items=[job_model(r) for r in rows], next_cursor=next_cursor)

    @app.get(f"{API_PREFIX}/jobs/{{job_id}}", tags=["jobs"], response_model=Job,
             responses=ERROR_RESPONSES)
    async def get_job(job_id: str) -> Job:
        """Status, phase, progress, timing, error and stats of a job."""
        return job_model(await run_in_threadpool(service.job_or_404, job_id))

    @app.get(
        f"{API_PREFIX}/jobs/{{job_id}}/result",
        tags=["jobs"],
        response_class=FileResponse,
        responses={200: {"content": {"video/mp4": {}, "video/x-matroska": {}},
                         "description": "The enhanced video (HTTP Range supported)."},
                   206: {"description": "Part of the video (Range request)."},
                   **ERROR_RESPONSES},
    )
    async def job_result(job_id: str) -> FileResponse:
        """Download the result of a succeeded job. Supports `Range`."""
        row = await run_in_threadpool(service.job_or_404, job_id)
        job = job_model(row)
        if job.deleted:
            raise ApiError(410, "deleted", "the job's files were deleted")
        if job.expired:
            when = f"{job.expires_at:%Y-%m-%dT%H:%M:%SZ}" if job.expires_at else "its retention"
            raise ApiError(410, "expired", f"the result expired at {when}")
        if job.status is not JobStatus.succeeded:
            raise ApiError(409, "not_ready", f"the job is {job.status.value}; no result")
        path = service.storage.find_result(job_id)
        if path is None:
            raise ApiError(410, "expired", "the result is no longer stored")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix],
                            filename=f"{job_id}{path.suffix}")

    @app.delete(f"{API_PREFIX}/jobs/{{job_id}}", tags=["jobs"], response_model=Job,
                responses={202: {"model": Job, "description": "Cancellation requested."},
                           **ERROR_RESPONSES})
    async def delete_job(job_id: str) -> JSONResponse:
        """Cancel a queued or running job (202 while a running job stops), or delete a
        finished job's files (200). The job record stays and says so."""
        row = await run_in_threadpool(service.job_or_404, job_id)
        if JobStatus(row.status).finished:
            await run_in_threadpool(service.storage.remove_job, job_id)
            row = await run_in_threadpool(service.store.mark_deleted, job_id) or row
            return _job_response(row, 200)
        row = await run_in_threadpool(service.store.request_cancel, job_id) or row
        if JobStatus(row.status).finished:  # it was queued: canceled at once
            await run_in_threadpool(service.storage.remove_job, job_id)
            return _job_response(row, 200)
        return _job_response(row, 202)

    from service.web import install_web  # here: service.web imports this module

    install_web(app, service)
    events.install(app, service.job_or_404, job_model, settings.events_poll, ERROR_RESPONSES,
                   API_PREFIX)
    _install_openapi(app)
    # Middleware: the last added runs first: request id, latency, API key, the app.
    auth.install(app, settings.api_keys)  # after the OpenAPI wrapper: it documents 401s
    metrics.install(app, service.store)
    app.add_middleware(logs.RequestIdMiddleware)
    return app


def _probe_checked(path: Path, settings: Settings) -> ProbeReport:
    report = probe_file(path)
    check_limits(report, settings.limits)
    return report


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)

