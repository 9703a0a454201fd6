"""Request bodies received to disk: multipart uploads with a size limit (one file for a job,
several for a batch), JSON bodies."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.schemas import JobOptions
from service.errors import ApiError, InputTooLarge, ServiceInputError
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
            self._file_begin(filename.decode("utf-8", "replace")[:255] if filename else None)
        elif filename is not None:
            raise ApiError(400, "invalid_request", f"unexpected file part {name!r}; use `file`")
        else:
            self._field_name = name

    def _file_begin(self, filename: str | None) -> None:
        """A ``file`` part begins (``filename`` as the client named it, cut to 255)."""
        if self.writer is not None:
            raise ApiError(400, "invalid_request", "only one `file` part is allowed")
        self.upload.filename = filename
        self.upload.path = self.dest
        self.writer = BoundedWriter(self.dest, self.limit)

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


@dataclass
class FilePart:
    """One uploaded file (a job's, or a part of a batch): received to ``path``, or refused
    (``error``)."""

    path: Path
    filename: str | None
    size: int = 0
    error: ServiceInputError | None = None


@dataclass
class BatchUpload:
    """A multipart batch request: its files (in order), source URLs and option fields."""

    files: list[FilePart] = field(default_factory=list)
    source_urls: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


class _BatchReceiver(_MultipartReceiver):
    """Many ``file`` parts, each to its own path from ``dest``, each within ``limit``
    bytes (a part over it is dropped and marked refused: its job fails, the others go
    on), all together within ``total`` bytes (else the request is refused, 413);
    repeated ``source_url`` fields; at most ``max_inputs`` of both."""

    def __init__(self, dest: Callable[[], Path], limit: int, total: int, max_inputs: int) -> None:
        super().__init__(Path(), limit)
        self.new_path = dest
        self.total = total
        self.max_inputs = max_inputs
        self.batch = BatchUpload(fields=self.upload.fields)  # the base class fills it
        self.received = 0
        self._part: FilePart | None = None

    def _count(self) -> None:
        if len(self.batch.files) + len(self.batch.source_urls) >= self.max_inputs:
            raise too_many(self.max_inputs)

    def _file_begin(self, filename: str | None) -> None:
        self._count()
        self._part = FilePart(self.new_path(), filename)
        self.batch.files.append(self._part)
        self.writer = BoundedWriter(self._part.path, self.limit)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field_name is not None:
            super()._part_data(data, start, end)
            return
        part = self._part
        if part is None or self.writer is None:
            return
        self.received += end - start
        if self.received > self.total:
            raise UploadTooLarge(self.total)
        if part.error is None:
            try:
                self.writer.write(data[start:end])
            except UploadTooLarge:  # this file only: the writer removed it
                part.error = InputTooLarge(f"the upload is larger than {self.limit} bytes")

    def _part_end(self) -> None:
        if self._field_name == "source_url":
            self._count()
            self.batch.source_urls.append(self._field_value.decode("utf-8", "replace").strip())
            self._field_name = None
        elif self._field_name is not None:
            super()._part_end()
        elif self._part is not None and self.writer is not None:
            if self._part.error is None:
                self.writer.close()
                self._part.size = self.writer.size
            self.writer = None
            self._part = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        for part in self.batch.files:
            part.path.unlink(missing_ok=True)


def too_many(limit: int) -> ApiError:
    return ApiError(
        413, "too_many_inputs", f"a batch takes at most {limit} videos (files and source URLs)"
    )


async def receive_batch(
    request: Request,
    dest: Callable[[], Path],
    limit: int,
    total: int,
    max_inputs: int,
) -> BatchUpload:
    """Stream a multipart batch to disk: each ``file`` part to a new path from ``dest``.

    Raises 413 when the parts together pass ``total`` bytes or there are more than
    ``max_inputs`` videos, 422 when there is none; every received file is removed then.
    """
    boundary = await _boundary(
        request,
        "send multipart/form-data with `file` parts, or JSON with `source_urls`",
        total,
        lambda: batch_too_large(total),
    )
    receiver = _BatchReceiver(dest, limit, total, max_inputs)
    try:
        await _feed(request, boundary, receiver)
    except UploadTooLarge:
        receiver.abort()
        await drain(request)
        raise batch_too_large(total) from None
    except ApiError:
        receiver.abort()
        await drain(request)
        raise
    except Exception as exc:  # malformed multipart, client went away
        receiver.abort()
        raise ApiError(400, "invalid_request", f"malformed multipart body: {exc}") from None
    batch = receiver.batch
    if not batch.files and not batch.source_urls:
        raise ApiError(422, "invalid_request", "the batch has no `file` part and no `source_url`")
    return batch


def batch_too_large(total: int) -> ApiError:
    return ApiError(
        413, "batch_too_large", f"the uploads of a batch may total at most {total} bytes"
    )


def too_large(limit: int, sync: bool) -> ApiError:
    hint = " Submit large videos as a batch job: POST /v1/jobs." if sync else ""
    return ApiError(413, "input_too_large", f"the upload is larger than {limit} bytes.{hint}")


async def _boundary(
    request: Request, hint: str, limit: int, too_big: Callable[[], ApiError]
) -> bytes:
    """The multipart boundary of the request: 415 (with ``hint``) when it is not
    ``multipart/form-data``; ``too_big()`` when its declared length is over ``limit`` and
    :data:`MULTIPART_OVERHEAD` (the body is drained first)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", hint)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        await drain(request)
        raise too_big()
    return boundary


async def _feed(request: Request, boundary: bytes, receiver: _MultipartReceiver) -> None:
    """Stream the request body through a multipart parser into ``receiver``."""
    parser = MultipartParser(boundary, receiver.callbacks())
    async for chunk in request.stream():
        parser.write(chunk)
    parser.finalize()


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's JSON body, which must be an object of at most :data:`MAX_JSON_BYTES`."""
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
    return values


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
    boundary = await _boundary(
        request,
        "send multipart/form-data with a `file` part",
        limit,
        lambda: too_large(limit, sync),
    )
    receiver = _MultipartReceiver(dest, limit)
    try:
        await _feed(request, boundary, receiver)
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


def batch_multipart_schema() -> dict[str, Any]:
    """OpenAPI schema of a multipart batch: repeated ``file`` parts, ``source_url`` fields
    and the option fields."""
    schema = multipart_schema()
    props = schema["properties"]
    props["file"] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": "The videos: one `file` part each.",
    }
    props["source_url"] = {
        "type": "array",
        "items": {"type": "string"},
        "description": "Stream URLs: one `source_url` field each.",
    }
    schema.pop("required", None)
    return schema


def multipart_schema() -> dict[str, Any]:
    """OpenAPI schema of the multipart body: the ``file`` part and the option fields."""
    options = JobOptions.model_json_schema()["properties"]
    props: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "The video."},
        **options,
    }
    return {"type": "object", "properties": props, "required": ["file"]}
