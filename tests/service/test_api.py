"""The HTTP API on a real `vqe serve` (uvicorn, SQLite, in-process executor) on loopback.

Jobs run the real pipeline with ``stages=1`` on tiny clips. Source URLs are
served by a local ``http.server``, allowlisted by exact host:port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clips import make_audio_only, make_clip, noise_bytes
from tests.service_fixtures import (
    Api,
    ServiceProcess,
    count_frames,
    make_hls,
    module_server,
    serve_files,
)

MAX_UPLOAD = 300_000
SYNC_MAX_FRAMES = 12


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-clips")
    return {
        "small": make_clip(root / "small.mp4", size=(64, 48), frames=8),
        "mkv": make_clip(root / "other.mkv", size=(80, 64), frames=6, audio=True),
        "long": make_clip(root / "long.mp4", size=(64, 48), frames=SYNC_MAX_FRAMES + 8),
    }


@pytest.fixture(scope="module")
def file_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of a local http.server; files put in the folder are served."""
    root = tmp_path_factory.mktemp("served")
    with serve_files(root) as base:
        yield base, root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, file_server) -> Iterator[ServiceProcess]:
    base, _root = file_server
    allow = base.removeprefix("http://")
    env = {
        "VQE_URL_ALLOWLIST": allow,
        "VQE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "VQE_SYNC_MAX_BYTES": "100000",
        "VQE_SYNC_MAX_FRAMES": str(SYNC_MAX_FRAMES),
        "VQE_URL_TIMEOUT": "10",
    }
    yield from module_server(tmp_path_factory, "api-data", env)


@pytest.fixture(scope="module")
def api(server: ServiceProcess) -> Iterator[Api]:
    client = Api(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def finished_job(api: Api, clips: dict[str, Path], tmp_path_factory) -> dict:
    """One succeeded job whose result must survive every bad request below."""
    r = api.submit_file(clips["small"], stages=1)
    assert r.status_code == 202, r.text
    job = api.wait(r.json()["id"])
    assert job["status"] == "succeeded", job
    path = api.download(job["id"], tmp_path_factory.mktemp("kept") / "kept.mp4")
    return {"job": job, "bytes": path.read_bytes()}


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None):
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- the happy paths ------------------------------------------------------------------------


def test_health_and_docs(api: Api):
    assert api.http.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text
    checks = ready.json()["checks"]
    assert set(checks) == {"database", "storage", "disk", "queue"}, checks
    assert ready.json()["free_disk_bytes"] > 0
    spec = api.http.get("/openapi.json").json()
    assert {"/v1/enhance", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"} <= set(
        spec["paths"]
    )
    assert {"Job", "JobCreateRequest", "ErrorResponse"} <= set(spec["components"]["schemas"])
    assert api.http.get("/docs").status_code == 200


def test_upload_poll_download(api: Api, clips: dict[str, Path], tmp_path: Path):
    r = api.submit_file(clips["mkv"], stages=1, crf=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running")
    assert r.headers["location"] == job["links"]["self"] == f"/v1/jobs/{job['id']}"
    assert job["options"]["stages"] == 1 and job["options"]["crf"] == 30
    done = api.wait(job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["frames_done"] == 6 and done["attempts"] == 1
    assert done["stats"]["frames"] == 6 and done["stats"]["stages_histogram"] == {"1": 6}
    assert done["stats"]["side_info"] and done["expires_at"] and not done["expired"]
    result = api.download(job["id"], tmp_path / "out.mkv")
    assert count_frames(result) == 6


def test_result_supports_range(api: Api, finished_job: dict):
    job_id, data = finished_job["job"]["id"], finished_job["bytes"]
    r = api.http.get(f"/v1/jobs/{job_id}/result", headers={"Range": "bytes=10-99"})
    assert r.status_code == 206, r.text
    assert r.headers["content-range"] == f"bytes 10-99/{len(data)}"
    assert r.content == data[10:100]


def test_sync_enhance_streams_the_video_back(api: Api, clips: dict[str, Path], tmp_path: Path):
    with open(clips["small"], "rb") as fh:
        r = api.http.post("/v1/enhance", files={"file": ("a.mp4", fh)}, data={"stages": "1"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    out = tmp_path / "sync.mp4"
    out.write_bytes(r.content)
    assert count_frames(out) == 8


def test_sync_enhance_refuses_long_inputs_with_413(api: Api, clips: dict[str, Path]):
    with open(clips["long"], "rb") as fh:
        r = api.http.post("/v1/enhance", files={"file": ("long.mp4", fh)}, data={"stages": "1"})
    err = assert_error(r, 413, "input_too_large")
    assert "/v1/jobs" in err["message"]
    big = noise_bytes(150_000)
    r = api.http.post("/v1/enhance", files={"file": ("big.mp4", big)})
    assert "/v1/jobs" in assert_error(r, 413, "input_too_large")["message"]


def test_stream_url_job(api: Api, file_server, clips: dict[str, Path], tmp_path: Path):
    base, root = file_server
    (root / "clip.mp4").write_bytes(clips["small"].read_bytes())
    r = api.submit_url(f"{base}/clip.mp4", stages=1)
    assert r.status_code == 202, r.text
    assert r.json()["source"] == {
        "kind": "url",
        "filename": None,
        "url": f"{base}/clip.mp4",
        "bytes": clips["small"].stat().st_size,
    }
    done = api.wait(r.json()["id"])
    assert done["status"] == "succeeded", done
    assert count_frames(api.download(done["id"], tmp_path / "u.mp4")) == 8


def test_hls_playlist_job(api: Api, file_server, clips: dict[str, Path], tmp_path: Path):
    base, root = file_server
    hls = root / "hls"
    hls.mkdir()
    make_hls(clips["small"], hls / "index.m3u8")
    r = api.submit_url(f"{base}/hls/index.m3u8", stages=1)
    assert r.status_code == 202, r.text
    done = api.wait(r.json()["id"])
    assert done["status"] == "succeeded", done
    assert count_frames(api.download(done["id"], tmp_path / "h.mkv")) == 8


def test_idempotency_key_returns_the_original_job(api: Api, clips: dict[str, Path]):
    headers = {"Idempotency-Key": "test-key-1"}
    first = api.submit_file(clips["small"], headers=headers, stages=1)
    again = api.submit_file(clips["small"], headers=headers, stages=1)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    other = api.submit_file(clips["small"], headers={"Idempotency-Key": "test-key-2"}, stages=1)
    assert other.json()["id"] != first.json()["id"]
    for r in (first, other):
        assert api.wait(r.json()["id"])["status"] == "succeeded"


def test_list_paginates_and_filters(api: Api, finished_job: dict):
    seen: list[str] = []
    cursor = None
    for _ in range(50):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.http.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) and finished_job["job"]["id"] in seen
    everything = api.http.get("/v1/jobs", params={"limit": 200}).json()["items"]
    assert [j["id"] for j in everything] == seen  # newest first, same order
    ok = api.http.get("/v1/jobs", params={"status": "succeeded", "limit": 200}).json()["items"]
    assert ok and all(j["status"] == "succeeded" for j in ok)
    assert_error(api.http.get("/v1/jobs", params={"status": "bogus"}), 422, "invalid_request")
    assert_error(api.http.get("/v1/jobs", params={"cursor": "!!"}), 400, "invalid_cursor")


def test_delete_finished_job_removes_its_files(api: Api, clips: dict[str, Path]):
    r = api.submit_file(clips["small"], stages=1)
    job_id = r.json()["id"]
    assert api.wait(job_id)["status"] == "succeeded"
    d = api.http.delete(f"/v1/jobs/{job_id}")
    assert d.status_code == 200 and d.json()["deleted"] is True, d.text
    assert_error(api.http.get(f"/v1/jobs/{job_id}/result"), 410, "deleted")
    assert api.job(job_id)["status"] == "succeeded"


# -- bad requests: clean 4xx, nothing stored is touched ------------------------------------


def _bad_files(root: Path, clips: dict[str, Path]) -> dict[str, tuple[Path, int | tuple]]:
    small = clips["small"].read_bytes()
    files = {
        "empty": (b"", 415),
        "random": (noise_bytes(4000), 415),
        "text": (b"hello, this is not a video\n" * 50, 415),
        "truncated": (small[: len(small) // 2], (415, 422)),
        "oversized": (noise_bytes(MAX_UPLOAD + 1000), 413),
        "playlist": (b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n#EXT-X-ENDLIST\n", 415),
        "concat": (b"ffconcat version 1.0\nfile '/etc/passwd'\n", 415),
    }
    out = {}
    for name, (data, status) in files.items():
        path = root / f"{name}.mp4"
        path.write_bytes(data)
        out[name] = (path, status)
    out["audio-only"] = (make_audio_only(root / "audio.m4a"), 415)
    return out


def _stored(server: ServiceProcess) -> tuple[list[str], list[str]]:
    storage = server.data_dir / "storage"
    jobs = sorted(p.name for p in (storage / "jobs").iterdir())
    tmp = sorted(p.name for p in (storage / "tmp").iterdir())
    return jobs, tmp


def test_bad_uploads_get_clean_4xx_and_touch_nothing(
    api: Api, server: ServiceProcess, clips: dict[str, Path], finished_job: dict, tmp_path: Path
):
    before_jobs = api.http.get("/v1/jobs", params={"limit": 200}).json()["items"]
    before_files = _stored(server)
    for name, (path, status) in _bad_files(tmp_path, clips).items():
        for endpoint in ("/v1/jobs", "/v1/enhance"):
            with open(path, "rb") as fh:
                r = api.http.post(endpoint, files={"file": (path.name, fh)}, data={"stages": "1"})
            expected = 413 if name == "oversized" else status
            assert_error(r, expected)
            assert r.status_code < 500, (name, endpoint, r.text)
            # No server path (data dir, storage, tmp file) in any answer.
            message = r.json()["error"]["message"]
            assert str(server.data_dir) not in message and "/tmp" not in message, message
            assert "storage" not in message, message
    # Malformed requests of other kinds.
    assert_error(
        api.http.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415
    )
    assert_error(api.http.post("/v1/jobs", json=[1, 2]), 422)
    assert_error(
        api.http.post("/v1/jobs", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(api.http.post("/v1/jobs", json={"source_url": "http://x", "stages": 99}), 422)
    with open(clips["small"], "rb") as fh:
        r = api.http.post("/v1/jobs", files={"file": ("a.mp4", fh)}, data={"codec": "divx"})
    assert_error(r, 422, "invalid_options")
    # Every option outside what the writer and the loaded weights accept: 422 at submit,
    # never an accepted job that fails later (issue 13).
    for bad in (
        {"stages": 9},
        {"crf": 60},
        {"side_info": "magic"},
        {"codec": "divx"},
        {"preset": "warp"},
        {"codec": "ffv1", "crf": 20},
        {"quality": "high", "codec": "libx264"},
        {"quality": "best"},
    ):
        r = api.submit_file(clips["small"], **bad)
        assert_error(r, 422, "invalid_options")
        assert_error(api.submit_url("http://example.com/a.mp4", **bad), 422)
    with open(clips["small"], "rb") as fh:
        r = api.http.post("/v1/jobs", files={"upload": ("a.mp4", fh)})
    assert_error(r, 400)
    assert_error(api.http.get("/v1/jobs/../../etc/passwd"), 404)
    assert_error(api.http.get("/v1/jobs/not-a-job-id/result"), 404, "not_found")
    assert_error(api.http.delete("/v1/jobs/0123456789abcdef0123456789abcdef"), 404)
    assert_error(api.http.get("/nowhere"), 404, "not_found")
    # Nothing stored changed: same jobs, same files, no leftovers; the kept result is intact.
    after_jobs = api.http.get("/v1/jobs", params={"limit": 200}).json()["items"]
    assert [j["id"] for j in after_jobs] == [j["id"] for j in before_jobs]
    assert _stored(server) == before_files
    job_id = finished_job["job"]["id"]
    assert api.http.get(f"/v1/jobs/{job_id}/result").content == finished_job["bytes"]


def test_streamed_upload_over_the_limit_is_cut_off(api: Api, server: ServiceProcess):
    """Without a Content-Length the limit is enforced while the body streams to disk."""
    boundary = "vqeboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.mp4"\r\nContent-Type: video/mp4\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():  # chunked transfer encoding: the server cannot know the size up front
        yield head
        for _ in range(MAX_UPLOAD // 50_000 + 2):
            yield noise_bytes(50_000)
        yield tail

    before = _stored(server)
    r = api.http.post(
        "/v1/jobs",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(r, 413, "input_too_large")
    assert _stored(server) == before


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{other}/clip.mp4",
        "http://localhost:{other}/clip.mp4",
        "http://10.1.2.3/clip.mp4",
        "http://192.168.1.10:8080/clip.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{other}/clip.mp4",
        "http://[::ffff:127.0.0.1]/clip.mp4",
        "http://0x7f000001/clip.mp4",
        "rtsp://10.0.0.5/live",
        "file:///etc/passwd",
        "concat:/etc/passwd|/etc/hosts",
        "subfile:,,start,0,end,0,,:/etc/passwd",
        "gopher://example.com/",
        "{base}/file-playlist.m3u8",
        "{base}/metadata-playlist.m3u8",
        "{base}/loopback-playlist.m3u8",
        "not a url",
    ],
)
def test_refused_source_urls(api: Api, server: ServiceProcess, file_server, url: str):
    base, root = file_server
    (root / "file-playlist.m3u8").write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    )
    (root / "metadata-playlist.m3u8").write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
        "http://169.254.169.254/latest/seg.ts\n#EXT-X-ENDLIST\n"
    )
    other = int(base.rsplit(":", 1)[1]) + 1
    (root / "loopback-playlist.m3u8").write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
        f"http://127.0.0.1:{other}/seg.ts\n#EXT-X-ENDLIST\n"
    )
    before = _stored(server)
    r = api.submit_url(url.format(base=base, other=other), stages=1)
    assert_error(r, (415, 422))
    assert _stored(server) == before
