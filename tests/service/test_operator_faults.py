"""Operator faults are 5xx with their own code and a log line; no answer shows a server
path or an internal address. Unit checks of the one mapping (``service.errors``), a job
whose model weights are missing, and an API whose PostgreSQL server went away."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy.exc import OperationalError

import enhancer.engine
from service.config import Settings
from service.errors import NotAVideo, UserError, error_info, public_message
from service.jobs.executor import JobRunner, Outcome
from service.jobs.runtime import open_context
from service.jobs.storage import new_job_id
from service.jobs.store import NewJob
from tests.clips import make_clip
from tests.service_fixtures import PostgresServer, ServiceProcess


def _missing_weights() -> UserError:
    try:
        try:
            raise FileNotFoundError("model weights not found: /srv/vqe/enhancer/weights/v2.pt")
        except OSError as exc:
            raise UserError(f"cannot set up the model: {exc}") from None
    except UserError as err:
        return err


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (_missing_weights(), 503, "model_unavailable"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/storage/tmp/x"),
            507,
            "storage_full",
        ),
        (
            OperationalError("SELECT 1", {}, Exception("connection to 10.1.2.3:5432 refused")),
            503,
            "database_unavailable",
        ),
        (
            NotAVideo("not a video file we can read: '/data/storage/tmp/ab12'"),
            415,
            "unsupported_input",
        ),
        (
            UserError("host 'db.internal' resolves to 10.0.0.7, a private address"),
            422,
            "invalid_request",
        ),
    ],
)
def test_error_mapping(exc: BaseException, status: int, code: str, caplog):
    with caplog.at_level(logging.ERROR, logger="vqe.errors"):
        got_status, got_code, message = error_info(exc)
    assert (got_status, got_code) == (status, code), message
    assert "/data" not in message and "/srv" not in message and "10." not in message, message
    if status >= 500:  # the operator learns the details from the log
        assert f"operator fault {code}" in caplog.text


def test_public_message_keeps_urls_and_relative_names():
    for text in (
        "cannot fetch https://example.com/a/b.mp4: HTTP 404 (in.mp4)",
        "over the limit. Submit it as a batch job: POST /v1/jobs",
    ):
        assert public_message(text) == text


def test_a_job_whose_weights_are_missing_fails_as_an_operator_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    def no_weights(*_a, **_k):
        raise FileNotFoundError(f"model weights not found: {tmp_path}/weights/missing.pt")

    monkeypatch.setattr(enhancer.engine, "Engine", no_weights)
    ctx = open_context(Settings.from_env({}, data_dir=tmp_path / "data"))
    try:
        job_id = new_job_id()
        dest = ctx.storage.input_path(job_id)
        dest.parent.mkdir(parents=True)
        dest.write_bytes(make_clip(tmp_path / "c.mp4", size=(64, 48), frames=2).read_bytes())
        ctx.jobs.create(NewJob(id=job_id, source_kind="upload", options={"stages": 1}))
        with caplog.at_level(logging.ERROR, logger="vqe.errors"):
            assert JobRunner(ctx).run(job_id) is Outcome.done
        row = ctx.jobs.get(job_id)
        assert row.status == "failed" and row.error_code == "model_unavailable", row.error_message
        assert str(tmp_path) not in (row.error_message or "")
        assert "operator fault model_unavailable" in caplog.text
    finally:
        ctx.close()


def test_database_unreachable_is_a_503_with_its_own_code(tmp_path: Path):
    pg = PostgresServer().start()
    try:
        env = {"VQE_DATABASE_URL": pg.new_database(), "VQE_QUEUE_URL": ""}
        with ServiceProcess("serve", tmp_path / "api", env) as srv:
            http = httpx.Client(base_url=srv.url, timeout=30)
            assert http.get("/v1/jobs").status_code == 200
            pg.stop()  # the database host goes away
            r = http.get("/v1/jobs")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
            assert "127.0.0.1" not in r.text and str(pg.port) not in r.text
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
            assert "operator fault database_unavailable" in srv.log(tail=None)
            http.close()
    finally:
        pg.stop()
