"""Job intake: what one submitted input becomes, for ``POST /v1/jobs`` and
``POST /v1/batches`` alike.

An input is an uploaded file (already received to a temporary file) or a source URL.
:func:`take_input` checks it as a job needs it (an upload is probed and held to the
limits; a URL goes through the URL policy, then a plain file is downloaded and probed,
a stream only checked), moves a local input into the job's folder and returns the
:class:`~service.jobs.store.NewJob` to store. With ``keep_refused`` (a batch), an input
refused for a reason the user can fix becomes a job that is already ``failed`` with its
error, and the other inputs go on; without it (a single job) the error is raised and is
the request's answer. :func:`job_fields` are the fields all the jobs of one request
share: the stored options, the checked webhook, the owner.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from service.api.schemas import OPTION_FIELDS, JobOptions
from service.api.uploads import FilePart
from service.errors import VqeError, error_info, operator_fault
from service.ingest.fetch import fetch_source
from service.ingest.probe import check_limits, probe_file
from service.jobs.database import utcnow
from service.jobs.store import NewJob
from service.jobs.webhooks import check_url

if TYPE_CHECKING:
    from service.api.deps import Service

URL_MAX = 4096  # characters of a source URL kept with its job


def job_fields(
    service: Service, options: JobOptions, owner_key: str | None, **extra: Any
) -> dict[str, Any]:
    """The fields of a new job that come from the request, not from its input: the
    enhancement options, the checked webhook (422 when refused), the owner, ``extra``."""
    url = check_url(options.webhook_url, service.ctx.policy, service.settings)
    return {
        "options": {k: v for k, v in options.model_dump().items() if k in OPTION_FIELDS},
        "webhook_url": url,
        "webhook_progress": bool(url and options.webhook_progress),
        "owner_key": owner_key,
        **extra,
    }


def take_input(
    service: Service,
    job_id: str,
    source: FilePart | str,
    fields: dict[str, Any],
    *,
    keep_refused: bool = False,
) -> NewJob:
    """The job ``job_id`` of an uploaded file or a source URL, with the request's
    ``fields`` (:func:`job_fields`); its input, when local, is in the job's folder."""
    if isinstance(source, str):
        base = {"id": job_id, "source_kind": "url", "source_url": source[:URL_MAX]}
    else:
        base = {"id": job_id, "source_kind": "upload", "source_filename": source.filename}
    try:
        found = (
            _url(service, job_id, source)
            if isinstance(source, str)
            else _upload(service, job_id, source)
        )
    except Exception as exc:  # noqa: BLE001 - _refused raises what is not the input's fault
        if not keep_refused:
            raise
        expires = utcnow() + timedelta(seconds=service.settings.retention)
        return NewJob(**base, **fields, error=_refused(exc), expires_at=expires)
    return NewJob(**base, **fields, **found)


def _upload(service: Service, job_id: str, part: FilePart) -> dict[str, Any]:
    if part.error is not None:
        raise part.error
    report = probe_file(part.path)
    check_limits(report, service.settings.limits)
    service.storage.adopt_input(job_id, part.path)
    return {
        "source_bytes": part.size,
        "result_ext": report.result_ext,
        "frames_total": report.frames,
    }


def _url(service: Service, job_id: str, url: str) -> dict[str, Any]:
    settings, storage = service.settings, service.storage
    tmp = storage.tmp_path()
    try:
        fetched = fetch_source(url, tmp, service.ctx.policy, settings.limits, settings.url_timeout)
        if fetched.local:
            storage.adopt_input(job_id, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "source_bytes": fetched.size,
        "input_ready": fetched.local,
        "result_ext": fetched.report.result_ext if fetched.local else ".mkv",
        "frames_total": fetched.report.frames,
    }


def _refused(exc: BaseException) -> tuple[str, str]:
    """(code, message) of an input the user can fix; anything else is raised again."""
    if not isinstance(exc, VqeError) or operator_fault(exc) is not None or exc.status >= 500:
        raise exc
    _status, code, message = error_info(exc)
    return code, message
