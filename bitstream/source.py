"""Reading a remote source once: an HTTP(S) file is copied to a local spool in one request.

Enhancing a video reads its source more than once (the GOP scan, the decode,
the other streams' copy). For a local file that is free; for a URL it meant a
request each time, and a live stream cannot be read twice at all. So an
HTTP(S) URL whose server states a length (a file) is fetched once into a
temporary file that every pass then reads; a URL without a stated length, an
HLS playlist or a streaming protocol (RTMP, RTSP, SRT, UDP, TCP) is live and
is read in one pass, never spooled.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import PurePosixPath
from typing import IO
from urllib.parse import urlparse

from bitstream.types import UnsupportedInput

__all__ = ["fetch_once", "is_spoolable", "suffix_of"]

TIMEOUT_SECONDS = 30
CHUNK = 1 << 20
_HLS_TYPES = ("application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl")


def is_spoolable(source: object) -> bool:
    """An http(s) URL that is not an HLS playlist: a candidate for ``fetch_once``."""
    if not isinstance(source, str):
        return False
    url = urlparse(source)
    return url.scheme in ("http", "https") and not url.path.lower().endswith((".m3u8", ".m3u"))


def suffix_of(url: str) -> str:
    """The URL path's extension (kept on the spool, as demuxers may read it)."""
    suffix = PurePosixPath(urlparse(url).path).suffix
    return suffix if 0 < len(suffix) <= 6 and suffix[1:].isalnum() else ".bin"


def fetch_once(url: str, spool: IO[bytes]) -> bool:
    """Copy ``url`` into ``spool`` with one GET; False (nothing copied) when it is live.

    Live means the server states no length or answers with an HLS playlist. Raises
    UnsupportedInput with one line when the request fails.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "vqe"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310
    except urllib.error.HTTPError as exc:
        raise UnsupportedInput(f"cannot open {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnsupportedInput(f"cannot open {url}: {reason}") from None
    with response:
        kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if response.headers.get("Content-Length") is None or kind in _HLS_TYPES:
            return False
        try:
            shutil.copyfileobj(response, spool, length=CHUNK)
        except OSError as exc:
            raise UnsupportedInput(f"cannot read {url}: {exc}") from None
    spool.flush()
    return True
