"""Fetching a source: pinned HTTP downloads, HLS through a checked opener, live streams.

* Uploads are probed before a job is queued: the container must be one of
  :data:`ALLOWED_FORMATS` (no playlists, concat lists or device/network
  descriptions that would make FFmpeg open other files), with a video stream
  inside the configured resolution / duration / frame-count limits. The probe
  opens the file through a custom ``io_open`` that serves that one file and
  refuses every other name, so a crafted input cannot reach the filesystem.
* Source URLs: only http, https, rtmp, rtsp and HLS (``hls+http(s)://``, or a
  playlist behind an http(s) URL). The host is resolved and every address must
  be public (no loopback, private, link-local, CGNAT, multicast, reserved or
  cloud-metadata address) unless it is allowlisted (``VQE_URL_ALLOWLIST``).
  HTTP requests go to the address that was checked (pinned), redirects are
  re-checked hop by hop, and every playlist, segment and key an HLS stream
  names is fetched by :class:`SafeOpener` after the same check. FFmpeg's
  ``protocol_whitelist`` is always set, so ``file:``, ``concat:``,
  ``subfile:`` and friends cannot be smuggled in.

Errors are :class:`service.errors.UserError` subclasses carrying an HTTP status
and a stable ``code``; the API turns them into JSON.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import av
import httpx

from service.config import Limits
from service.errors import (
    InputTooLarge,
    NotAVideo,
    ServiceInputError,
    SourceUnavailable,
    URLNotAllowed,
    first_line,
)
from service.ingest.policy import CheckedURL, URLPolicy
from service.ingest.probe import (
    AVIO_FLAG_WRITE,
    ProbeReport,
    check_limits,
    looks_like_playlist,
    probe_file,
    video_facts,
)

# -- HTTP fetching ------------------------------------------------------------------


#: Protocols FFmpeg may use for each kind of remote source (``protocol_whitelist``).
PROTOCOLS = {"hls": "http,https,tcp,tls,crypto", "rtmp": "rtmp,tcp", "rtsp": "rtsp,rtp,tcp,udp"}
MAX_REDIRECTS = 5
TOTAL_TIMEOUT_FACTOR = 30  # a whole download may take this many VQE_URL_TIMEOUTs


class HTTPFetcher:
    """GET requests to checked URLs only: pinned address, checked redirects, bounded size."""

    def __init__(self, policy: URLPolicy, timeout: float) -> None:
        self.policy = policy
        self.timeout = timeout

    @contextmanager
    def open(self, url: str) -> Iterator[httpx.Response]:
        """A streaming response for ``url`` (http/https), after every redirect is checked."""
        deadline = time.monotonic() + self.timeout * TOTAL_TIMEOUT_FACTOR
        with httpx.Client(timeout=self.timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                checked = self.policy.check(url, kinds=("http",))
                target = httpx.URL(checked.pinned_url())
                parts = httpx.URL(checked.url)
                headers = {"Host": parts.netloc.decode("ascii"), "User-Agent": "vqe"}
                ext = {"sni_hostname": checked.host} if parts.scheme == "https" else {}
                request = client.build_request("GET", target, headers=headers, extensions=ext)
                try:
                    response = client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise SourceUnavailable(f"cannot fetch {checked.url}: {exc}") from None
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(checked.url, location)
                        continue
                    if response.status_code >= 400:
                        raise SourceUnavailable(
                            f"fetching {checked.url} failed: HTTP {response.status_code}"
                        )
                    response.deadline = deadline  # type: ignore[attr-defined]
                    yield response
                    return
                finally:
                    response.close()
            raise SourceUnavailable(f"more than {MAX_REDIRECTS} redirects")

    def download(self, url: str, write: Callable[[bytes], None]) -> None:
        """Stream the body of ``url`` into ``write`` (which enforces any size limit)."""
        with self.open(url) as response:
            try:
                for chunk in response.iter_bytes(1 << 16):
                    write(chunk)
                    if time.monotonic() > response.deadline:  # type: ignore[attr-defined]
                        limit = self.timeout * TOTAL_TIMEOUT_FACTOR
                        raise SourceUnavailable(f"fetching {url} took over {limit:g} s")
            except httpx.HTTPError as exc:
                raise SourceUnavailable(f"cannot fetch {url}: {exc}") from None

    def download_to(self, url: str, dest: Path, limit: int) -> int:
        """Download ``url`` to ``dest`` (at most ``limit`` bytes); returns the size."""
        writer = BoundedWriter(dest, limit)
        try:
            self.download(url, writer.write)
        except UploadTooLarge:
            raise InputTooLarge(f"the source is larger than the limit of {limit} bytes") from None
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return writer.size


class SafeOpener:
    """``io_open`` for PyAV: every file FFmpeg opens (HLS playlists, segments, keys)
    is fetched by :class:`HTTPFetcher` after the URL check; anything else is refused.

    The refusals are kept in ``refused`` so the caller can explain a failed open.
    """

    def __init__(self, fetcher: HTTPFetcher, budget: int, spool: int = 16 << 20) -> None:
        self.fetcher = fetcher
        self.budget = budget
        self.spool = spool
        self.refused: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, flags: int, options: dict[str, Any]) -> IO[bytes]:
        if flags & AVIO_FLAG_WRITE:
            self._refuse(f"{url}: writing is not allowed")
        for prefix in ("hls+",):
            if url.startswith(prefix):
                url = url[len(prefix) :]
        try:
            self.fetcher.policy.check(url, kinds=("http",))
        except ServiceInputError as exc:
            self._refuse(str(exc))
        buf = tempfile.SpooledTemporaryFile(max_size=self.spool)  # noqa: SIM115 - FFmpeg closes

        def write(chunk: bytes) -> None:
            with self._lock:
                self.budget -= len(chunk)
                if self.budget < 0:
                    self._refuse("the stream is larger than the size limit")
            buf.write(chunk)

        try:
            self.fetcher.download(url, write)
        except ServiceInputError as exc:
            buf.close()
            self._refuse(str(exc))
        buf.seek(0)
        return buf

    def _refuse(self, reason: str) -> None:
        self.refused.append(reason)
        raise PermissionError(reason)


@contextmanager
def open_remote(
    checked: CheckedURL, fetcher: HTTPFetcher, budget: int, timeout: float
) -> Iterator[Any]:
    """Open an HLS, RTMP or RTSP source with PyAV (always closed on exit)."""
    opener: SafeOpener | None = None
    kwargs: dict[str, Any] = {
        "options": {"protocol_whitelist": PROTOCOLS[checked.kind]},
        "timeout": timeout,
    }
    if checked.kind == "hls":
        opener = SafeOpener(fetcher, budget)
        kwargs.update(format="hls", io_open=opener)
        target = checked.url
    else:
        target = checked.pinned_url()
        if checked.kind == "rtsp":
            kwargs["options"]["rtsp_transport"] = "tcp"
    try:
        container = av.open(target, "r", **kwargs)
    except (av.FFmpegError, PermissionError, OSError) as exc:
        if opener is not None and opener.refused:
            reason = opener.refused[0]
            raise URLNotAllowed(f"the playlist refers to a refused URL: {reason}") from None
        raise NotAVideo(f"cannot open the stream: {first_line(exc)}") from None
    try:
        yield container
    finally:
        container.close()


def probe_stream(checked: CheckedURL, fetcher: HTTPFetcher, limits: Limits) -> ProbeReport:
    """Open a remote stream and check that it carries video within the limits."""
    with open_remote(checked, fetcher, limits.max_upload_bytes, fetcher.timeout) as container:
        report = video_facts(container)
    check_limits(report, limits)
    return report


def ingest_stream(
    checked: CheckedURL,
    fetcher: HTTPFetcher,
    dest: Path,
    limits: Limits,
    cancel: threading.Event | None = None,
) -> int:
    """Copy a remote stream's video (and audio) packets into a local Matroska file.

    Stops at the end of the stream, at ``limits.max_duration`` (live streams) or on
    ``cancel``. Returns the number of video packets written.
    """
    written = 0
    with (
        open_remote(checked, fetcher, limits.max_upload_bytes, fetcher.timeout) as src,
        av.open(str(dest), "w", format="matroska") as out,
    ):
        inputs = [src.streams.video[0], *src.streams.audio[:1]]
        mapping = {s.index: out.add_stream_from_template(s) for s in inputs}
        video = inputs[0]
        start = None
        try:
            for packet in src.demux(inputs):
                if cancel is not None and cancel.is_set():
                    break
                if packet.dts is None:
                    continue
                if packet.stream.index == video.index and packet.pts is not None:
                    t = float(packet.pts * video.time_base)
                    start = t if start is None else start
                    if t - start > limits.max_duration:
                        break
                    written += 1
                    if written > limits.max_frames:
                        break
                packet.stream = mapping[packet.stream.index]
                out.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            if written == 0:
                raise NotAVideo(f"cannot read the stream: {first_line(exc)}") from None
    if written == 0:
        raise NotAVideo("the stream carried no video")
    return written


@dataclass(frozen=True)
class FetchedSource:
    """A source URL after :func:`fetch_source`: either downloaded to a local file
    (``local``) or a stream (HLS, RTMP, RTSP) that a worker will ingest."""

    checked: CheckedURL
    report: ProbeReport
    local: bool
    size: int | None = None


def fetch_source(
    url: str, dest: Path, policy: URLPolicy, limits: Limits, timeout: float
) -> FetchedSource:
    """Check ``url`` and probe what it points at, before a job is queued.

    An http(s) URL of a media file is downloaded to ``dest`` (within
    ``limits.max_upload_bytes``) and probed like an upload; an HLS playlist
    (by scheme or by content), RTMP or RTSP source is opened and probed in place.
    """
    checked = policy.check(url)
    fetcher = HTTPFetcher(policy, timeout)
    if checked.kind == "http":
        size = fetcher.download_to(checked.url, dest, limits.max_upload_bytes)
        if not looks_like_playlist(dest):
            try:
                report = probe_file(dest)
                check_limits(report, limits)
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
            return FetchedSource(checked, report, local=True, size=size)
        dest.unlink(missing_ok=True)
        checked = replace(checked, kind="hls")
    return FetchedSource(checked, probe_stream(checked, fetcher, limits), local=False)


class UploadTooLarge(Exception):
    """More bytes arrived than the limit allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BoundedWriter:
    """Writes chunks to a file and raises :class:`UploadTooLarge` past ``limit`` bytes.

    The partial file is removed on any error, so a refused upload leaves nothing behind.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.abort()
            raise UploadTooLarge(self.limit)
        self._fh.write(chunk)

    def close(self) -> None:
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)
