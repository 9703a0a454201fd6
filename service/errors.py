"""The service's errors and their one mapping to ``(HTTP status, code, message)``.

Every error a user can fix is a :class:`bitstream.errors.VqeError` (this module
re-exports it and :class:`UserError`); the subclasses here are the inputs the
service refuses. :func:`error_info` is the only place an exception becomes a
code: the API's handlers, the job runner and the CLI all use it.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

from bitstream.errors import UserError, VqeError, first_line

__all__ = [
    "ApiError",
    "InputTooLarge",
    "OperatorError",
    "NotAVideo",
    "ServiceInputError",
    "SourceUnavailable",
    "URLNotAllowed",
    "UserError",
    "VqeError",
    "error_info",
    "first_line",
    "operator_fault",
    "public_message",
]

log = logging.getLogger("vqe.errors")


class ServiceInputError(UserError):
    """A refused input; ``status`` and ``code`` become the HTTP answer."""

    code = "invalid_input"


class NotAVideo(ServiceInputError):
    status, code = 415, "unsupported_input"


class InputTooLarge(ServiceInputError):
    status, code = 413, "input_too_large"


class URLNotAllowed(ServiceInputError):
    code = "url_not_allowed"


class SourceUnavailable(ServiceInputError):
    code = "source_unavailable"


class ApiError(VqeError):
    """An answer of the API itself (not found, not ready, malformed request...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code, status=status)


class OperatorError(VqeError):
    """A fault of the deployment, not of the request (missing weights, full disk, database
    down): a 5xx with its own code, and a log line for whoever runs the service."""

    status, code = 503, "operator_error"


# Operator faults that arrive as other exceptions: (status, code, what the client is told).
MODEL_UNAVAILABLE = (
    503,
    "model_unavailable",
    "the enhancement model cannot be loaded on this server",
)
STORAGE_FULL = (507, "storage_full", "the server's storage is full; retry later")
DATABASE_UNAVAILABLE = (503, "database_unavailable", "the job database is unavailable; retry later")
STORAGE_UNAVAILABLE = (503, "storage_unavailable", "the server's storage is unavailable")

# An absolute path of two components or more (not the path part of a URL: no letter,
# digit, ':' or '/' before it; not one of the API's own routes, /v1/...) and an IP
# address, with an optional port.
_PATH = re.compile(r"(?<![\w:/.~-])/(?!v1/)(?:[^\s'\"/:]+/)+[^\s'\",:;)]*")
_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")


def public_message(message: str) -> str:
    """``message`` without server paths or network addresses (they go to the log only)."""
    return _ADDRESS.sub("<address>", _PATH.sub("<path>", message))


def _in_chain(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception it was raised from (or during) that is a ``kind``."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def operator_fault(exc: BaseException) -> tuple[int, str, str] | None:
    """``(status, code, message)`` when ``exc`` is the deployment's fault, else None."""
    if isinstance(exc, OperatorError):
        return exc.status, exc.code, public_message(first_line(exc, exc.code))
    os_error = _in_chain(exc, OSError)
    if os_error is not None and getattr(os_error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return STORAGE_FULL
    if isinstance(exc, VqeError) and "cannot set up the model" in str(exc):
        # enhancer.pipeline: no weights file, unreadable weights, no CUDA where asked.
        cause = exc.__cause__ or exc.__context__
        if cause is None or isinstance(cause, OSError | RuntimeError):
            return MODEL_UNAVAILABLE
    if isinstance(exc, FileNotFoundError) and "model weights" in str(exc):
        return MODEL_UNAVAILABLE
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None:
        kinds = (sqlalchemy_exc.OperationalError, sqlalchemy_exc.InterfaceError)
        db = _in_chain(exc, kinds)  # type: ignore[arg-type]
        if db is not None and not isinstance(exc, VqeError):
            return DATABASE_UNAVAILABLE
    if os_error is not None and getattr(os_error, "errno", None) in (errno.EROFS, errno.EIO):
        return STORAGE_UNAVAILABLE
    return None


def error_info(exc: BaseException) -> tuple[int, str, str]:
    """``(status, code, one-line message)`` of any exception; 500 for a bug, a 5xx of its
    own for an operator fault (:func:`operator_fault`, logged here with the details).
    Messages never show server paths or addresses (:func:`public_message`)."""
    fault = operator_fault(exc)
    if fault is not None:
        log.error(
            "operator fault %s: %s: %s", fault[1], type(exc).__name__, first_line(exc, fault[1])
        )
        return fault
    if isinstance(exc, VqeError):
        return exc.status, exc.code, public_message(first_line(exc, exc.code))
    return 500, "internal_error", "internal error; see the server log"
