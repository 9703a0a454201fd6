"""Scale-out on a real Redis: the API queues jobs through Dramatiq, `vqe worker`s run them.

Skipped cleanly when ``redis-server`` is not installed. Queue timings are
shortened for the test (2 s heartbeat, recovery on every queue command, 3 s
job lease) and the kill test slows jobs with ``TEST_FRAME_DELAY`` (see ``tests/slow_service.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.clips import make_clip
from tests.service_fixtures import Api, ServiceProcess, count_frames, run_redis

FRAMES = 16
SUBMISSIONS = 20


@pytest.fixture(scope="module")
def queue_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with run_redis(tmp_path_factory.mktemp("redis")) as url:
        yield {
            "VQE_QUEUE_URL": url,
            "VQE_JOB_LEASE": "3",
            "VQE_QUEUE_HEARTBEAT_MS": "2000",
            "VQE_QUEUE_MAINTENANCE_CHANCE": "1000000",
            "VQE_JOB_MIN_BACKOFF_MS": "200",
        }


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, queue_env: dict[str, str]
) -> Iterator[tuple[Api, Path]]:
    data_dir = tmp_path_factory.mktemp("cluster")
    with ServiceProcess("serve", data_dir, queue_env) as srv:
        api = Api(srv.url)
        assert api.http.get("/readyz").json()["checks"]["queue"] == "ok"
        yield api, data_dir
        api.close()


@pytest.fixture
def workers(cluster: tuple[Api, Path], queue_env: dict[str, str]) -> Iterator[list]:
    """Start workers with ``workers.append(start_worker(**env))``; all are stopped after."""
    started: list[ServiceProcess] = []
    yield started
    for worker in started:
        worker.stop(20)


def start_worker(cluster: tuple[Api, Path], queue_env: dict[str, str], **env: str):
    return ServiceProcess("worker", cluster[1], {**queue_env, **env}).start()


def started_jobs(worker: ServiceProcess) -> list[str]:
    return re.findall(r"job ([0-9a-f]{32}): started by", worker.log(tail=None))


def test_killed_worker_job_is_finished_by_another(
    cluster: tuple[Api, Path], queue_env: dict[str, str], workers: list, tmp_path: Path
):
    api, _ = cluster
    clip = make_clip(tmp_path / "slow.mp4", size=(64, 48), frames=FRAMES)
    slow = {"TEST_FRAME_DELAY": "0.25"}
    first = start_worker(cluster, queue_env, **slow)
    workers.append(first)
    job_id = api.submit_file(clip, stages=1).json()["id"]
    api.wait_running(job_id, frames=3, timeout=90)
    second = start_worker(cluster, queue_env, **slow)
    workers.append(second)
    first.kill()  # SIGKILL mid-job: the message was never acked

    done = api.wait(job_id, timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert started_jobs(first) == [job_id] and started_jobs(second) == [job_id]
    assert count_frames(api.download(job_id, tmp_path / "out.mp4")) == FRAMES


def test_concurrent_submissions_all_succeed_once(
    cluster: tuple[Api, Path], queue_env: dict[str, str], workers: list, tmp_path: Path
):
    api, _ = cluster
    clip = make_clip(tmp_path / "c.mp4", size=(64, 48), frames=5)
    workers += [start_worker(cluster, queue_env), start_worker(cluster, queue_env)]

    def submit(i: int) -> str:
        r = Api(api.base).submit_file(clip, stages=1)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    with ThreadPoolExecutor(SUBMISSIONS) as pool:
        ids = list(pool.map(submit, range(SUBMISSIONS)))
    assert len(set(ids)) == SUBMISSIONS
    for job_id in ids:
        job = api.wait(job_id, timeout=180)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert job["stats"]["frames"] == 5
    runs = started_jobs(workers[0]) + started_jobs(workers[1])
    assert sorted(runs) == sorted(ids)  # each job ran exactly once
    listed = api.http.get("/v1/jobs", params={"limit": 200}).json()["items"]
    assert set(ids) <= {j["id"] for j in listed}
    assert count_frames(api.download(ids[-1], tmp_path / "last.mp4")) == 5
