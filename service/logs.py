"""Structured logs: one JSON object per line, with the job id and the request id.

:func:`setup` configures the root logger for ``vqe serve`` and ``vqe worker``
(``VQE_LOG_FORMAT=json`` by default, ``text`` for humans); uvicorn's and
Dramatiq's loggers go through it too. Every record carries ``ts``, ``level``,
``logger`` and ``msg``, plus:

* ``job_id`` on every line logged while a job runs (:func:`job_context`, set by
  the job runner on its thread and on the job's watcher thread);
* ``request_id`` on every line logged while an HTTP request is handled:
  :class:`RequestIdMiddleware` takes ``X-Request-ID`` from the request (when it
  is 1-128 safe characters) or makes one, and returns it in the response.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import uuid
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from typing import Any

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqe_job", default=None)
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vqe_request", default=None
)
REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_STD_FIELDS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag the log lines of the current thread (or task) with ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the job and request ids of the current context onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (extra fields given with ``extra=`` are kept)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_FIELDS and value is not None and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{k}={getattr(record, k)}"
            for k in ("job_id", "request_id")
            if getattr(record, k, None)
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def setup(level: str = "info", fmt: str = "json") -> None:
    """Log to stderr in ``fmt`` (json | text) at ``level``, for this process."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "dramatiq"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo, else a new one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _SAFE_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: a request id per HTTP request, in the logs and the response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
