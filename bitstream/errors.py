"""Every error the project raises for a user to fix: one base, one message helper.

Each error class carries its ``code`` (stable, machine-readable) and ``status``
(the HTTP status the service answers with); the CLI prints ``first_line(err)``
and exits 2. The layers above add subclasses (``enhancer`` none so far,
``service`` the refused-input errors) but never a second mapping: the
service's one lookup is :func:`service.errors.error_info`.
"""

from __future__ import annotations

__all__ = [
    "BitstreamError",
    "CorruptStream",
    "UnsupportedInput",
    "UnsupportedOutput",
    "UserError",
    "VqeError",
    "first_line",
]


class VqeError(Exception):
    """A problem the user can fix; ``str(err)`` is a message, its first line the summary."""

    code = "invalid_request"
    status = 422

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return first_line(self)


class UserError(VqeError):
    """Bad options, paths or limits outside the bitstream layer."""


class BitstreamError(VqeError):
    """Any failure to read or write a video."""

    code = "bitstream_error"


class UnsupportedInput(BitstreamError):
    """The input is not a video we can decode (missing, empty, not media, no video stream)."""

    code, status = "unsupported_input", 415


class CorruptStream(BitstreamError):
    """The input decoded only partly or not at all."""

    code = "corrupt_input"


class UnsupportedOutput(BitstreamError):
    """The requested output (container, codec, size, options) cannot be written."""

    code = "unsupported_output"


def first_line(exc: BaseException | str, default: str | None = None) -> str:
    """The first non-empty line of an error (an OS error's ``strerror`` when it has one)."""
    text = exc if isinstance(exc, str) else (getattr(exc, "strerror", None) or str(exc))
    lines = str(text).strip().splitlines()
    if lines:
        return lines[0]
    if default is not None:
        return default
    return type(exc).__name__ if not isinstance(exc, str) else ""
