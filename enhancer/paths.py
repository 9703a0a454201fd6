"""Where a run reads and writes: the source as a path every pass can open, the checked
OUTPUT, and the hidden temporary name the output is written under.

The output is written to ``.<name>.<random>.part`` next to OUTPUT and renamed over it
only when complete (the pipeline does the rename): a failed or cancelled run never
leaves a partial file and never clobbers an existing OUTPUT. ``-`` is stdout.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bitstream.errors import UserError
from bitstream.source import fetch_once, is_spoolable, suffix_of
from bitstream.writer import STDOUT

__all__ = ["Source", "check_output", "size_ratio", "spooled", "temporary_name"]

Source = str | Path | IO[bytes]


def check_output(source: Source, output: str | Path) -> Path | None:
    """The final output path (None for stdout), after checks that need no decoding.

    The container (OUTPUT's extension) is checked by the caller, with ``output_format``.
    """
    if str(output) == STDOUT:
        return None
    path = Path(output)
    if path.is_dir():
        raise UserError(f"output is a directory: {path}")
    if not path.parent.is_dir():
        raise UserError(f"output folder does not exist: {path.parent}")
    if isinstance(source, str | Path) and path.exists():
        with contextlib.suppress(OSError):
            if path.samefile(source):
                raise UserError("OUTPUT must not be the INPUT file")
    return path


def temporary_name(output: Path) -> Path:
    return output.with_name(f".{output.name}.{secrets.token_hex(4)}.part")


def size_ratio(source: str, final: Path | None) -> float | None:
    """Output size / input size, where both are files."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        if final is not None and Path(source).is_file():
            return round(final.stat().st_size / Path(source).stat().st_size, 3)
    return None


@contextlib.contextmanager
def spooled(source: Source) -> Iterator[str]:
    """A path or URL for ``source`` that every pass of the run can open.

    The writer opens the source again to copy its other streams, and the GOP plan
    scans it: a one-pass file object (an upload, a pipe) is copied to a temporary
    file first, and so is an HTTP(S) file, in one request (bitstream.source). A live
    URL is passed on as it is, and the run reads it in one pass (see ``enhancer.plan``).
    """
    if isinstance(source, str | Path) and not is_spoolable(source):
        yield str(source)
        return
    suffix = suffix_of(source) if isinstance(source, str) else ".bin"
    with tempfile.NamedTemporaryFile(prefix="vqe-input-", suffix=suffix) as spool:
        if isinstance(source, str):
            if not fetch_once(source, spool):
                yield source  # live: nothing was copied
                return
        else:
            shutil.copyfileobj(source, spool, length=1 << 20)
            spool.flush()
        yield spool.name
