"""Operations on a real `vqe serve`: API keys, webhooks, /metrics and structured logs.

One server with two API keys and a webhook secret; its webhook receiver is a real
HTTP server on loopback (allowlisted by exact host:port) that refuses the first
delivery. One small job (stages=1) feeds every test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.auth import key_id
from service.jobs.database import Database
from service.jobs.status import JobStatus
from service.jobs.storage import new_job_id
from service.jobs.store import JobStore, NewJob
from service.jobs.webhooks import verify
from tests.clips import make_clip
from tests.service_fixtures import ServiceProcess, wait_for
from tests.webhook_receiver import Receiver, run_receiver

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-9876543210"
ADMIN, METRICS_TOKEN = "key-admin-5555555555", "metrics-token-777"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
ADM = {"Authorization": f"Bearer {ADMIN}"}
SCRAPER = {"Authorization": f"Bearer {METRICS_TOKEN}"}
SECRET = "whsec-ops-test"
FRAMES = 6


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with run_receiver(fail_first=[502]) as rec:
        yield rec


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver):
    allow = receiver.url.removeprefix("http://").split("/")[0]
    env = {
        "VQE_API_KEYS": f"{KEY_A}, {KEY_B}",
        "VQE_ADMIN_KEYS": ADMIN,
        "VQE_METRICS_TOKEN": METRICS_TOKEN,
        "VQE_WEBHOOK_SECRET": SECRET,
        "VQE_URL_ALLOWLIST": allow,
        "VQE_WEBHOOK_MIN_BACKOFF": "0.3",
        "VQE_QUEUE_URL": "",
    }
    with ServiceProcess("serve", tmp_path_factory.mktemp("ops-data"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def job(http: httpx.Client, receiver: Receiver, tmp_path_factory) -> dict:
    clip = make_clip(tmp_path_factory.mktemp("ops-clip") / "c.mp4", size=(64, 48), frames=FRAMES)
    with open(clip, "rb") as fh:
        r = http.post(
            "/v1/jobs",
            files={"file": ("c.mp4", fh)},
            data={"stages": "1", "webhook_url": receiver.url, "webhook_progress": "true"},
            headers={**A, "Idempotency-Key": "same-key", "X-Request-ID": "req-ops-submit"},
        )
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "req-ops-submit"
    job_id = r.json()["id"]

    def finished() -> dict | None:
        body = http.get(f"/v1/jobs/{job_id}", headers=A).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    done = wait_for(finished, 180, 0.3, what="the job to finish")
    assert done["status"] == "succeeded", done
    assert done["webhook_url"] == receiver.url
    return done


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert "Traceback" not in r.text


def test_v1_needs_a_key_and_the_rest_stays_open(http: httpx.Client):
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
    ):
        r = http.get("/v1/jobs", headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(http.post("/v1/jobs", json={"source_url": "http://x"}), 401, "unauthorized")
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert http.get(path).status_code == 200, path
    # /metrics: the metrics token or an admin key, not a plain key nor nothing.
    assert_error(http.get("/metrics"), 401, "unauthorized")
    assert_error(http.get("/metrics", headers=A), 401, "unauthorized")
    assert http.get("/metrics", headers=SCRAPER).status_code == 200
    assert http.get("/metrics", headers=ADM).status_code == 200
    spec = http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "401" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert http.get("/v1/jobs", headers=A).status_code == 200


def test_each_key_sees_only_its_own_jobs(http: httpx.Client, job: dict, server: ServiceProcess):
    job_id = job["id"]
    for method, path in (("GET", ""), ("GET", "/result"), ("GET", "/events"), ("DELETE", "")):
        r = http.request(method, f"/v1/jobs/{job_id}{path}", headers=B)
        assert_error(r, 404, "not_found")
    assert job_id not in [j["id"] for j in http.get("/v1/jobs", headers=B).json()["items"]]
    assert job_id in [j["id"] for j in http.get("/v1/jobs", headers=A).json()["items"]]
    assert http.get(f"/v1/jobs/{job_id}/result", headers=A).status_code == 200
    # An Idempotency-Key is private to its key: B's request is not a replay of A's job.
    r = http.post(
        "/v1/jobs",
        json={"source_url": "ftp://example.com/v.mp4"},
        headers={**B, "Idempotency-Key": "same-key"},
    )
    assert_error(r, 422, "url_not_allowed")
    # Keys are never logged or stored; the key id is.
    log = server.log(tail=None)
    assert KEY_A not in log and KEY_B not in log
    db = b"".join(p.read_bytes() for p in server.data_dir.glob("jobs.db*"))  # with the WAL
    assert KEY_A.encode() not in db and key_id(KEY_A).encode() in db


def test_webhooks_are_signed_retried_and_deduplicable(job: dict, receiver: Receiver):
    def terminal() -> list:
        return [c for c in receiver.delivered() if json.loads(c.body)["type"] == "job.succeeded"]

    (delivered,) = wait_for(terminal, 30, what="the job.succeeded webhook")
    body = json.loads(delivered.body)
    assert body["job_id"] == job["id"] and body["data"]["job"]["status"] == "succeeded"
    assert body["data"]["job"]["stats"]["frames"] == FRAMES
    h = delivered.headers
    assert h["Vqe-Webhook-Id"] == body["id"]
    assert verify(SECRET, h["Vqe-Webhook-Timestamp"], delivered.body, h["Vqe-Webhook-Signature"])
    # The first call was refused (502) and retried with the same event id and body.
    first = receiver.calls[0]
    retried = [
        c for c in receiver.calls if c.headers["Vqe-Webhook-Id"] == first.headers["Vqe-Webhook-Id"]
    ]
    assert len(retried) == 2 and retried[0].body == retried[1].body
    ids = [c.headers["Vqe-Webhook-Id"] for c in receiver.delivered()]
    assert len(ids) == len(set(ids))  # nothing delivered twice
    types = [json.loads(c.body)["type"] for c in receiver.delivered()]
    assert set(types) <= {"job.progress", "job.succeeded"}, types


def test_webhook_url_is_checked_like_source_urls(http: httpx.Client, tmp_path: Path):
    for url in ("http://169.254.169.254/hook", "http://127.0.0.1:1/hook", "gopher://x/"):
        r = http.post(
            "/v1/jobs", json={"source_url": "ftp://x/v.mp4", "webhook_url": url}, headers=A
        )
        assert r.status_code == 422 and "webhook_url" in r.json()["error"]["message"], r.text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"{name}{{{want}}} not in metrics"
    return float(match.group(1))


def test_metrics(http: httpx.Client, job: dict):
    r = http.get("/metrics", headers=SCRAPER)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample(text, "vqe_jobs", status="succeeded") >= 1
    assert sample(text, "vqe_queue_depth") == 0
    assert sample(text, "vqe_frames_enhanced_total") >= FRAMES
    assert sample(text, "vqe_workers", kind="executor") == 1
    assert sample(text, "vqe_running_fps") >= 0
    assert sample(text, "vqe_frame_stages_bucket", le="1.0") >= FRAMES
    assert sample(text, "vqe_job_fps_count") >= 1
    assert (
        sample(
            text,
            "vqe_http_request_duration_seconds_count",
            method="GET",
            route="/v1/jobs/{job_id}",
            status="200",
        )
        >= 1
    )
    assert sample(text, "vqe_store_up") == 1


def test_logs_are_json_with_job_and_request_ids(job: dict, server: ServiceProcess):
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in lines)
    about_job = [e for e in lines if f"job {job['id']}:" in e["msg"]]
    assert about_job and all(e.get("job_id") == job["id"] for e in about_job)
    assert any(e.get("request_id") == "req-ops-submit" for e in lines)


def test_admin_key_sees_and_manages_ownerless_jobs(
    http: httpx.Client, job: dict, server: ServiceProcess
):
    # Jobs made while keys were off have no owner (written to the server's store directly).
    db = Database(f"sqlite:///{server.data_dir / 'jobs.db'}")
    store = JobStore(db)
    try:
        queued, finished = new_job_id(), new_job_id()
        for job_id in (queued, finished):
            store.create(NewJob(id=job_id, source_kind="upload", options={"stages": 1}))
        store.claim(finished, "old-server", 30)
        store.finish(finished, "old-server", JobStatus.failed, error=("x", "y"))
    finally:
        db.close()
    for key in (A, B):
        assert_error(http.get(f"/v1/jobs/{queued}", headers=key), 404, "not_found")
        listed = {j["id"] for j in http.get("/v1/jobs", headers=key).json()["items"]}
        assert not {queued, finished} & listed
    listed = {j["id"] for j in http.get("/v1/jobs", headers=ADM).json()["items"]}
    assert {queued, finished} <= listed and job["id"] not in listed  # not A's jobs
    assert http.get(f"/v1/jobs/{queued}", headers=ADM).json()["status"] == "queued"
    r = http.delete(f"/v1/jobs/{queued}", headers=ADM)
    assert r.status_code in (200, 202), r.text
    assert http.get(f"/v1/jobs/{queued}", headers=ADM).json()["status"] == "canceled"
    assert http.delete(f"/v1/jobs/{finished}", headers=ADM).status_code in (200, 202, 204)
    assert_error(http.get(f"/v1/jobs/{job['id']}", headers=ADM), 404, "not_found")
