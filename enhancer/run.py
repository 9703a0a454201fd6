"""The three stages of one run, at once, with bounded queues between them, so memory does
not grow with the video's length::

    decode thread --(QUEUE_FRAMES)--> engine (calling thread) --(QUEUE_FRAMES)--> encode thread

* The decode thread owns the :class:`~bitstream.reader.VideoReader`; the encode thread
  owns the :class:`~bitstream.writer.VideoWriter`; the model runs in the calling thread
  (progress callbacks come from it too).
* An error in any stage stops the others and is raised once, from :func:`stream_frames`;
  setting the ``cancel`` event raises :class:`Cancelled`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bitstream.errors import UserError
from bitstream.reader import VideoReader
from bitstream.types import SequenceInfo
from bitstream.writer import VideoWriter
from enhancer.options import EnhanceOptions
from enhancer.protocols import FrameEngine
from enhancer.result import FrameStats

__all__ = ["QUEUE_FRAMES", "Cancelled", "Progress", "Run", "progress", "stream_frames"]

QUEUE_FRAMES = 8  # frames in flight between two stages (each way)
POLL_SECONDS = 0.1  # how often a blocked stage looks at the stop/cancel flags
PHASES = ("probing", "enhancing", "encoding")


class Cancelled(Exception):
    """The run was cancelled through its ``cancel`` event."""


@dataclass
class Progress:
    phase: str  # "probing" | "enhancing" | "encoding"
    frames_done: int
    frames_total: int | None
    fps: float
    eta_seconds: float | None


def progress(phase: str, done: int, total: int | None, started: float) -> Progress:
    elapsed = time.monotonic() - started
    fps = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / fps if total and fps > 0 and total >= done else None
    return Progress(phase, done, total, round(fps, 2), None if eta is None else round(eta, 1))


class _Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


_END = object()  # end-of-stream marker on the queues


class Run:
    """Shared state of one run: the first error, the stop flag, the user's cancel."""

    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and not isinstance(exc, _Stop):
                self.error = exc
        self.stop.set()

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.fail(Cancelled("cancelled"))
        if self.stop.is_set():
            raise _Stop

    def put(self, q: queue.Queue, item: object) -> None:
        while True:
            self.check()
            try:
                q.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> Any:
        while True:
            self.check()
            try:
                return q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def drain(self, q: queue.Queue) -> Iterator[Any]:
        """Items of ``q`` up to the end marker."""
        while (item := self.get(q)) is not _END:
            yield item

    def thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                self.fail(exc)

        worker = threading.Thread(target=body, name=f"vqe-{name}", daemon=True)
        worker.start()
        return worker

    def join(self, worker: threading.Thread) -> None:
        """Wait for ``worker``, still honouring cancel while it runs."""
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if self.cancel is not None and self.cancel.is_set():
                self.fail(Cancelled("cancelled"))


def stream_frames(
    reader: VideoReader,
    writer: VideoWriter,
    engine: FrameEngine,
    info: SequenceInfo,
    options: EnhanceOptions,
    notify: Callable[[Progress], None],
    run: Run,
    started: float,
) -> FrameStats:
    """Decode, enhance and encode every frame (up to ``options.max_frames``) -> the stats.

    Frames that the engine enhances inside a GOP the writer's plan copies as untouched
    are counted and said in a warning (those GOPs are copied as they were).
    """
    decoded: queue.Queue = queue.Queue(QUEUE_FRAMES)
    enhanced: queue.Queue = queue.Queue(QUEUE_FRAMES)
    limit = options.max_frames
    truncated = threading.Event()

    def decode() -> None:
        try:
            for i, frame in enumerate(reader):
                if limit is not None and i >= limit:
                    truncated.set()
                    break
                run.put(decoded, frame)
            run.put(decoded, _END)
        finally:
            reader.close()

    def encode() -> None:
        for frame in run.drain(enhanced):
            writer.write(frame)
        writer.close(truncated=truncated.is_set())

    total = info.frames if limit is None else min(info.frames or limit, limit)
    stats = FrameStats()
    copied = writer.plan.copy
    scan = writer.plan.splice if writer.plan.copies else None  # GOPs copied as untouched
    workers = [run.thread("decode", decode), run.thread("encode", encode)]
    try:
        frames = run.drain(decoded)
        for frame, report in engine.process(frames, info, options.stages, options.side_info):
            stats.add(frame, report)
            if scan is not None and report.stages and copied[scan.segment_of(frame.pts)]:
                stats.mismatch += 1
            run.put(enhanced, frame)
            notify(progress("enhancing", stats.frames, total, started))
        run.put(enhanced, _END)
        notify(progress("encoding", stats.frames, total, started))
        for worker in workers:
            run.join(worker)
        run.check()
    except BaseException as exc:
        run.fail(exc)
        for worker in workers:
            worker.join()
        raise run.error or exc from None
    if stats.frames == 0:
        raise UserError("no frame was enhanced")
    if stats.mismatch:
        writer.warnings.append(
            f"{stats.mismatch} frame(s) were enhanced in GOPs that plan_stages said were "
            "untouched; those GOPs were copied as they were"
        )
    return stats
