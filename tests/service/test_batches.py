"""``/v1/batches`` on a real ``vqe serve`` (SQLite, in-process executor) on loopback.

Uploads are tiny clips; stream URLs are served by a local ``http.server`` and webhooks
go to a local receiver, both allowlisted by exact host:port. Two API keys are on, so
ownership is checked too. Jobs run the real pipeline with ``stages=1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clips import make_clip, noise_bytes
from tests.service_fixtures import (
    ServiceProcess,
    count_frames,
    module_server,
    serve_files,
    wait_for,
)
from tests.webhook_receiver import Receiver, run_receiver

KEY, OTHER_KEY = "batch-key-1", "batch-key-2"
SECRET = "batch-webhook-secret"
MAX_FILES = 8
MAX_BYTES = 400_000
FRAMES = {"a.mp4": 3, "b.mkv": 4, "c.mp4": 5, "d.mov": 6}  # uploads; the URL's clip has 7


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch-clips")
    out = {
        name: make_clip(root / name, size=(64, 48), frames=n, seed=n) for name, n in FRAMES.items()
    }
    out["url.mp4"] = make_clip(root / "url.mp4", size=(64, 48), frames=7)
    out["long.mp4"] = make_clip(root / "long.mp4", size=(96, 64), frames=40)
    bad = root / "corrupt.mp4"
    bad.write_bytes(noise_bytes(3000))
    out["corrupt.mp4"] = bad
    return out


@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory, clips) -> Iterator[str]:
    root = tmp_path_factory.mktemp("batch-served")
    (root / "clip.mp4").write_bytes(clips["url.mp4"].read_bytes())
    with serve_files(root) as base:
        yield base


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with run_receiver() as rec:
        yield rec


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, file_server: str, receiver: Receiver
) -> Iterator[ServiceProcess]:
    hosts = [file_server.removeprefix("http://"), receiver.url.split("/")[2]]
    env = {
        "VQE_URL_ALLOWLIST": ",".join(hosts),
        "VQE_API_KEYS": f"{KEY},{OTHER_KEY}",
        "VQE_WEBHOOK_SECRET": SECRET,
        "VQE_WEBHOOK_MIN_BACKOFF": "0.2",
        "VQE_BATCH_MAX_FILES": str(MAX_FILES),
        "VQE_BATCH_MAX_BYTES": str(MAX_BYTES),
        "VQE_URL_TIMEOUT": "10",
    }
    yield from module_server(tmp_path_factory, "batch-data", env)


@pytest.fixture(scope="module")
def http(server: ServiceProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        yield client


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _wait_finished(http: httpx.Client, batch_id: str, timeout: float = 180) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        batch = http.get(f"/v1/batches/{batch_id}").json()
        return batch if batch["status"] not in ("queued", "running") else None

    return wait_for(finished, timeout, 0.3, what=f"batch {batch_id} to finish")


def _assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in r.text and "\n" not in body["error"]["message"]
    return body["error"]["message"]


def test_five_uploads_and_a_url_one_corrupt(
    http: httpx.Client, clips: dict[str, Path], file_server: str, receiver: Receiver, tmp_path
):
    uploads = [clips[n] for n in ("a.mp4", "b.mkv", "corrupt.mp4", "c.mp4", "d.mov")]
    url = f"{file_server}/clip.mp4"
    r = http.post(
        "/v1/batches",
        files=_files(uploads),
        data={"source_url": url, "stages": "1", "webhook_url": receiver.url},
    )
    assert r.status_code == 202, r.text
    batch = r.json()
    assert {"id", "status", "counts", "jobs", "links"} <= set(batch)
    assert r.headers["location"] == batch["links"]["self"] == f"/v1/batches/{batch['id']}"
    assert batch["options"]["stages"] == 1 and len(batch["jobs"]) == 6
    names = [j["source"]["filename"] or j["source"]["url"] for j in batch["jobs"]]
    assert names == ["a.mp4", "b.mkv", "corrupt.mp4", "c.mp4", "d.mov", url]
    refused = batch["jobs"][2]
    assert refused["status"] == "failed" and refused["error"]["code"] == "unsupported_input"
    assert batch["counts"]["failed"] == 1

    done = _wait_finished(http, batch["id"])
    assert done["status"] == "partial" and done["progress"] == 1.0, done
    assert done["counts"] == {"queued": 0, "running": 0, "succeeded": 5, "failed": 1,
                              "canceled": 0}  # fmt: skip
    expected = [3, 4, None, 5, 6, 7]
    for job, frames in zip(done["jobs"], expected, strict=True):
        if frames is None:
            assert job["status"] == "failed"
            assert "not a video" in job["error"]["message"], job["error"]
            assert _assert_error(http.get(job["links"]["result"]), 409, "not_ready")
            continue
        assert job["status"] == "succeeded" and job["frames_done"] == frames, job
        assert job["stats"]["frames"] == frames
        result = http.get(job["links"]["result"])
        assert result.status_code == 200, result.text
        out = (
            tmp_path
            / f"{job['id']}.{'mp4' if result.headers['content-type'] == 'video/mp4' else 'mkv'}"
        )
        out.write_bytes(result.content)
        assert count_frames(out) == frames
        assert http.get(job["links"]["self"]).json()["batch_id"] == batch["id"]

    # Every job's end was POSTed to the batch's webhook, the refused one included.
    def six() -> list[dict[str, Any]] | None:
        events = [json.loads(c.body) for c in receiver.delivered()]
        mine = [e for e in events if e["data"]["job"]["batch_id"] == batch["id"]]
        return mine if len(mine) == 6 else None

    events = wait_for(six, 30, what="six webhook deliveries")
    assert sorted(e["type"] for e in events) == ["job.failed"] + ["job.succeeded"] * 5

    # Another key sees none of it.
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    _assert_error(http.get(f"/v1/batches/{batch['id']}", headers=other), 404, "not_found")
    assert http.get("/v1/batches", headers=other).json()["items"] == []
    _assert_error(http.get(done["jobs"][0]["links"]["self"], headers=other), 404, "not_found")


def test_json_source_urls_idempotency_and_pages(http: httpx.Client, file_server: str):
    body = {"source_urls": [f"{file_server}/clip.mp4", f"{file_server}/missing.mp4"], "stages": 1}
    headers = {"Idempotency-Key": "batch-idem-1"}
    first = http.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == 202, first.text
    again = http.post("/v1/batches", json=body, headers=headers)
    assert again.status_code == 202 and again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    missing = first.json()["jobs"][1]
    assert missing["status"] == "failed" and missing["error"]["code"] == "source_unavailable"
    assert "404" in missing["error"]["message"]
    done = _wait_finished(http, first.json()["id"])
    assert done["status"] == "partial" and done["jobs"][0]["frames_done"] == 7, done

    refused = http.post(
        "/v1/batches", json={"source_urls": ["http://169.254.169.254/x.mp4"], "stages": 1}
    )
    assert refused.status_code == 202, refused.text
    assert refused.json()["status"] == "failed"
    assert refused.json()["jobs"][0]["error"]["code"] == "url_not_allowed"

    seen, cursor = [], None
    for _ in range(20):
        page = http.get(
            "/v1/batches", params={"limit": 1, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        seen += [b["id"] for b in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    everything = [b["id"] for b in http.get("/v1/batches", params={"limit": 100}).json()["items"]]
    assert seen == everything and len(seen) >= 2
    assert seen[:2] == [refused.json()["id"], first.json()["id"]]  # newest first


def test_cancel_stops_what_has_not_finished(http: httpx.Client, clips: dict[str, Path]):
    r = http.post("/v1/batches", files=_files([clips["long.mp4"]] * 4), data={"stages": "1"})
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    d = http.delete(f"/v1/batches/{batch_id}")
    assert d.status_code in (200, 202), d.text
    assert d.json()["cancel_requested"] is True
    done = _wait_finished(http, batch_id)
    statuses = [j["status"] for j in done["jobs"]]
    assert set(statuses) <= {"canceled", "succeeded"} and statuses.count("canceled") >= 2, done
    assert done["status"] in ("canceled", "partial")
    again = http.delete(f"/v1/batches/{batch_id}")  # nothing left to cancel
    assert again.status_code == 200 and [j["status"] for j in again.json()["jobs"]] == statuses


def test_bad_batches_get_a_4xx_and_store_nothing(
    http: httpx.Client, server: ServiceProcess, clips: dict[str, Path], tmp_path: Path
):
    def stored() -> tuple[list[str], list[str], list[str]]:
        storage = server.data_dir / "storage"
        jobs = http.get("/v1/jobs", params={"limit": 200}).json()["items"]
        return (
            [j["id"] for j in jobs],
            sorted(p.name for p in (storage / "jobs").iterdir()),
            sorted(p.name for p in (storage / "tmp").iterdir()),
        )

    before = stored()
    small = clips["a.mp4"]
    blob = tmp_path / "blob.mp4"
    blob.write_bytes(noise_bytes(MAX_BYTES // 3 + 1000))
    cases = [
        (http.post("/v1/batches", files=_files([small] * (MAX_FILES + 1))), 413, "too_many_inputs"),
        (
            http.post(
                "/v1/batches",
                files=_files([small] * 3),
                data={"source_url": ["http://a.example/1.mp4"] * (MAX_FILES - 2)},
            ),
            413,
            "too_many_inputs",
        ),
        (
            http.post(
                "/v1/batches", json={"source_urls": ["http://a.example/1"] * (MAX_FILES + 1)}
            ),
            413,
            "too_many_inputs",
        ),
        (http.post("/v1/batches", files=_files([blob] * 3)), 413, "batch_too_large"),
        (http.post("/v1/batches", files=[("stages", (None, b"1"))]), 422, "invalid_request"),
        (http.post("/v1/batches", json={"source_urls": []}), 422, "invalid_options"),
        (
            http.post("/v1/batches", json={"source_url": "http://a.example/1"}),
            422,
            "invalid_options",
        ),
        (
            http.post("/v1/batches", files=_files([small]), data={"stages": "9"}),
            422,
            "invalid_options",
        ),
        (
            http.post("/v1/batches", files=_files([small]), data={"crf": "99"}),
            422,
            "invalid_options",
        ),
        (http.post("/v1/batches", json=[1]), 422, "invalid_request"),
        (
            http.post("/v1/batches", content=b"{no", headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        ),
        (
            http.post("/v1/batches", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),  # fmt: skip
        (
            http.post(
                "/v1/batches",
                files=_files([small]),
                data={"webhook_url": "http://10.0.0.1/hook"},
            ),
            422,
            "url_not_allowed",
        ),
        (http.get("/v1/batches/0123456789abcdef0123456789abcdef"), 404, "not_found"),
        (http.get("/v1/batches/../../etc"), 404, "not_found"),
        (http.delete("/v1/batches/not-a-batch"), 404, "not_found"),
        (http.get("/v1/batches", params={"cursor": "!!"}), 400, "invalid_cursor"),
    ]
    for response, status, code in cases:
        _assert_error(response, status, code)
    after = stored()
    assert after[0] == before[0] and set(after[1]) <= set(before[1]) and after[2] == before[2]
    spec = http.get("/openapi.json").json()
    assert {"/v1/batches", "/v1/batches/{batch_id}"} <= set(spec["paths"])
    assert {"Batch", "BatchCreateRequest", "BatchList"} <= set(spec["components"]["schemas"])
