"""The service's errors and their one mapping to ``(HTTP status, code, message)``.

Every error a user can fix is a :class:`bitstream.errors.VqeError` (this module
re-exports it and :class:`UserError`); the subclasses here are the inputs the
service refuses. :func:`error_info` is the only place an exception becomes a
code: the API's handlers, the job runner and the CLI all use it.
"""

from __future__ import annotations

from bitstream.errors import UserError, VqeError, first_line

__all__ = [
    "ApiError",
    "InputTooLarge",
    "NotAVideo",
    "ServiceInputError",
    "SourceUnavailable",
    "URLNotAllowed",
    "UserError",
    "VqeError",
    "error_info",
    "first_line",
]


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


def error_info(exc: BaseException) -> tuple[int, str, str]:
    """``(status, code, one-line message)`` of any exception; 500 for a bug."""
    if isinstance(exc, VqeError):
        return exc.status, exc.code, first_line(exc, exc.code)
    return 500, "internal_error", "internal error; see the server log"
