"""PNG previews of one frame of a finished job, for the web page.

``before`` is frame N of the job's stored input as decoded, ``after`` frame N of
the stored result, and ``mv`` / ``partitions`` / ``qp`` the side-information
pictures that ``vqe inspect --png`` draws (:mod:`bitstream.visualize`) over the
input frame. Files are found by job id only (:class:`service.storage.Storage`);
nothing from the request becomes a path.

Frames are decoded from the start of the file up to N (no seeking: exact, and
cheap for the short clips people look at). One decode of the input renders its
four pictures at once; renders are kept in a small in-memory cache, and at most
:data:`MAX_RENDERS` run at a time so previews cannot starve the job workers.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from PIL import Image

from bitstream.reader import open_video
from bitstream.types import BitstreamError, DecodedFrame
from bitstream.visualize import draw_motion_vectors, draw_partitions, draw_qp_heatmap, frame_image
from service.errors import ApiError

MAX_RENDERS = 2
CACHE_BYTES = 64 << 20


class PreviewKind(StrEnum):
    before = "before"
    after = "after"
    mv = "mv"
    partitions = "partitions"
    qp = "qp"


INPUT_PICTURES: dict[PreviewKind, Callable[[DecodedFrame], Image.Image]] = {
    PreviewKind.before: frame_image,
    PreviewKind.mv: draw_motion_vectors,
    PreviewKind.partitions: draw_partitions,
    PreviewKind.qp: draw_qp_heatmap,
}


class PreviewError(ApiError):
    """A preview cannot be made: ``status`` and ``code`` for the API's error answer."""


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render(path: Path, frame: int, kinds: tuple[PreviewKind, ...]) -> dict[PreviewKind, bytes]:
    """Decode ``path`` up to display-order frame ``frame`` and draw ``kinds`` of it."""
    side_info = any(k in (PreviewKind.mv, PreviewKind.partitions, PreviewKind.qp) for k in kinds)
    try:
        with open_video(path, side_info=side_info) as reader:
            for decoded in reader:
                if decoded.index == frame:
                    draw = {k: INPUT_PICTURES.get(k, frame_image) for k in kinds}
                    return {k: _png(fn(decoded).convert("RGB")) for k, fn in draw.items()}
    except BitstreamError as exc:
        raise PreviewError(422, "preview_failed", f"cannot decode the video: {exc}") from None
    raise PreviewError(404, "frame_not_found", f"the video has no frame {frame}")


class PreviewCache:
    """Renders previews and keeps the latest ones (up to ``max_bytes`` of PNG) in memory."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_renders: int = MAX_RENDERS) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, PreviewKind], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, int, str], threading.Lock] = {}
        self._renders = threading.BoundedSemaphore(max_renders)

    def get(
        self, job_id: str, frame: int, kind: PreviewKind, input_path: Path, result_path: Path
    ) -> bytes:
        """The PNG of ``kind`` for frame ``frame`` (blocking; call from a worker thread)."""
        cached = self._lookup((job_id, frame, kind))
        if cached is not None:
            return cached
        source = "result" if kind is PreviewKind.after else "input"
        key_lock = self._key_lock((job_id, frame, source))
        with key_lock:  # one decode per (job, frame, file), however many requests ask
            cached = self._lookup((job_id, frame, kind))
            if cached is not None:
                return cached
            if source == "result":
                path, kinds = result_path, (PreviewKind.after,)
            else:
                path, kinds = input_path, tuple(INPUT_PICTURES)
            if not path.is_file():
                raise PreviewError(410, "input_gone", f"the job's {source} file is not stored")
            try:
                with self._renders:
                    rendered = _render(path, frame, kinds)
            finally:
                with self._lock:
                    self._key_locks.pop((job_id, frame, source), None)
            for k, data in rendered.items():
                self._store((job_id, frame, k), data)
        return rendered[kind]

    def _key_lock(self, key: tuple[str, int, str]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _lookup(self, key: tuple[str, int, PreviewKind]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def _store(self, key: tuple[str, int, PreviewKind], data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return  # a huge frame: render again next time rather than evict everything
        with self._lock:
            old = self._items.pop(key, None)
            self._size += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)
