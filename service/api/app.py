"""The HTTP API (FastAPI): ``create_app()`` builds the app from :class:`service.config.Settings`.

It is what ``vqe serve`` hands to uvicorn; OpenAPI at ``/docs``. The routes
live one resource per module in :mod:`service.api.routes` (health, enhance,
jobs, batches, events, web); shared state in :mod:`service.api.deps`. Every error is
JSON ``{"error": {"code", "message"}}``; the code and status come from
:func:`service.errors.error_info`, the project's one mapping.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from enhancer.options import options_error
from service import logs
from service.api import auth
from service.api.deps import Service, error_response
from service.api.presenters import render_job
from service.api.routes import batches, enhance, events, health, jobs, web
from service.api.schemas import BatchCreateRequest, JobCreateRequest
from service.config import Settings
from service.errors import VqeError, error_info, operator_fault
from service.jobs import metrics
from service.jobs.executor import Observer
from service.jobs.runtime import Runtime

log = logging.getLogger("vqe.api")


def _install_openapi(app: FastAPI) -> None:
    """Add the models only named in ``openapi_extra`` (the JSON job and batch requests) to the
    spec."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in (JobCreateRequest, BatchCreateRequest):
                extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(extra.pop("$defs", {}))
                schemas[model.__name__] = extra
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, observer: Observer | None = None) -> FastAPI:
    """The FastAPI app on ``settings`` (default: from the environment); ``observer`` is
    told each progress report of the jobs the in-process executor runs."""
    settings = settings or Settings.from_env()
    service = Service(Runtime.api(settings, render_job, observer))

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
        "synchronously for short clips (`/v1/enhance`), as a job (`/v1/jobs`) or many at "
        "once (`/v1/batches`).",
        lifespan=lifespan,
    )
    app.state.service = service

    # -- errors: always {"error": {"code", "message"}} --------------------------------

    @app.exception_handler(VqeError)
    async def _known_error(_r: Request, exc: VqeError) -> JSONResponse:
        return error_response(*error_info(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", options_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    async def _fault(_r: Request, exc: Exception) -> JSONResponse:
        # Disk full, database down...: answered here (error_info logs them), so that the
        # last-resort handler below, which re-raises to the server, sees only bugs.
        if operator_fault(exc) is None:
            log.exception("unhandled error")
        return error_response(*error_info(exc))

    app.add_exception_handler(OSError, _fault)
    app.add_exception_handler(SQLAlchemyError, _fault)

    @app.exception_handler(Exception)
    async def _internal_error(_r: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(*error_info(exc))

    for resource in (health, enhance, jobs, batches, events, web):
        app.include_router(resource.router(service))
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    _install_openapi(app)
    # Middleware: the last added runs first: request id, latency, API key, the app.
    # After the OpenAPI wrapper: it documents 401s.
    auth.install(
        app,
        settings.api_keys,
        settings.admin_keys,
        settings.metrics_token,
        settings.metrics_allowlist,
    )
    metrics.install(app, service.ctx.counts, service.ctx.workers)
    app.add_middleware(logs.RequestIdMiddleware)
    return app
