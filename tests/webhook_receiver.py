"""A webhook receiver for the tests: a real HTTP server on loopback that records every
POST and answers the status codes it is told to (then 200), like a flaky endpoint."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    fail_first: list[int] = field(default_factory=list)  # statuses to answer before 200s
    calls: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> list[Received]:
        """The calls answered 2xx (the first ``len(fail_first)`` were refused)."""
        with self.lock:
            return self.calls[self._refused :]

    _refused: int = 0


@contextlib.contextmanager
def run_receiver(fail_first: list[int] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(url="", fail_first=list(fail_first or []))
    receiver._refused = len(receiver.fail_first)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.calls.append(Received(dict(self.headers.items()), body))
                status = receiver.fail_first.pop(0) if receiver.fail_first else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
