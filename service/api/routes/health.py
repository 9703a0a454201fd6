"""``/healthz`` and ``/readyz``."""

from __future__ import annotations

import shutil

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import Service
from service.api.schemas import Health


def router(service: Service) -> APIRouter:
    """The routes of this resource, bound to ``service``."""
    router = APIRouter()

    @router.get(
        "/healthz", response_model=Health, tags=["health"], response_model_exclude_none=True
    )
    async def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @router.get(
        "/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}}
    )
    async def readyz() -> JSONResponse:
        """The database, the storage (writable, with `VQE_MIN_FREE_DISK` free) and the job
        backend (Redis, or the in-process threads) all answer."""

        def check() -> tuple[dict[str, str], int | None]:
            checks = {}
            try:
                service.ctx.db.ping()
                checks["database"] = "ok"
            except Exception as exc:  # noqa: BLE001
                checks["database"] = f"error: {type(exc).__name__}"
            checks["storage"] = "ok" if service.storage.writable() else "error: not writable"
            free = None
            try:
                free = shutil.disk_usage(service.storage.root).free
                low = free < service.settings.min_free_disk
                checks["disk"] = (
                    f"error: {free / 2**30:.2f} GiB free, below VQE_MIN_FREE_DISK" if low else "ok"
                )
            except OSError as exc:
                checks["disk"] = f"error: {type(exc).__name__}"
            checks["queue"] = "ok" if service.backend.ready() else "error: unavailable"
            return checks, free

        checks, free = await run_in_threadpool(check)
        ok = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if ok else "unavailable", checks=checks, free_disk_bytes=free)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    # -- synchronous enhancement -----------------------------------------------------

    return router
