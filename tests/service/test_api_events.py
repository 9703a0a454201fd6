"""Server-sent events of a job across a restart of `vqe serve`.

The stream is read from the job store, so a client that reconnects with
``Last-Event-ID`` to the restarted server continues where it was. Stopping the
server (SIGTERM) ends open streams at once instead of holding the graceful
shutdown, and hands the running job back to the queue. Jobs are slowed with
``TEST_FRAME_DELAY`` (see ``tests/slow_service.py``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from service.api.routes.events import parse_stream
from tests.clips import make_clip
from tests.service_fixtures import Api, ServiceProcess, wait_for

FRAMES = 10
ENV = {
    "TEST_FRAME_DELAY": "0.4",
    "VQE_JOB_LEASE": "5",
    "VQE_EVENTS_POLL": "0.2",
    "VQE_QUEUE_URL": "",
    "VQE_API_KEYS": "",
}


class StreamReader:
    """Reads ``GET /v1/jobs/{id}/events`` on a thread until the server closes it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.status: int | None = None
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError:
            pass
        finally:
            self.closed.set()

    def messages(self) -> list[dict[str, Any]]:
        return parse_stream([*self.lines, ""])


def test_events_continue_across_a_server_restart(tmp_path: Path):
    clip = make_clip(tmp_path / "slow.mp4", size=(64, 48), frames=FRAMES)
    data = tmp_path / "data"
    first = ServiceProcess("serve", data, ENV).start()
    try:
        api = Api(first.url)
        job_id = api.submit_file(clip, stages=1).json()["id"]
        stream = StreamReader(f"{first.url}/v1/jobs/{job_id}/events")

        def enhancing() -> bool:
            return any(m["data"]["frames_done"] >= 2 for m in stream.messages())

        wait_for(enhancing, 120, 0.2, what="progress events")
        assert stream.status == 200 and not stream.closed.is_set()
        began = time.monotonic()
        assert first.stop(25) in (0, -15)
        assert time.monotonic() - began < 15  # the open stream did not hold the shutdown
        assert stream.closed.wait(5)
        api.close()
    finally:
        first.stop()
    before = stream.messages()
    assert before[0]["event"] == "status" and before[-1]["data"]["status"] == "running"
    assert {m["event"] for m in before} <= {"status", "progress"}
    assert "interrupted by shutdown; queued again" in first.log(tail=None)

    with ServiceProcess("serve", data, ENV) as second:
        last_id = before[-1]["id"]
        resumed = StreamReader(f"{second.url}/v1/jobs/{job_id}/events", {"Last-Event-ID": last_id})
        assert resumed.closed.wait(180), "the stream did not end with the job"
        after = resumed.messages()
        assert after, resumed.lines
        ids = [int(m["id"]) for m in before + after]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # continues, no repeats
        assert after[-1]["event"] == "done" and [m["event"] for m in after].count("done") == 1
        final = after[-1]["data"]
        assert final["status"] == "succeeded" and final["attempts"] == 2, final
        assert final["frames_done"] == FRAMES
        # Having the final event, a client reconnecting is told to stop (204).
        r = httpx.get(
            f"{second.url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": after[-1]["id"]}
        )
        assert r.status_code == 204
        # A fresh client of the finished job gets the final event at once.
        fresh = parse_stream(
            httpx.get(f"{second.url}/v1/jobs/{job_id}/events").text.splitlines() + [""]
        )
        assert [m["event"] for m in fresh] == ["done"]
        assert httpx.get(f"{second.url}/v1/jobs/{'0' * 32}/events").status_code == 404
