"""Webhook delivery against a real receiver on loopback: signing, retries with backoff,
the same event id and body on every attempt, leases between processes, giving up.

The job database is a real SQLite file; two :class:`Database` objects on it stand for two
processes (the one that ends the job and another that delivers after a crash).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from service.api.schemas import JobStatus
from service.config import Settings
from service.errors import URLNotAllowed
from service.ingest.policy import URLPolicy
from service.jobs.database import Database
from service.jobs.outbox import WebhookOutbox
from service.jobs.store import JobStore, NewJob
from service.jobs.webhooks import WebhookDispatcher, check_url, sign, verify
from tests.service_fixtures import wait_for
from tests.webhook_receiver import run_receiver

SECRET = "whsec-test"


def settings(tmp_path: Path, **kw: object) -> Settings:
    base = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        storage_dir=tmp_path / "storage",
        webhook_secret=SECRET,
        webhook_min_backoff=0.2,
        webhook_max_backoff=1.0,
        webhook_timeout=5,
    )
    return base.model_copy(update=kw)


def render(row) -> dict:  # noqa: ANN001 - a JobRow
    return {"id": row.id, "status": row.status}


def open_store(conf: Settings) -> tuple[JobStore, WebhookOutbox]:
    """The job and outbox repositories of one process on ``conf``'s database."""
    db = Database(conf.database_url)
    return JobStore(db), WebhookOutbox(db)


def finished_job(store: JobStore, url: str, job_id: str = "a" * 32, **kw: object) -> str:
    store.create(
        NewJob(id=job_id, source_kind="upload", options={}, webhook_url=url, frames_total=10, **kw)
    )  # type: ignore[arg-type]
    assert store.claim(job_id, "w1", 30).value == "claimed"
    assert store.finish(job_id, "w1", JobStatus.succeeded)
    return job_id


def test_signed_delivery_retried_with_the_same_id_and_body(tmp_path: Path):
    conf = settings(tmp_path)
    store, outbox = open_store(conf)
    with run_receiver(fail_first=[500, 503]) as receiver:
        policy = URLPolicy(["127.0.0.1"])
        job_id = finished_job(store, receiver.url)
        dispatcher = WebhookDispatcher(store, outbox, conf, policy, render=render)
        dispatcher.start()
        try:
            wait_for(lambda: receiver.delivered(), 20, what="a delivered webhook")
        finally:
            dispatcher.stop()
    calls = receiver.calls
    assert len(calls) == 3, [c.headers for c in calls]  # two refusals, then delivered
    ids = {c.headers["Vqe-Webhook-Id"] for c in calls}
    assert len(ids) == 1 and {c.body for c in calls} == {calls[0].body}
    for call in calls:
        h = call.headers
        assert h["Content-Type"] == "application/json"
        assert h["Vqe-Webhook-Signature"].startswith("v1=")
        assert verify(SECRET, h["Vqe-Webhook-Timestamp"], call.body, h["Vqe-Webhook-Signature"])
        assert not verify(
            "other", h["Vqe-Webhook-Timestamp"], call.body, h["Vqe-Webhook-Signature"]
        )
    body = json.loads(calls[0].body)
    assert body["id"] == ids.pop() and body["type"] == "job.succeeded"
    assert body["job_id"] == job_id and body["data"]["job"]["status"] == "succeeded"
    times = [float(c.headers["Vqe-Webhook-Timestamp"]) for c in calls]
    assert times[-1] - times[0] <= 5  # backoff 0.2 s, then 0.4 s
    (event,) = outbox.events(job_id)
    assert event.state == "delivered" and event.attempts == 3 and event.last_error is None


def test_a_crashed_sender_is_replaced_after_its_lease(tmp_path: Path):
    """The process that leased an event died before recording it: another one sends it
    (same id: the receiver de-duplicates), and a delivered event is never sent again."""
    conf = settings(tmp_path)
    with run_receiver() as receiver:
        policy = URLPolicy(["127.0.0.1"])
        ending, ending_outbox = open_store(conf)  # the process that ends the job
        finished_job(ending, receiver.url)
        (leased,) = ending_outbox.claim("crashed-process", 0.5)  # then it "dies"
        other = WebhookDispatcher(*open_store(conf), conf, policy, render)  # another process
        assert other.run_once() == 0  # the lease holds
        time.sleep(0.6)
        assert other.run_once() == 1
        assert other.run_once() == 0  # delivered: not again
    assert [c.headers["Vqe-Webhook-Id"] for c in receiver.calls] == [leased.id]


def test_gives_up_after_max_age_and_progress_events(tmp_path: Path):
    conf = settings(tmp_path, webhook_max_age=0.5)
    store, outbox = open_store(conf)
    policy = URLPolicy(["127.0.0.1"])
    with run_receiver(fail_first=[500] * 50) as receiver:
        job_id = "b" * 32
        store.create(
            NewJob(
                id=job_id,
                source_kind="upload",
                options={},
                webhook_url=receiver.url,
                webhook_progress=True,
                frames_total=10,
            )
        )
        store.claim(job_id, "w1", 30)
        for done in (1, 2, 3, 5, 5, 9):
            store.report(job_id, "w1", 30, frames_done=done)
        store.finish(job_id, "w1", JobStatus.failed, error=("corrupt_input", "bad"))
        types = [e.type for e in outbox.events(job_id)]
        # One event per 10 % passed (not per report), then the terminal one.
        assert types == ["job.progress"] * 5 + ["job.failed"], types  # 10,20,30,50,90 %
        dispatcher = WebhookDispatcher(store, outbox, conf, policy, render)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
            e.state == "pending" for e in outbox.events(job_id)
        ):
            dispatcher.run_once()
            time.sleep(0.05)
    states = {e.state for e in outbox.events(job_id)}
    assert states == {"failed"}, states
    assert all(c.headers["Vqe-Webhook-Id"].startswith("evt_") for c in receiver.calls)


def test_webhook_urls_get_the_source_url_checks(tmp_path: Path):
    conf = settings(tmp_path)
    strict = URLPolicy()
    for url in (
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest",
        "http://10.0.0.1/",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://[::1]/",
    ):
        with pytest.raises(URLNotAllowed):
            check_url(url, strict, conf)
    assert check_url("http://127.0.0.1:9/hook", URLPolicy(["127.0.0.1:9"]), conf)
    with pytest.raises(Exception, match="VQE_WEBHOOK_SECRET"):
        check_url("https://example.com/", strict, conf.model_copy(update={"webhook_secret": ""}))
    assert sign("k", "1", b"{}") == sign("k", "1", b"{}") != sign("k", "2", b"{}")
