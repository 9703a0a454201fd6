"""What the job and batch routes share: the submit request body's OpenAPI description,
``Idempotency-Key`` replays and the list cursor check (the intake of their inputs is
:mod:`service.api.intake`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.api.uploads import drain
from service.errors import ApiError
from service.jobs.database import decode_cursor

Row = TypeVar("Row")

REPLAYED = {"Idempotent-Replayed": "true"}  # the header of an answer to a repeated request


def request_body(multipart: dict[str, Any], json_model: str) -> dict[str, Any]:
    """``openapi_extra`` of a submit route: a multipart body with schema ``multipart``,
    or JSON with the component schema named ``json_model``."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model}"}},
            },
        }
    }


async def replayed(
    request: Request, idempotency_key: str | None, lookup: Callable[[str], Row | None]
) -> Row | None:
    """What an earlier request with ``idempotency_key`` made (``lookup`` finds it), with
    this request's body drained; None when there is no key or nothing made with it."""
    if not idempotency_key:
        return None
    existing = await run_in_threadpool(lookup, idempotency_key)
    if existing is not None:
        await drain(request)
    return existing


def check_cursor(cursor: str | None) -> None:
    """Refuse (400) a list ``cursor`` that is not one of ours."""
    try:
        if cursor:
            decode_cursor(cursor)
    except ValueError:
        raise ApiError(400, "invalid_cursor", "cursor is not valid") from None
