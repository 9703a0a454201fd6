"""Helpers for the service tests: real processes on loopback, no mocks.

* :class:`ServiceProcess` starts ``python -m service.cli serve`` (or ``worker``)
  on a free port with its own data directory and environment; :func:`module_server`
  is a module fixture's server.
* :func:`run_redis` / :class:`RedisServer`: a private ``redis-server`` on a free
  port, without persistence, that a test can restart empty on the same port.
* :class:`PostgresServer`: a private PostgreSQL cluster from Debian's
  ``postgresql`` package (``initdb`` + ``pg_ctl`` in a temp dir, as the
  ``postgres`` user when run as root, trust auth on 127.0.0.1, a free port);
  :meth:`PostgresServer.new_database` gives each test its own database.
* Both skip the test when the binary is missing, and fail it instead under
  ``.ci/run`` (``CI_REQUIRE_SERVICES=1``).
* :func:`serve_files`: a ``http.server`` on 127.0.0.1 serving a folder, for
  stream-URL sources (the tests allowlist exactly its host:port).
* :class:`Api`: a small client for the job API.

Test modules wrap the context managers in their own (module-scoped) fixtures.
Jobs slow enough to interrupt mid-way: ``TEST_FRAME_DELAY`` (seconds per enhanced frame)
in a process's environment starts it through :mod:`tests.slow_service`, which gives
the composition root an observer that sleeps (production code never does).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from tests.slow_service import FRAME_DELAY

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180.0  # a loaded 2-core machine may take minutes to import torch & co.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


class ServiceProcess:
    """``vqe serve`` or ``vqe worker`` in a subprocess, logging to a file."""

    def __init__(
        self, kind: str, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.port = port or (free_port() if kind == "serve" else None)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / f"{kind}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        slow = FRAME_DELAY in self.env  # the test launcher that slows jobs down
        cmd = [
            sys.executable,
            "-m",
            "tests.slow_service" if slow else "service.cli",
            self.kind,
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "info",
        ]
        if self.kind == "serve":
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if self.kind == "serve":
            try:
                wait_for(self._healthy, START_TIMEOUT, what=f"server on {self.url}")
            except BaseException:
                self.stop(5)  # never leave a server behind that no fixture will stop
                raise AssertionError(f"server on {self.url} did not start:\n{self.log()}") from None
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self, tail: int | None = 6000) -> str:
        """The process's output: its last ``tail`` characters (for failure messages), or all."""
        try:
            text = self.log_path.read_text(errors="replace")
            return text[-tail:] if tail else text
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def module_server(
    tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str]
) -> Iterator[ServiceProcess]:
    """``vqe serve`` with ``env`` over a new data folder ``name``, for a module-scoped
    fixture to ``yield from``: stopped when the fixture is torn down."""
    with ServiceProcess("serve", tmp_path_factory.mktemp(name), env) as srv:
        yield srv


class Api:
    """A small client for the job API of one server."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = httpx.Client(base_url=base_url, timeout=60)

    def submit_file(
        self, path: Path, headers: dict[str, str] | None = None, **options: Any
    ) -> httpx.Response:
        with open(path, "rb") as fh:
            files = {"file": (path.name, fh, "application/octet-stream")}
            data = {k: str(v) for k, v in options.items()}
            return self.http.post("/v1/jobs", files=files, data=data, headers=headers)

    def submit_url(self, url: str, **options: Any) -> httpx.Response:
        return self.http.post("/v1/jobs", json={"source_url": url, **options})

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(
        self,
        job_id: str,
        statuses: tuple[str, ...] = ("succeeded", "failed", "canceled"),
        timeout: float = 120.0,
        **match: Any,
    ) -> dict[str, Any]:
        """Poll until the job's status is one of ``statuses`` (and fields match ``match``)."""

        def done() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["status"] in statuses and all(job.get(k) == v for k, v in match.items()):
                return job
            return None

        return wait_for(done, timeout, 0.2, what=f"job {job_id} in {statuses}")

    def wait_running(self, job_id: str, frames: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            job = self.job(job_id)
            assert job["status"] in ("queued", "running"), job
            ok = job["status"] == "running" and job["frames_done"] >= frames
            return job if ok else None

        return wait_for(running, timeout, 0.1, what=f"job {job_id} to be running")

    def download(self, job_id: str, dest: Path) -> Path:
        r = self.http.get(f"/v1/jobs/{job_id}/result")
        assert r.status_code == 200, r.text
        dest.write_bytes(r.content)
        return dest

    def close(self) -> None:
        self.http.close()


class RedisServer:
    """A private redis-server on 127.0.0.1 without persistence; :meth:`restart` brings it
    back empty on the same port (as after a crash without AOF)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server is not installed (apt-get install redis-server)")
        self.binary = str(binary)
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self.up, 20, what="redis-server")
        return self

    def up(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), 0.5) as s,
        ):
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextlib.contextmanager
def run_redis(workdir: Path) -> Iterator[str]:
    """A private redis-server (no persistence); yields its URL."""
    server = RedisServer(workdir).start()
    try:
        yield server.url
    finally:
        server.stop()


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's package puts it."""
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(bindir, name), os.X_OK):
            return os.path.join(bindir, name)
    return None


class PostgresServer:
    """A private PostgreSQL cluster for tests (fsync off: a crash may lose it, by design)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            missing("PostgreSQL is not installed (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="vqe-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                missing("no `postgres` user to run PostgreSQL as (apt-get install postgresql)")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [*self.as_user, *args]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace") if self.started else ""
            raise AssertionError(f"{args[0]} failed: {done.stderr.decode(errors='replace')}{log}")

    started = False

    def start(self) -> PostgresServer:
        assert self.initdb and self.pg_ctl
        self._run(self.initdb, "-D", str(self.data), "-U", "vqe", "--auth=trust", "-E", "UTF8",
                  "--no-sync")  # fmt: skip
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self.started = True
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")  # fmt: skip
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://vqe@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        if self.started and self.pg_ctl:
            with contextlib.suppress(Exception):
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@contextlib.contextmanager
def serve_files(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_hls(source: Path, playlist: Path) -> Path:
    """Remux ``source``'s video into an HLS playlist (MPEG-TS segments) next to it."""
    with (
        av.open(str(source)) as inp,
        av.open(
            str(playlist),
            "w",
            format="hls",
            options={"hls_time": "0.2", "hls_list_size": "0", "hls_playlist_type": "vod"},
        ) as out,
    ):
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    return playlist


def missing(reason: str) -> None:
    """Skip for a missing system service; fail instead under ``.ci/run``
    (``CI_REQUIRE_SERVICES=1``), so CI cannot go green without running those tests."""
    if os.environ.get("CI_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + " (required by CI_REQUIRE_SERVICES=1)")
    pytest.skip(reason)
