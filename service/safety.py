"""Guarding the service's inputs: upload limits, media probing, and source URLs.

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

import ipaddress
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import av
import httpx

from service.config import Limits
from service.errors import UserError
from service.storage import BoundedWriter, UploadTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Container formats accepted as input (FFmpeg demuxer names). Deliberately excludes
#: hls, concat, image2, sdp, rtsp, tee, dash and anything else that opens other files.
ALLOWED_FORMATS = frozenset(
    {
        "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts",
        "mpeg", "flv", "h264", "hevc", "ivf", "obu", "av1", "asf", "nut", "mxf", "ogg",
        "yuv4mpegpipe", "m4v", "mpegvideo", "dv", "vc1",
    }
)  # fmt: skip

#: URL schemes accepted for sources and what fetches them.
SCHEMES = {
    "http": "http",
    "https": "http",
    "hls": "hls",  # alias of hls+https
    "hls+http": "hls",
    "hls+https": "hls",
    "rtmp": "rtmp",
    "rtsp": "rtsp",
}
DEFAULT_PORTS = {"http": 80, "https": 443, "hls": 443, "hls+http": 80, "hls+https": 443,
                 "rtmp": 1935, "rtsp": 554}  # fmt: skip
#: Protocols FFmpeg may use for each kind of remote source (``protocol_whitelist``).
PROTOCOLS = {"hls": "http,https,tcp,tls,crypto", "rtmp": "rtmp,tcp", "rtsp": "rtsp,rtp,tcp,udp"}

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
MAX_REDIRECTS = 5
TOTAL_TIMEOUT_FACTOR = 30  # a whole download may take this many VQE_URL_TIMEOUTs
PLAYLIST_MAGIC = b"#EXTM3U"
AVIO_FLAG_WRITE = 2


class ServiceInputError(UserError):
    """A refused input; ``status`` and ``code`` become the HTTP answer."""

    status = 422
    code = "invalid_input"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotAVideo(ServiceInputError):
    status, code = 415, "unsupported_input"


class InputTooLarge(ServiceInputError):
    status, code = 413, "input_too_large"


class URLNotAllowed(ServiceInputError):
    status, code = 422, "url_not_allowed"


class SourceUnavailable(ServiceInputError):
    status, code = 422, "source_unavailable"


# -- URL policy ----------------------------------------------------------------


@dataclass(frozen=True)
class _AllowEntry:
    host: str | None  # a host name (lowercase), or None for a network entry
    network: IPNetwork | None
    port: int | None

    def matches_host(self, host: str, port: int) -> bool:
        return self.host is not None and self.host == host and self.port in (None, port)

    def matches_address(self, address: IPAddress, port: int) -> bool:
        return (
            self.network is not None and address in self.network and self.port in (None, port)
        )


def _parse_allow_entry(entry: str) -> _AllowEntry:
    entry = entry.strip().lower()
    host, port = entry, None
    if entry.startswith("["):  # [v6]:port or [v6]
        inside, _, rest = entry[1:].partition("]")
        host, port = inside, (int(rest[1:]) if rest.startswith(":") else None)
    elif entry.count(":") == 1:  # host:port or v4:port
        host, _, p = entry.partition(":")
        port = int(p)
    try:
        return _AllowEntry(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        return _AllowEntry(host.rstrip("."), None, port)


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be fetched from, or None if it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a unicast address"
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class CheckedURL:
    """A source URL that passed :meth:`URLPolicy.check`, with the address to connect to."""

    url: str  # as FFmpeg / httpx should see it (hls+ prefix removed)
    kind: str  # "http" | "hls" | "rtmp" | "rtsp"
    host: str
    port: int
    address: IPAddress

    def pinned_url(self) -> str:
        """``url`` with the host replaced by the checked address (no second DNS lookup)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        netloc = f"{host}:{parts.port}" if parts.port else host
        if "@" in parts.netloc:
            netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
        return parts._replace(netloc=netloc).geturl()


Resolver = Callable[[str, int], list[IPAddress]]


def resolve_host(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise SourceUnavailable(f"cannot resolve host {host!r}: {exc}") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


class URLPolicy:
    """Which source URLs the service may fetch from."""

    def __init__(self, allowlist: Sequence[str] = (), resolver: Resolver = resolve_host) -> None:
        self.allow = [_parse_allow_entry(e) for e in allowlist if e.strip()]
        self.resolver = resolver

    def check(self, url: str, kinds: Sequence[str] = tuple(set(SCHEMES.values()))) -> CheckedURL:
        """Validate ``url``; raise :class:`URLNotAllowed` with the reason otherwise."""
        if not isinstance(url, str) or not url or len(url) > 4096:
            raise URLNotAllowed("source_url must be a non-empty URL")
        if any(ord(c) < 0x21 or c == "\x7f" for c in url):
            raise URLNotAllowed("source_url contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise URLNotAllowed(f"malformed URL: {exc}") from None
        scheme = parts.scheme.lower()
        kind = SCHEMES.get(scheme)
        if kind is None or kind not in kinds:
            allowed = ", ".join(sorted({s for s, k in SCHEMES.items() if k in kinds}))
            raise URLNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed; use {allowed}")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise URLNotAllowed("URL has no host")
        port = port or DEFAULT_PORTS[scheme]
        plain = url
        if scheme.startswith("hls"):
            inner = "http" if scheme == "hls+http" else "https"
            plain = inner + url[len(scheme) :]
        if any(e.matches_host(host, port) for e in self.allow):
            addresses = self._literal_or_resolve(host, port)
            return CheckedURL(plain, kind, host, port, addresses[0])
        addresses = self._literal_or_resolve(host, port)
        for address in addresses:
            if any(e.matches_address(address, port) for e in self.allow):
                continue
            reason = refusal_reason(address)
            if reason is not None:
                raise URLNotAllowed(
                    f"host {host!r} resolves to {address}, {reason}; such sources are refused"
                )
        return CheckedURL(plain, kind, host, port, addresses[0])

    def _literal_or_resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        addresses = self.resolver(host, port)
        if not addresses:
            raise SourceUnavailable(f"host {host!r} has no address")
        return addresses


# -- HTTP fetching ------------------------------------------------------------------


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
            raise InputTooLarge(
                f"the source is larger than the limit of {limit} bytes"
            ) from None
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


class _OneFileOpener:
    """``io_open`` that serves exactly one local file and refuses every other name."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.refused: list[str] = []

    def __call__(self, url: str, flags: int, options: dict[str, Any]) -> IO[bytes]:
        if url != self.path or flags & AVIO_FLAG_WRITE:
            self.refused.append(url)
            raise PermissionError(f"{url}: the input may not refer to other files")
        return open(self.path, "rb")  # noqa: SIM115 - FFmpeg closes it


# -- probing ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeReport:
    """What the service learned about an input before accepting it."""

    format_name: str
    codec: str
    width: int
    height: int
    duration: float | None  # seconds
    frames: int | None  # known or estimated from duration x rate

    @property
    def result_ext(self) -> str:
        """Container for the result: MP4 for MP4-family inputs, Matroska otherwise."""
        return ".mp4" if self.format_name.split(",")[0] in ("mov", "mp4") else ".mkv"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _video_facts(container: Any) -> ProbeReport:
    fmt = container.format.name
    if not container.streams.video:
        raise NotAVideo("the input has no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width <= 0 or height <= 0:
        raise NotAVideo("the video stream has no picture size (not decodable)")
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    frames = int(stream.frames) if stream.frames else None
    rate = stream.average_rate or stream.guessed_rate
    if frames is None and duration is not None and rate:
        frames = int(round(duration * float(rate)))
    codec = ctx.name or "unknown"
    return ProbeReport(fmt, codec, width, height, duration, frames)


def probe_file(path: Path) -> ProbeReport:
    """Open an uploaded or downloaded file safely and describe its video stream."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        raise NotAVideo("the input is empty")
    opener = _OneFileOpener(path)
    try:
        with av.open(
            str(path), "r", io_open=opener, options={"protocol_whitelist": "file"}
        ) as container:
            names = set(container.format.name.split(","))
            if not names & ALLOWED_FORMATS:
                raise NotAVideo(f"container format {container.format.name!r} is not accepted")
            return _video_facts(container)
    except ServiceInputError:
        raise
    except (av.FFmpegError, PermissionError, OSError, ValueError) as exc:
        if opener.refused or isinstance(exc, PermissionError):
            raise NotAVideo("the input refers to other files (a playlist or list); "
                            "upload the video itself") from None
        if isinstance(exc, av.InvalidDataError):
            raise NotAVideo(f"not a video file we can read: {_first_line(exc)}") from None
        raise ServiceInputError(
            f"the input could not be read (truncated or corrupt?): {_first_line(exc)}",
            code="corrupt_input",
        ) from None


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
        raise NotAVideo(f"cannot open the stream: {_first_line(exc)}") from None
    try:
        yield container
    finally:
        container.close()


def check_limits(report: ProbeReport, limits: Limits, *, sync: bool = False) -> None:
    """Refuse inputs over the resolution / duration / frame-count limits (413)."""
    hint = " Submit it as a batch job: POST /v1/jobs." if sync else ""
    if report.width > limits.max_width or report.height > limits.max_height:
        raise InputTooLarge(
            f"{report.width}x{report.height} exceeds the limit of "
            f"{limits.max_width}x{limits.max_height}"
        )
    max_duration = limits.sync_max_seconds if sync else limits.max_duration
    if report.duration is not None and report.duration > max_duration:
        raise InputTooLarge(
            f"the video lasts {report.duration:.1f} s, over the limit of {max_duration:g} s.{hint}"
        )
    max_frames = limits.sync_max_frames if sync else limits.max_frames
    if report.frames is not None and report.frames > max_frames:
        raise InputTooLarge(
            f"the video has {report.frames} frames, over the limit of {max_frames}.{hint}"
        )


def looks_like_playlist(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(PLAYLIST_MAGIC)


def probe_stream(checked: CheckedURL, fetcher: HTTPFetcher, limits: Limits) -> ProbeReport:
    """Open a remote stream and check that it carries video within the limits."""
    with open_remote(checked, fetcher, limits.max_upload_bytes, fetcher.timeout) as container:
        report = _video_facts(container)
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
                raise NotAVideo(f"cannot read the stream: {_first_line(exc)}") from None
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
