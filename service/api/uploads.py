"""Request bodies received to disk: multipart uploads with a size limit, JSON bodies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.schemas import JobOptions
from service.errors import ApiError
from service.ingest.fetch import BoundedWriter, UploadTooLarge

MAX_FIELD_BYTES = 4096  # a form field (an option value)
MAX_JSON_BYTES = 64 << 10
MULTIPART_OVERHEAD = 64 << 10  # headers and option fields around the file part
DRAIN_BYTES = 16 << 20  # read and drop this much of a refused body so clients see the answer


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


def too_large(limit: int, sync: bool) -> ApiError:
    hint = " Submit large videos as a batch job: POST /v1/jobs." if sync else ""
    return ApiError(413, "input_too_large", f"the upload is larger than {limit} bytes.{hint}")


async def drain(request: Request) -> None:
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
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a `file` part")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        await drain(request)
        raise too_large(limit, sync)
    receiver = _MultipartReceiver(dest, limit)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except UploadTooLarge:
        await drain(request)
        raise too_large(limit, sync) from None
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


def multipart_schema() -> dict[str, Any]:
    """OpenAPI schema of the multipart body: the ``file`` part and the option fields."""
    options = JobOptions.model_json_schema()["properties"]
    props: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "The video."},
        **options,
    }
    return {"type": "object", "properties": props, "required": ["file"]}
