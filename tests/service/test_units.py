"""Service parts in-process: URL policy, job store transitions, storage, config, the runner,
and the docker-compose deployment file (parsed; Docker itself cannot run here)."""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from enhancer.options import EnhanceOptions
from enhancer.run import Progress
from service.config import ENV_VARS, Limits, Settings
from service.errors import InputTooLarge, NotAVideo, SourceUnavailable, URLNotAllowed, UserError
from service.ingest.policy import URLPolicy
from service.ingest.probe import ProbeReport, check_limits, probe_file
from service.jobs.context import Context
from service.jobs.database import Database, decode_cursor, encode_cursor, utcnow
from service.jobs.executor import JobRunner, Outcome, _Watch, backoff_seconds
from service.jobs.runtime import open_context
from service.jobs.status import JobStatus
from service.jobs.storage import Storage, is_job_id, new_job_id
from service.jobs.store import Claim, JobStore, NewJob
from tests.clips import make_clip
from tests.slow_service import frame_delay

REPO = Path(__file__).resolve().parents[2]


def resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int):
        if host not in table:
            raise SourceUnavailable(f"cannot resolve {host}")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


# -- URL policy -------------------------------------------------------------------------------

DNS = {
    "public.example": ["93.184.216.34"],
    "rebind.example": ["93.184.216.34", "127.0.0.1"],  # one bad address is enough to refuse
    "internal.example": ["10.0.0.7"],
    "metadata.google.internal": ["169.254.169.254"],
    "v6.example": ["2606:2800:220:1:248:1893:25c8:1946"],
}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://127.1/x",
        "http://10.0.0.1/x",
        "http://172.16.5.4/x",
        "http://192.168.0.1/x",
        "http://169.254.169.254/latest/",
        "http://100.100.100.200/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:10.0.0.1]/",
        "http://rebind.example/x",
        "http://internal.example/x",
        "http://metadata.google.internal/computeMetadata/v1/",
        "file:///etc/passwd",
        "concat:a|b",
        "subfile:,,start,0,end,0,,:/etc/passwd",
        "ftp://public.example/x",
        "gopher://public.example/",
        "data:video/mp4;base64,AAAA",
        "//public.example/x",
        "http:///x",
        "http://public.example/a b",
        "",
    ],
)
def test_url_policy_refuses(url: str):
    with pytest.raises((URLNotAllowed, SourceUnavailable)):
        URLPolicy(resolver=resolver(DNS)).check(url)


@pytest.mark.parametrize(
    ("url", "kind", "pinned"),
    [
        ("http://public.example/a.mp4", "http", "http://93.184.216.34/a.mp4"),
        ("https://public.example:8443/a.mp4?x=1", "http", "https://93.184.216.34:8443/a.mp4?x=1"),
        ("hls+https://public.example/l.m3u8", "hls", "https://93.184.216.34/l.m3u8"),
        ("rtmp://public.example/live/key", "rtmp", "rtmp://93.184.216.34/live/key"),
        ("rtsp://v6.example/cam", "rtsp", "rtsp://[2606:2800:220:1:248:1893:25c8:1946]/cam"),
    ],
)
def test_url_policy_accepts_public_hosts_and_pins_the_address(url: str, kind: str, pinned: str):
    checked = URLPolicy(resolver=resolver(DNS)).check(url)
    assert checked.kind == kind and checked.pinned_url() == pinned


def test_allowlist_entries_are_exact():
    policy = URLPolicy(
        ["127.0.0.1:8080", "10.0.0.0/8", "internal.example", "[::1]:9000"], resolver=resolver(DNS)
    )
    for ok in (
        "http://127.0.0.1:8080/a",
        "http://10.9.8.7/a",
        "http://internal.example/a",
        "http://[::1]:9000/a",
    ):
        policy.check(ok)
    for bad in ("http://127.0.0.1:8081/a", "http://192.168.1.1/a", "http://[::1]:9001/a"):
        with pytest.raises(URLNotAllowed):
            policy.check(bad)


# -- job store -----------------------------------------------------------------------------


@pytest.fixture
def store(database_url: str) -> JobStore:
    db = Database(database_url)
    yield JobStore(db)
    db.close()


def new(job_id: str | None = None, **kw) -> NewJob:
    return NewJob(id=job_id or new_job_id(), source_kind="upload", options={"stages": 1}, **kw)


def test_claim_lease_and_takeover(store: JobStore):
    job = new()
    store.create(job)
    assert store.claim(job.id, "a", lease=30) is Claim.claimed
    assert store.claim(job.id, "b", lease=30) is Claim.held
    assert store.report(job.id, "a", 30, frames_done=3) is True
    assert store.report(job.id, "b", 30) is False  # not the owner
    # Worker "a" dies: once its lease lapses, "b" takes the job over.
    store.report(job.id, "a", -1)
    assert store.claim(job.id, "b", lease=30) is Claim.claimed
    assert store.report(job.id, "a", 30) is False and store.get(job.id).attempts == 2
    assert store.finish(job.id, "a", JobStatus.succeeded) is False  # the loser cannot finish it
    assert store.finish(job.id, "b", JobStatus.succeeded, stats={"frames": 3}) is True
    row = store.get(job.id)
    assert row.status == "succeeded" and row.frames_done == 3
    assert store.claim(job.id, "c", lease=30) is Claim.finished
    assert store.claim(new_job_id(), "c", lease=30) is Claim.missing


def test_cancel_queued_and_running(store: JobStore):
    queued, running = new(), new()
    store.create(queued)
    store.create(running)
    store.claim(running.id, "w", 30)
    assert store.request_cancel(queued.id).status == "canceled"
    row = store.request_cancel(running.id)
    assert row.status == "running" and row.cancel_requested
    assert store.report(running.id, "w", 30) is False  # the worker learns it must stop
    assert store.claim(queued.id, "w", 30) is Claim.finished


def test_idempotency_pagination_and_expiry(store: JobStore):
    first, created = store.create(new(idempotency_key="k"))
    again, created_again = store.create(new(idempotency_key="k"))
    assert created and not created_again and again.id == first.id
    ids = [first.id] + [store.create(new())[0].id for _ in range(4)]
    page, cursor = store.list(limit=2)
    assert [r.id for r in page] == ids[::-1][:2] and cursor
    page2, cursor2 = store.list(limit=2, cursor=cursor)
    page3, cursor3 = store.list(limit=2, cursor=cursor2)
    assert [r.id for r in page + page2 + page3] == ids[::-1] and cursor3 is None
    assert decode_cursor(encode_cursor(17)) == 17
    with pytest.raises(ValueError):
        decode_cursor("garbage!")
    store.claim(ids[1], "w", 30)
    store.finish(ids[1], "w", JobStatus.succeeded, expires_at=utcnow() - timedelta(seconds=1))
    assert store.expire_due() == [ids[1]] and store.expire_due() == []
    assert [r.id for r in store.list(status=JobStatus.succeeded)[0]] == [ids[1]]


def test_restart_requeues_running_jobs(store: JobStore):
    a, b = new(), new()
    store.create(a)
    store.create(b)
    store.claim(a.id, "dead", 30)
    store.claim(b.id, "dead", 30)
    store.request_cancel(b.id)
    assert store.requeue_all_running() == [a.id]
    assert store.get(a.id).status == "queued" and store.get(b.id).status == "canceled"


# -- storage, config, models ------------------------------------------------------------------


def test_storage_paths_come_from_job_ids_only(tmp_path: Path):
    storage = Storage(tmp_path)
    job_id = new_job_id()
    assert is_job_id(job_id) and storage.input_path(job_id).parent == tmp_path / "jobs" / job_id
    for bad in ("../etc", "a" * 31, "A" * 32, f"{job_id}/../x", ""):
        with pytest.raises(ValueError):
            storage.job_dir(bad)
    with pytest.raises(ValueError):
        storage.result_path(job_id, ".sh")


def test_settings_from_env(tmp_path: Path):
    s = Settings.from_env(
        {"VQE_WORKERS": "3", "VQE_URL_ALLOWLIST": "a:1, 10.0.0.0/8"}, data_dir=tmp_path
    )
    assert s.workers == 3 and s.url_allowlist == ("a:1", "10.0.0.0/8") and not s.uses_redis
    assert s.database_url == f"sqlite:///{tmp_path / 'jobs.db'}"
    assert s.storage_dir == tmp_path / "storage"
    with pytest.raises(UserError):
        Settings.from_env({"VQE_WORKERS": "many"})
    with pytest.raises(UserError):
        Settings.from_env({"VQE_QUEUE_URL": "amqp://x"})
    assert backoff_seconds(Settings(job_min_backoff_ms=1000, job_max_backoff_ms=5000), 5) == 5


def test_limits_on_resolution_duration_and_frames():
    limits = Limits(
        max_width=1920,
        max_height=1080,
        max_duration=60,
        max_frames=1000,
        sync_max_seconds=5,
        sync_max_frames=100,
    )
    ok = ProbeReport("mov,mp4", "h264", 1920, 1080, 30.0, 750)
    check_limits(ok, limits)
    for report in (
        replace(ok, width=1921),
        replace(ok, height=2000),
        replace(ok, duration=61.0),
        replace(ok, frames=1001),
    ):
        with pytest.raises(InputTooLarge):
            check_limits(report, limits)
    with pytest.raises(InputTooLarge, match="/v1/jobs"):
        check_limits(ok, limits, sync=True)


def test_probe_refuses_containers_that_are_not_video(tmp_path: Path):
    lyrics = tmp_path / "song.mp4"
    lyrics.write_text("[ar:Someone]\n[00:01.00]first line\n[00:02.50]second line\n")
    with pytest.raises(NotAVideo, match="not a video we accept: it reads as 'lrc'"):
        probe_file(lyrics)


def test_options_model_is_strict():
    assert EnhanceOptions.model_validate({"stages": "2", "crf": ""}).stages == 2
    for bad in (
        {"stages": 9},
        {"stages": -1},
        {"codec": "divx"},
        {"side_info": "x"},
        {"crf": 52},
        {"preset": "warp"},
        {"codec": "ffv1", "crf": 20},
        {"max_frames": 0},
        {"x": 1},
    ):
        with pytest.raises(ValueError):
            EnhanceOptions.model_validate(bad)


# -- the job runner, in-process ------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    settings = Settings.from_env({"VQE_JOB_LEASE": "5"}, data_dir=tmp_path / "data")
    c = open_context(settings)
    yield c
    c.close()


def _queue_clip(ctx: Context, clip: Path, **options) -> str:
    job_id = new_job_id()
    dest = ctx.storage.input_path(job_id)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(clip.read_bytes())
    ctx.jobs.create(NewJob(id=job_id, source_kind="upload", options={"stages": 1, **options}))
    return job_id


def test_runner_time_limit_and_permanent_failure(ctx: Context, tmp_path: Path):
    clip = make_clip(tmp_path / "c.mp4", size=(64, 48), frames=12)
    limited = Settings.from_env(
        {"VQE_JOB_TIME_LIMIT": "0.5", "VQE_JOB_LEASE": "3"}, data_dir=tmp_path / "data"
    )
    job_id = _queue_clip(ctx, clip)
    slow = JobRunner(replace(ctx, settings=limited), observer=frame_delay(0.3))
    assert slow.run(job_id) is Outcome.done
    row = ctx.jobs.get(job_id)
    assert (row.status, row.error_code) == ("failed", "time_limit")
    assert not ctx.storage.job_dir(job_id).exists()

    # An input that breaks inside the pipeline is a permanent failure, never retried.
    bad = _queue_clip(ctx, clip)
    ctx.storage.input_path(bad).write_bytes(b"\x00" * 100)
    assert JobRunner(ctx).run(bad, final_attempt=False) is Outcome.done
    assert ctx.jobs.get(bad).status == "failed"


def test_runner_retries_transient_failures(ctx: Context, tmp_path: Path):
    clip = make_clip(tmp_path / "c.mp4", size=(64, 48), frames=4)
    job_id = _queue_clip(ctx, clip)
    runner = JobRunner(ctx)

    class Broken:
        def run(self, *args, **kwargs):
            raise RuntimeError("GPU fell off the bus")

    real_get = runner.pipelines.get
    runner.pipelines.get = Broken  # type: ignore[method-assign]
    assert runner.run(job_id, final_attempt=False) is Outcome.retry
    row = ctx.jobs.get(job_id)
    assert row.status == "queued" and row.error_code == "retrying"
    runner.pipelines.get = real_get  # type: ignore[method-assign]
    assert runner.run(job_id) is Outcome.done
    row = ctx.jobs.get(job_id)
    assert row.status == "succeeded" and row.attempts == 2 and row.error_code is None, (
        row.error_code,
        row.error_message,
    )
    assert probe_file(ctx.storage.find_result(job_id)).frames == 4


def test_runner_stops_on_shutdown(ctx: Context, tmp_path: Path):
    clip = make_clip(tmp_path / "c.mp4", size=(64, 48), frames=40)
    job_id = _queue_clip(ctx, clip)
    shutdown = threading.Event()
    threading.Timer(1.5, shutdown.set).start()
    started = time.monotonic()
    assert JobRunner(ctx, shutdown, observer=frame_delay(0.2)).run(job_id) is Outcome.requeued
    assert time.monotonic() - started < 7  # the whole job would take 8 s or more
    assert ctx.jobs.get(job_id).status == "queued"
    assert ctx.storage.input_path(job_id).exists()  # kept for the next run


def test_shutdown_lets_a_job_in_its_encoder_flush_finish(ctx: Context):
    """A job past its last frame (the encoder's flush) is at its end: a shutdown must not
    hand it back (it did, when a watcher tick fell between the last frame and the mux)."""
    shutdown = threading.Event()
    shutdown.set()
    watch = _Watch(JobRunner(ctx, shutdown, finish_within=30.0), new_job_id(), "owner")
    watch.progress(Progress("encoding", 40, 40, 6.0, 0.0))
    assert watch._finishes_in_time()
    watch.progress(Progress("encoding", 40, None, 6.0, None))  # a stream of unknown length
    assert watch._finishes_in_time()
    watch.progress(Progress("enhancing", 10, 40, 6.0, 5.0))
    assert watch._finishes_in_time()
    watch.progress(Progress("enhancing", 10, 400, 6.0, 65.0))  # far from its end
    assert not watch._finishes_in_time()
    watch.progress(Progress("probing", 0, None, 0.0, None))
    assert not watch._finishes_in_time()


# -- docker-compose ----------------------------------------------------------------------------


def test_compose_file():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis"} <= set(services)
    for name in ("api", "worker", "redis"):
        assert services[name]["healthcheck"]["test"], name
    api, worker = services["api"], services["worker"]
    for svc, dockerfile in ((api, "Dockerfile"), (worker, "Dockerfile.cuda")):
        assert svc["build"]["dockerfile"] == f"docker/{dockerfile}"
        assert (REPO / "docker" / dockerfile).is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    # One shared volume, mounted where both keep their storage and database.
    mounts = {
        svc: dict(m.split(":")[:2] for m in services[svc]["volumes"]) for svc in ("api", "worker")
    }
    assert mounts["api"] == mounts["worker"] and "vqe-data" in compose["volumes"]
    shared = mounts["api"]["vqe-data"]
    for svc in (api, worker):
        # ${VAR:-default}: what compose uses when the variable is not set.
        env = {
            k: re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", str(v))
            for k, v in svc["environment"].items()
        }
        assert set(env) <= set(ENV_VARS), set(env) - set(ENV_VARS)
        assert env["VQE_QUEUE_URL"].startswith("redis://redis:")
        assert env["VQE_STORAGE_DIR"].startswith(shared)
        assert env["VQE_DATABASE_URL"] == f"sqlite:///{shared}/jobs.db" or env[
            "VQE_DATABASE_URL"
        ].startswith("postgresql")
    assert "vqe" in api["command"] and "serve" in api["command"]
    assert worker["command"] == ["vqe", "worker"]
    assert any(p.endswith(":8000") for p in api["ports"])
