"""``POST /v1/enhance``: a short clip in, the enhanced video back in the response."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from enhancer.options import parse_options
from service.api.deps import API_PREFIX, ERROR_RESPONSES, MEDIA_TYPES, Service
from service.api.uploads import multipart_schema, receive_multipart
from service.ingest.probe import check_limits, probe_file
from service.jobs.executor import result_stats

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")  # what of an upload's name goes in a header


def router(service: Service) -> APIRouter:
    """The routes of this resource, bound to ``service``."""
    settings = service.settings
    router = APIRouter()

    @router.post(
        f"{API_PREFIX}/enhance",
        tags=["enhance"],
        response_class=FileResponse,
        responses={
            200: {
                "content": {"video/mp4": {}, "video/x-matroska": {}},
                "description": "The enhanced video.",
            },
            **ERROR_RESPONSES,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": multipart_schema()}},
            }
        },
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
                    return pipeline.run(tmp, output, options)

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

    return router


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
