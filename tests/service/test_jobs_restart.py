"""Jobs survive the embedded server: kill or stop `vqe serve` mid-job and start it again.

Jobs are slowed with the test-only ``TEST_FRAME_DELAY`` (seconds per frame, see
``tests/slow_service.py``) so they are still running when the server goes down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clips import make_clip
from tests.service_fixtures import Api, ServiceProcess, count_frames, wait_for

FRAMES = 16
SLOW = {"TEST_FRAME_DELAY": "0.25", "VQE_JOB_LEASE": "5"}


@pytest.fixture(scope="module")
def slow_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("restart") / "slow.mp4", size=(64, 48), frames=FRAMES)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def servers() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for srv in started:
        srv.stop(10)


def start(servers: list[ServiceProcess], data_dir: Path, **env: str) -> tuple[ServiceProcess, Api]:
    srv = ServiceProcess("serve", data_dir, {**SLOW, **env}).start()
    servers.append(srv)
    return srv, Api(srv.url)


def test_killed_server_resumes_job_and_cancels_running_one(
    servers: list[ServiceProcess], data_dir: Path, slow_clip: Path, tmp_path: Path
):
    first, api = start(servers, data_dir)
    job_id = api.submit_file(slow_clip, stages=1).json()["id"]
    queued_id = api.submit_file(slow_clip, stages=1).json()["id"]  # waits behind it
    api.wait_running(job_id, frames=3)
    first.kill()  # SIGKILL: no chance to clean up

    second, api = start(servers, data_dir)
    done = api.wait(job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert count_frames(api.download(job_id, tmp_path / "r.mp4")) == FRAMES

    # The job queued behind it survived too; cancel it while it runs.
    api.wait_running(queued_id, frames=2)
    r = api.http.delete(f"/v1/jobs/{queued_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    canceled = api.wait(queued_id)
    assert canceled["status"] == "canceled", canceled
    assert api.http.get(f"/v1/jobs/{queued_id}/result").status_code == 409
    assert not (data_dir / "storage" / "jobs" / queued_id).exists()


def test_stopped_server_requeues_job_and_results_expire(
    servers: list[ServiceProcess], data_dir: Path, slow_clip: Path
):
    first, api = start(servers, data_dir)
    job_id = api.submit_file(slow_clip, stages=1).json()["id"]
    api.wait_running(job_id, frames=2)
    # SIGTERM: graceful; uvicorn re-raises the signal once shut down, hence -15.
    assert first.stop() in (0, -15)
    assert "interrupted by shutdown; queued again" in first.log(tail=None)

    _, api = start(servers, data_dir, VQE_RETENTION="2", VQE_SWEEP_INTERVAL="0.5")
    done = api.wait(job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    expired = api.wait(job_id, timeout=30, expired=True)
    assert expired["status"] == "succeeded"
    r = api.http.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 410 and r.json()["error"]["code"] == "expired", r.text
    job_dir = data_dir / "storage" / "jobs" / job_id
    wait_for(lambda: not job_dir.exists(), 10, what="expired files to be removed")
