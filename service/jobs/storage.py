"""Local storage of job inputs and results, addressed only by job id.

Layout under the storage root (a shared volume when there are many nodes)::

    tmp/<random>            uploads being received, sync requests in flight
    jobs/<job id>/input     the source as uploaded or fetched
    jobs/<job id>/result.<ext>
    jobs/<job id>/frames.json   per-frame QP / picture type / stages (the web page's plot)

No name from user input ever becomes part of a path: job ids are generated
here (32 hex digits) and checked on every use, temporary names are random,
and extensions come from a fixed set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_EXTENSIONS = (".mp4", ".mkv")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value))


class Storage:
    """Files of jobs under one root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.jobs_dir = self.root / "jobs"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    # -- per-job files -------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError("not a job id")
        return self.jobs_dir / job_id

    def input_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input"

    def result_path(self, job_id: str, ext: str = ".mp4") -> Path:
        if ext not in RESULT_EXTENSIONS:
            raise ValueError("unknown result extension")
        return self.job_dir(job_id) / f"result{ext}"

    def find_result(self, job_id: str) -> Path | None:
        for ext in RESULT_EXTENSIONS:
            path = self.result_path(job_id, ext)
            if path.is_file():
                return path
        return None

    def frames_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "frames.json"

    def write_frames(self, job_id: str, frames: list[dict[str, Any]]) -> None:
        """Store the per-frame log of a finished job (written whole, then renamed)."""
        dest = self.frames_path(job_id)
        part = dest.with_name(f".frames.{secrets.token_hex(4)}.part")
        part.write_text(json.dumps(frames, separators=(",", ":")))
        os.replace(part, dest)

    def read_frames(self, job_id: str) -> list[dict[str, Any]] | None:
        """The per-frame log, or None when there is none (an old or deleted job)."""
        try:
            data = json.loads(self.frames_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, list) else None

    def adopt_input(self, job_id: str, tmp: Path) -> Path:
        """Move a received temporary file to be the job's input."""
        dest = self.input_path(job_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    # -- temporary files -----------------------------------------------------

    def tmp_path(self, suffix: str = "") -> Path:
        if suffix not in ("", *RESULT_EXTENSIONS):
            raise ValueError("unknown temporary suffix")
        return self.tmp_dir / f"{secrets.token_hex(16)}{suffix}"

    def sweep_tmp(self, older_than: float = 86400.0) -> int:
        """Delete temporary files abandoned by crashed requests; returns how many."""
        cutoff = time.time() - older_than
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def writable(self) -> bool:
        probe = self.tmp_path()
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False
