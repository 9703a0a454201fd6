"""Media helpers for the enhance tests: tag a clip, add subtitles, read back what a file holds.

Clips themselves come from :func:`tests.clips.make_clip`; :func:`retag` remuxes
one (packets untouched) adding stream/container metadata, a sample aspect
ratio and a subtitle track, which ``make_clip`` does not write.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

SUBTITLE_CODEC = {".mkv": "subrip", ".mp4": "mov_text", ".mov": "mov_text"}


def retag(
    src: str | Path,
    dst: str | Path,
    *,
    stream_metadata: dict[int, dict[str, str]] | None = None,
    container_metadata: dict[str, str] | None = None,
    subtitles: list[str] | None = None,
    sample_aspect_ratio: Fraction | None = None,
    attachment: tuple[str, str, bytes] | None = None,
) -> Path:
    """Copy ``src`` to ``dst`` packet for packet, adding metadata and subtitle cues.

    ``subtitles`` become one cue each (200 ms apart, 150 ms long) on a text
    track in the format ``dst``'s container takes (subrip / mov_text).
    ``sample_aspect_ratio`` is written on the video stream (container level).
    ``attachment`` is (file name, MIME type, payload), Matroska only. A
    ``timecode`` tag on the video stream makes the MOV/MP4 muxer add a tmcd
    data track.
    """
    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        copies = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for index, tags in (stream_metadata or {}).items():
            copies[index].metadata.update(tags)
        out.metadata.update(container_metadata or {})
        if sample_aspect_ratio is not None:
            copies[
                inp.streams.video[0].index
            ].codec_context.sample_aspect_ratio = sample_aspect_ratio
        if attachment is not None:
            out.add_attachment(*attachment)
        track = None
        if subtitles:
            track = out.add_mux_stream(SUBTITLE_CODEC[dst.suffix.lower()])
            track.time_base = Fraction(1, 1000)
        for packet in inp.demux():
            if packet.size:
                packet.stream = copies[packet.stream.index]
                out.mux_one(packet)
        for i, text in enumerate(subtitles or []):
            data = text.encode()
            if SUBTITLE_CODEC[dst.suffix.lower()] == "mov_text":  # 16-bit length prefix
                data = len(data).to_bytes(2, "big") + data
            cue = av.Packet(data)
            cue.stream = track
            cue.time_base = Fraction(1, 1000)
            cue.pts = cue.dts = 200 * i
            cue.duration = 150
            out.mux_one(cue)
    return dst


@dataclass
class Packet:
    seconds: Fraction | None  # pts in seconds
    data: bytes
    keyframe: bool


def packets(path: str | Path, kind: str) -> list[list[Packet]]:
    """Payload packets of every stream of ``kind`` ("audio", "subtitle"...), per stream."""
    with av.open(str(path)) as c:
        streams = [s for s in c.streams if s.type == kind]
        out: dict[int, list[Packet]] = {s.index: [] for s in streams}
        if streams:
            for p in c.demux(*streams):
                if p.size:
                    seconds = None if p.pts is None else p.pts * p.time_base
                    out[p.stream.index].append(Packet(seconds, bytes(p), p.is_keyframe))
        return list(out.values())


@dataclass
class VideoSummary:
    codec: str
    width: int
    height: int
    pix_fmt: str
    frames: int
    times: list[Fraction]  # pts of each decoded frame, in seconds, display order
    rotation: float
    colour: tuple[Any, ...]  # primaries, transfer, matrix, range of the decoded frames
    sample_aspect_ratio: Fraction | None
    metadata: dict[str, str]
    first_luma: np.ndarray


def video_summary(path: str | Path) -> VideoSummary:
    """What a player sees of the first video stream."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        first = frames[0]
        y = first.planes[0]
        dtype = np.uint16 if "10" in first.format.name else np.uint8
        row = y.line_size // np.dtype(dtype).itemsize
        luma = np.frombuffer(y, dtype, count=row * y.height).reshape(y.height, row)[:, : y.width]
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        return VideoSummary(
            codec=stream.codec_context.name,
            width=first.width,
            height=first.height,
            pix_fmt=first.format.name,
            frames=len(frames),
            times=[f.pts * f.time_base for f in frames],
            rotation=float(first.rotation or 0),
            colour=(first.color_primaries, first.color_trc, first.colorspace, first.color_range),
            sample_aspect_ratio=sar,
            metadata={k.lower(): v for k, v in stream.metadata.items()},
            first_luma=luma.copy(),
        )


def container_metadata(path: str | Path) -> dict[str, str]:
    with av.open(str(path)) as c:
        return {k.lower(): v for k, v in c.metadata.items()}


class OneStage:
    """The real engine, run at one stage where a job says ``auto``: the tests' speed.

    A job that asks for a stage count gets it; everything else is the engine's.
    """

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def process(self, frames, info, stages="auto", side_info="auto"):
        return self.engine.process(frames, info, 1 if stages == "auto" else stages, side_info)

    def plan_stages(self, side, info, stages="auto", side_info="auto"):
        return self.engine.plan_stages(side, info, 1 if stages == "auto" else stages, side_info)


@functools.cache
def fast_engine():
    """The real engine in its fastest setting (one stage, CPU), built once per session."""
    from enhancer.engine import Engine

    return OneStage(Engine(device="cpu"))


@contextlib.contextmanager
def serve_folder(folder: str | Path, requests: Counter | None = None) -> Iterator[str]:
    """A local HTTP server over ``folder`` -> its base URL; ``requests`` counts GETs by path."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler's API
            if requests is not None:
                requests[self.path] += 1
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Handler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
