"""Job progress as server-sent events: ``GET /v1/jobs/{id}/events``.

The stream reads the job from the job store every ``VQE_EVENTS_POLL`` seconds
(never from process memory), so any API replica can serve it, and it goes on
across a restart of the API or of the worker running the job. Each message
carries the whole job (the body of ``GET /v1/jobs/{id}``)::

    id: 17                  <- the job's revision: bumped by every change in the store
    event: status           <- status or phase changed (also the first message)
    data: {"id": ..., "status": "running", "phase": "enhancing", "progress": 0.4, ...}

``event: progress`` follows frames; ``event: done`` carries the final job and
ends the stream. Comment lines (``: keep-alive``) keep idle connections open.
A client that reconnects with ``Last-Event-ID`` (browsers' ``EventSource``
does it on its own) continues from there: it gets the current state at once
if the job changed since, and a finished job whose final message it already
has answers ``204 No Content``, which tells ``EventSource`` to stop. A server
shutting down closes its streams (clients reconnect to another replica).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import API_PREFIX, ERROR_RESPONSES, Service
from service.api.presenters import job_model

log = logging.getLogger("vqe.events")

KEEPALIVE_SECONDS = 15.0
RETRY_MS = 2000  # the reconnection delay suggested to clients

JobOr404 = Callable[[str], Any]  # job id -> JobRow, raising the API's 404
Render = Callable[[Any], Any]  # JobRow -> Job model


def sse(data: str, event: str | None = None, id_: str | None = None) -> str:
    """One message in the ``text/event-stream`` format."""
    lines = []
    if id_ is not None:
        lines.append(f"id: {id_}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return "\n".join(lines) + "\n\n"


def _last_id(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() and len(value) < 19 else None


def _signature(job: Any) -> tuple[Any, ...]:
    return (
        job.status,
        job.phase,
        job.frames_done,
        job.frames_total,
        job.cancel_requested,
        job.attempts,
        job.error is not None,
    )


class JobEvents:
    """The event stream of one job for one client."""

    def __init__(
        self, job_id: str, load: JobOr404, render: Render, poll: float, stopping: Callable[[], bool]
    ) -> None:
        self.job_id = job_id
        self.load = load
        self.render = render
        self.poll = poll
        self.stopping = stopping

    async def stream(self, request: Request, last_id: int | None) -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        sent: tuple[Any, ...] | None = None
        last_write = time.monotonic()
        while True:
            try:
                row = await run_in_threadpool(self.load, self.job_id)
            except Exception as exc:  # noqa: BLE001
                if getattr(exc, "status", None) == 404:  # gone: the client sees 404 next time
                    return
                log.warning("job %s: event stream cannot read the job", self.job_id, exc_info=True)
                await asyncio.sleep(self.poll)
                continue
            job = self.render(row)
            revision = int(row.revision or 0)
            if job.status.finished:
                yield sse(job.model_dump_json(), "done", str(revision))
                return
            if last_id is None or revision != last_id:
                sig = _signature(job)
                if sig != sent:
                    kind = "status" if sent is None or sig[:2] != sent[:2] else "progress"
                    yield sse(job.model_dump_json(), kind, str(revision))
                    sent, last_write = sig, time.monotonic()
                last_id = revision
            if time.monotonic() - last_write > KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            if self.stopping() or await request.is_disconnected():
                return
            await asyncio.sleep(self.poll)


EVENT_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-sent events: `status`, `progress`, then `done`.",
    },
    204: {"description": "The job ended and the client already has its final event."},
}


def router(service: Service) -> APIRouter:
    """``GET /v1/jobs/{job_id}/events``. ``app.state.stopping`` (a callable, set by
    ``vqe serve``) says the server is shutting down."""
    router = APIRouter()
    job_or_404, render, poll = service.job_or_404, job_model, service.settings.events_poll
    prefix, errors = API_PREFIX, ERROR_RESPONSES

    @router.get(
        f"{prefix}/jobs/{{job_id}}/events",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={**EVENT_STREAM_DOC, **errors},
    )
    async def job_events(
        job_id: str,
        request: Request,
        last_event_id: str | None = Header(None, max_length=64),
    ) -> Response:
        """Follow a job: server-sent events with its status, phase and progress until it
        ends. Reconnect with `Last-Event-ID` to continue."""
        row = await run_in_threadpool(job_or_404, job_id)  # 404 before the stream starts
        last_id = _last_id(last_event_id)
        job = render(row)
        if job.status.finished and last_id is not None and last_id >= int(row.revision or 0):
            return Response(status_code=204)

        def stopping() -> bool:
            check = getattr(request.app.state, "stopping", None)
            return bool(check and check())

        events = JobEvents(job_id, job_or_404, render, poll, stopping)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            events.stream(request, last_id), media_type="text/event-stream", headers=headers
        )

    return router


def parse_stream(lines: list[str]) -> list[dict[str, Any]]:
    """The messages in an event stream's lines, ``data`` decoded as JSON (for tests and
    the bench)."""
    messages: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in current:
                messages.append({**current, "data": json.loads(current["data"])})
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        current[name] = f"{current[name]}\n{value}" if name in current else value
    return messages
