"""The web page at ``/`` in a real headless browser (Debian's chromium driven by Playwright).

A real ``vqe serve`` runs on loopback; the page gets a tiny clip dropped on it,
submits the job, follows it to the end and shows the comparison, the per-frame
plot and the side-information pictures. The server is started with an API key:
when the build enforces keys the page must ask for one (401) and then work with it.
Skipped only when Playwright or a chromium binary is missing; no browser is downloaded.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clips import make_clip
from tests.service_fixtures import Api, ServiceProcess, missing, module_server

API_KEY = "web-page-test-key"
IMAGES = ("img-before", "img-after", "img-mv", "img-partitions", "img-qp")
JOB_TIMEOUT_MS = 120_000
SUBMIT_TIMEOUT_MS = 90_000  # upload + probe; slow on a loaded 2-core machine
UI_TIMEOUT_MS = 30_000

DROP_FILES = """(items) => {
  const transfer = new DataTransfer();
  for (const [name, data] of items) {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], name, { type: "video/mp4" }));
  }
  const zone = document.getElementById("drop");
  for (const type of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true,
                                             cancelable: true }));
  }
}"""

IMAGES_LOADED = """(ids) => ids.every((id) => {
  const img = document.getElementById(id);
  return img.complete && img.naturalWidth > 0 && img.src.startsWith("blob:");
})"""

CANVAS_INK = """() => {
  const canvas = document.getElementById("plot");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] < 200 || data[i + 1] < 200 || data[i + 2] < 200) ink++;
  }
  return { ink, width: canvas.width, height: canvas.height };
}"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    if path is None:
        missing("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system chromium's path; skips (before any server starts) without it or Playwright."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed")
    return _chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {"VQE_API_KEYS": API_KEY}
    yield from module_server(tmp_path_factory, "web-data", env)


def _artifact_dirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    if os.environ.get("VQE_TEST_ARTIFACTS"):
        extra = Path(os.environ["VQE_TEST_ARTIFACTS"])
        extra.mkdir(parents=True, exist_ok=True)
        dirs.append(extra)
    return dirs


def test_page_upload_progress_and_comparison(
    chromium: str, server: ServiceProcess, tmp_path: Path
) -> None:
    from playwright import sync_api

    clip = make_clip(tmp_path / "web.mp4", size=(128, 96), frames=6)
    keys_enforced = httpx.get(f"{server.url}/v1/jobs", timeout=10).status_code == 401

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/")
            assert page.title().startswith("vqe")

            if keys_enforced:  # the page meets a 401 and asks for the key
                page.wait_for_selector("#auth:not([hidden])", timeout=UI_TIMEOUT_MS)
                page.fill("#api-key", API_KEY)
                page.click("#auth-form button[type=submit]")
                page.wait_for_selector("#auth", state="hidden", timeout=5_000)
                assert page.evaluate("localStorage.getItem('vqe-api-key')") == API_KEY

            data = base64.b64encode(clip.read_bytes()).decode()
            page.evaluate(DROP_FILES, [["web.mp4", data]])
            assert "web.mp4" in page.text_content("#file-name")
            page.select_option("#opt-stages", "1")
            page.click("#submit-button")

            page.wait_for_selector("#job:not([hidden])", timeout=SUBMIT_TIMEOUT_MS)
            job_id = page.text_content("#job-id")
            assert job_id and len(job_id) == 32, job_id
            page.wait_for_function(
                "() => ['succeeded', 'failed', 'canceled'].includes("
                "document.getElementById('job-status').textContent)",
                timeout=JOB_TIMEOUT_MS,
            )
            status = page.text_content("#job-status")
            assert status == "succeeded", (status, page.text_content("#job-error"))
            assert "100%" in page.text_content("#progress-text")

            page.wait_for_function(IMAGES_LOADED, arg=list(IMAGES), timeout=30_000)
            sizes = page.evaluate(
                "(ids) => ids.map((id) => document.getElementById(id).naturalWidth)", list(IMAGES)
            )
            assert sizes == [128] * len(IMAGES), sizes
            ink = page.evaluate(CANVAS_INK)
            assert ink["width"] > 0 and ink["ink"] > 50, ink

            # Another frame: the slider moves the previews, the plot marks it.
            page.evaluate(
                "() => { const s = document.getElementById('frame');"
                " s.value = '3'; s.dispatchEvent(new Event('input')); }"
            )
            page.wait_for_function(IMAGES_LOADED, arg=list(IMAGES), timeout=30_000)
            assert page.text_content("#frame-label").startswith("4 / 6")

            # The split follows the pointer over the comparison.
            box = page.locator("#compare").bounding_box()
            assert box is not None and box["width"] > 0
            page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.up()
            clip_path = page.evaluate("document.getElementById('img-before').style.clipPath")
            assert "inset(0px 7" in clip_path or "inset(0 7" in clip_path, clip_path

            # The recent-jobs list shows the job.
            page.wait_for_selector(f"#jobs-body tr[data-id='{job_id}']", timeout=UI_TIMEOUT_MS)
            row = page.text_content(f"#jobs-body tr[data-id='{job_id}']")
            assert "web.mp4" in row and "succeeded" in row, row

            # The download button hands over the result (through the key when there is one).
            with page.expect_download(timeout=30_000) as download:
                page.click("#download")
            saved = download.value.path()
            assert saved is not None and Path(saved).stat().st_size > 0

            for folder in _artifact_dirs(tmp_path):
                page.screenshot(path=str(folder / "web-page.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def _launch(pw, chromium: str):
    return pw.chromium.launch(
        executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
    )


def _give_key(page, server: ServiceProcess) -> None:
    """Answer the page's API-key prompt when the server enforces keys."""
    if httpx.get(f"{server.url}/v1/jobs", timeout=10).status_code == 401:
        page.wait_for_selector("#auth:not([hidden])", timeout=UI_TIMEOUT_MS)
        page.fill("#api-key", API_KEY)
        page.click("#auth-form button[type=submit]")
        page.wait_for_selector("#auth", state="hidden", timeout=5_000)


def test_page_batch_of_several_files(chromium: str, server: ServiceProcess, tmp_path: Path) -> None:
    """Three files dropped at once (one corrupt) make one batch; the page follows it to the
    end and shows each file's status, progress, error and download."""
    from playwright import sync_api

    good = [make_clip(tmp_path / f"b{n}.mp4", size=(64, 48), frames=n) for n in (3, 5)]
    items = [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in good]
    items.insert(1, ["broken.mp4", base64.b64encode(random.Random(7).randbytes(2000)).decode()])

    with sync_api.sync_playwright() as pw:
        browser = _launch(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/")
            _give_key(page, server)

            page.evaluate(DROP_FILES, items)
            names = page.text_content("#file-name")
            assert "3 files" in names and "broken.mp4" in names, names
            page.select_option("#opt-stages", "1")
            page.click("#submit-button")

            page.wait_for_selector("#batch:not([hidden])", timeout=SUBMIT_TIMEOUT_MS)
            batch_id = page.text_content("#batch-id")
            assert batch_id and len(batch_id) == 32, batch_id
            assert page.locator("#job").is_hidden()  # a batch, not a single job
            page.wait_for_function(
                "() => !['queued', 'running', ''].includes("
                "document.getElementById('batch-status').textContent)",
                timeout=JOB_TIMEOUT_MS,
            )
            assert page.text_content("#batch-status") == "partial"
            assert "100%" in page.text_content("#batch-text")
            assert page.locator("#batch-cancel").is_hidden()

            rows = page.locator("#batch-body tr")
            assert rows.count() == 3
            names = [rows.nth(i).locator("td.name").text_content() for i in range(3)]
            assert names == ["b3.mp4", "broken.mp4", "b5.mp4"], names
            statuses = [rows.nth(i).get_attribute("data-status") for i in range(3)]
            assert statuses == ["succeeded", "failed", "succeeded"], statuses
            failed = rows.nth(1).locator("td.error").text_content()
            assert "not a video" in failed and "unsupported_input" in failed, failed
            for i, frames in ((0, 3), (2, 5)):
                row = rows.nth(i)
                assert f"{frames} / {frames}" in row.text_content(), row.text_content()
                assert "100%" in row.locator("td.progress").text_content()

            # Each result downloads (through the key when there is one).
            for i in (0, 2):
                with page.expect_download(timeout=30_000) as download:
                    rows.nth(i).locator("button.download").click()
                saved = download.value.path()
                assert saved is not None and Path(saved).stat().st_size > 0

            # "compare" opens that job in the job card.
            job_id = rows.nth(2).get_attribute("data-id")
            rows.nth(2).locator("button.details").click()
            page.wait_for_selector("#job:not([hidden])", timeout=UI_TIMEOUT_MS)
            assert page.text_content("#job-id") == job_id
            page.wait_for_function(
                "() => document.getElementById('job-status').textContent === 'succeeded'",
                timeout=30_000,
            )

            for folder in _artifact_dirs(tmp_path):
                page.screenshot(path=str(folder / "web-page-batch.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_frames_and_preview_routes(server: ServiceProcess, tmp_path: Path) -> None:
    """The page's API routes: per-frame log, PNG previews, clean JSON errors, 410 after DELETE."""
    clip = make_clip(tmp_path / "routes.mp4", size=(64, 48), frames=6)
    api = Api(server.url)
    api.http.headers["Authorization"] = f"Bearer {API_KEY}"
    try:
        r = api.submit_file(clip, stages=1)
        assert r.status_code == 202, r.text
        job = api.wait(r.json()["id"])
        assert job["status"] == "succeeded", job
        base = f"/v1/jobs/{job['id']}"

        frames = api.http.get(f"{base}/frames").json()
        assert frames["count"] == 6 and frames["input_available"] is True, frames
        assert [f["index"] for f in frames["frames"]] == list(range(6))
        assert frames["frames"][0]["pict_type"] == "I"
        assert all(f["stages"] == 1 and f["qp"] is not None for f in frames["frames"])

        for kind in frames["preview_kinds"]:
            png = api.http.get(f"{base}/preview/{kind}.png", params={"frame": 5})
            assert png.status_code == 200, (kind, png.text)
            assert png.headers["content-type"] == "image/png"
            assert png.content.startswith(b"\x89PNG") and len(png.content) > 100

        bad = {
            f"{base}/preview/secret.png": (422, "invalid_request"),
            f"{base}/preview/after.png?frame=6": (404, "frame_not_found"),
            f"{base}/preview/after.png?frame=-1": (422, "invalid_request"),
            f"{base}/preview/after.png?frame=x": (422, "invalid_request"),
            "/v1/jobs/not-a-job/frames": (404, "not_found"),
            "/v1/jobs/0123456789abcdef0123456789abcdef/preview/qp.png": (404, "not_found"),
        }
        for url, (status, code) in bad.items():
            resp = api.http.get(url)
            assert resp.status_code == status, (url, resp.text)
            assert resp.json()["error"]["code"] == code, (url, resp.text)

        spec = api.http.get("/openapi.json").json()
        assert {"/v1/jobs/{job_id}/frames", "/v1/jobs/{job_id}/preview/{kind}.png"} <= set(
            spec["paths"]
        )
        assert "JobFrames" in spec["components"]["schemas"]

        assert api.http.delete(base).status_code == 200
        for url in (f"{base}/frames", f"{base}/preview/before.png?frame=0"):
            resp = api.http.get(url)
            assert resp.status_code == 410 and resp.json()["error"]["code"] == "deleted"
    finally:
        api.close()


def test_the_quality_selector_offers_every_quality():
    """The page's quality choices are the options model's (``high`` included)."""
    import re

    from enhancer.options import QUALITIES

    page = (Path(__file__).resolve().parents[2] / "service/api/static/index.html").read_text()
    select = re.search(r'<select id="opt-quality">(.*?)</select>', page, re.S)
    assert select is not None
    assert set(re.findall(r'<option value="([^"]+)"', select.group(1))) == set(QUALITIES)
