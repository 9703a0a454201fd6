"""The progress line of ``vqe enhance`` on a terminal: phase, frames, fps, ETA (one video),
and the same after the batch's count and the current file (several videos)."""

from __future__ import annotations

import time
from typing import TextIO

from enhancer.pipeline import Progress

REDRAW_SECONDS = 0.2


class ProgressLine:
    """Redraws one status line on a terminal: phase, frames, fps, ETA."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.prefix = ""  # what comes before the progress (a batch's current file)
        self._last = 0.0
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        final = progress.phase == "encoding"
        if not final and now - self._last < REDRAW_SECONDS:
            return
        self._last = now
        self.stream.write("\r" + self.prefix + self.render(progress) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    @staticmethod
    def render(p: Progress) -> str:
        if p.phase == "probing":
            return "probing the input..."
        if p.frames_total:
            done = min(p.frames_done / p.frames_total, 1.0)
            bar = "#" * int(done * 20)
            count = f"[{bar:<20}] {p.frames_done}/{p.frames_total}"
        else:
            count = f"{p.frames_done}"
        eta = "" if p.eta_seconds is None else f"  ETA {_clock(p.eta_seconds)}"
        return f"{p.phase:9s} {count} frames  {p.fps:.1f} fps{eta}"

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
