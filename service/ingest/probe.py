"""Probing an input before it is accepted: allowed containers, a video stream, limits.

The probe opens the file through a custom ``io_open`` that serves that one file and
refuses every other name, so a crafted input cannot reach the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import av

from service.config import Limits
from service.errors import InputTooLarge, NotAVideo, ServiceInputError, first_line

#: Container formats accepted as input (FFmpeg demuxer names). Deliberately excludes
#: hls, concat, image2, sdp, rtsp, tee, dash and anything else that opens other files.
ALLOWED_FORMATS = frozenset(
    {
        "mov",
        "mp4",
        "m4a",
        "3gp",
        "3g2",
        "mj2",
        "matroska",
        "webm",
        "avi",
        "mpegts",
        "mpeg",
        "flv",
        "h264",
        "hevc",
        "ivf",
        "obu",
        "av1",
        "asf",
        "nut",
        "mxf",
        "ogg",
        "yuv4mpegpipe",
        "m4v",
        "mpegvideo",
        "dv",
        "vc1",
    }
)
PLAYLIST_MAGIC = b"#EXTM3U"
AVIO_FLAG_WRITE = 2


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


def video_facts(container: Any) -> ProbeReport:
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
                raise NotAVideo(f"not a video we accept: it reads as {container.format.name!r}")
            return video_facts(container)
    except ServiceInputError:
        raise
    except (av.FFmpegError, PermissionError, OSError, ValueError) as exc:
        if opener.refused or isinstance(exc, PermissionError):
            raise NotAVideo(
                "the input refers to other files (a playlist or list); upload the video itself"
            ) from None
        if isinstance(exc, av.InvalidDataError):
            raise NotAVideo(f"not a video file we can read: {first_line(exc)}") from None
        raise ServiceInputError(
            f"the input could not be read (truncated or corrupt?): {first_line(exc)}",
            code="corrupt_input",
        ) from None


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
