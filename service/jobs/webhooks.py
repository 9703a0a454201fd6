"""Webhooks: signed POSTs to a job's ``webhook_url`` when it ends (and, optionally, progresses).

A job submitted with ``webhook_url`` (and ``VQE_WEBHOOK_SECRET`` set) gets one
event per terminal state: ``job.succeeded``, ``job.failed`` or
``job.canceled``; with ``webhook_progress=true`` also ``job.progress`` each
time it passes 10 %. The URL passes the same SSRF checks as source URLs
(:class:`service.safety.URLPolicy`: public addresses only unless allowlisted
by ``VQE_URL_ALLOWLIST``), at submission and again, pinned to the checked
address, at every attempt; redirects are not followed.

Delivery. The event row is written by the job store in the same transaction
as the state change (an outbox), so whichever process ends the job (the API's
executor, a ``vqe worker``, or the API canceling a queued job) records it,
and a crash cannot lose it. Every API and worker process runs a
:class:`WebhookDispatcher` that leases due events, POSTs them and records the
outcome. Non-2xx answers and connection errors are retried with exponential
backoff (``VQE_WEBHOOK_MIN_BACKOFF`` doubling up to ``VQE_WEBHOOK_MAX_BACKOFF``)
until ``VQE_WEBHOOK_MAX_AGE`` after the event, then given up. Delivery is at
least once: a process dying mid-attempt means a resend after its lease
lapses, so receivers de-duplicate by event id (the same on every retry, as is
the body).

The request::

    POST <webhook_url>
    Content-Type: application/json
    Vqe-Webhook-Id: evt_3f9c...                 (the event id: de-duplicate on it)
    Vqe-Webhook-Timestamp: 1767225600           (Unix seconds of this attempt)
    Vqe-Webhook-Signature: v1=<hex HMAC-SHA256>

    {"id": "evt_3f9c...", "type": "job.succeeded", "created_at": "2026-...Z",
     "job_id": "...", "data": {"job": {...same as GET /v1/jobs/{id}...}}}

Verifying it (the receiver)::

    import hashlib, hmac, time

    def verify(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
        ts = headers["Vqe-Webhook-Timestamp"]
        signed = ts.encode() + b"." + body                      # the raw body bytes
        expected = "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(ts)) <= tolerance          # refuse replays
        return fresh and hmac.compare_digest(expected, headers["Vqe-Webhook-Signature"])

then answer 2xx quickly (any other answer is retried) and skip event ids seen before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from service.config import Settings
from service.errors import ServiceInputError, URLNotAllowed
from service.ingest.policy import URLPolicy
from service.jobs.database import utcnow
from service.jobs.outbox import WebhookOutbox
from service.jobs.store import JobStore
from service.jobs.tables import JobRow, WebhookEvent

log = logging.getLogger("vqe.webhooks")

POLL_SECONDS = 0.5  # how often a dispatcher looks for due events
SIGNATURE_VERSION = "v1"
USER_AGENT = "vqe-webhooks/1"

Render = Callable[[JobRow], dict[str, Any]]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``Vqe-Webhook-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0
) -> bool:
    """The receiver's check (also used by the tests)."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def check_url(url: str | None, policy: URLPolicy, settings: Settings) -> str | None:
    """Validate a job's ``webhook_url`` at submission (422 when refused)."""
    if url is None:
        return None
    if not settings.webhook_secret:
        raise ServiceInputError(
            "webhooks are off on this server (VQE_WEBHOOK_SECRET is unset)",
            code="webhooks_disabled",
        )
    try:
        policy.check(url, kinds=("http",))
    except URLNotAllowed as exc:
        raise URLNotAllowed(f"webhook_url: {exc}") from None
    except ServiceInputError as exc:  # cannot resolve
        raise URLNotAllowed(f"webhook_url: {exc}", code="webhook_url_not_allowed") from None
    return url


class WebhookDispatcher:
    """Sends due webhook events from the store; one thread per process."""

    def __init__(
        self,
        jobs: JobStore,
        outbox: WebhookOutbox,
        settings: Settings,
        policy: URLPolicy,
        render: Render,
    ) -> None:
        self.jobs = jobs
        self.outbox = outbox
        self.settings = settings
        self.policy = policy
        self.render = render
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.lease = settings.webhook_timeout + 30.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqe-webhooks", daemon=True)

    def start(self) -> None:
        if self.settings.webhook_secret:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.settings.webhook_timeout + 5)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the database may be down: try again later
                log.warning("webhook dispatch failed", exc_info=True)
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def run_once(self) -> int:
        """Attempt every due event once; returns how many were attempted."""
        events = self.outbox.claim(self.owner, self.lease)
        for event in events:
            if self._stop.is_set():
                break
            self._attempt(event)
        return len(events)

    def _attempt(self, event: WebhookEvent) -> None:
        body = event.body or self.outbox.set_body(event.id, self._body(event))
        error: str | None = None
        try:
            status = self._post(event, body.encode())
            if 200 <= status < 300:
                self.outbox.attempted(event.id, self.owner, delivered=True)
                log.info(
                    "webhook %s (%s) delivered",
                    event.id,
                    event.type,
                    extra={"job_id": event.job_id},
                )
                return
            error = f"HTTP {status}"
        except (httpx.HTTPError, ServiceInputError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        delay = min(
            self.settings.webhook_min_backoff * 2**event.attempts, self.settings.webhook_max_backoff
        )
        retry_at = utcnow() + timedelta(seconds=delay)
        give_up = retry_at > event.created_at + timedelta(seconds=self.settings.webhook_max_age)
        self.outbox.attempted(
            event.id,
            self.owner,
            delivered=False,
            error=error,
            retry_at=None if give_up else retry_at,
        )
        log.warning(
            "webhook %s (%s) attempt %d failed: %s%s",
            event.id,
            event.type,
            event.attempts + 1,
            error,
            "; giving up" if give_up else "",
            extra={"job_id": event.job_id},
        )

    def _body(self, event: WebhookEvent) -> str:
        row = self.jobs.get(event.job_id)
        payload = {
            "id": event.id,
            "type": event.type,
            "created_at": event.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "job_id": event.job_id,
            "data": {"job": self.render(row) if row is not None else None},
        }
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)

    def _post(self, event: WebhookEvent, body: bytes) -> int:
        """One attempt, to the address the URL policy checked (no DNS rebinding, no
        redirects); returns the HTTP status."""
        checked = self.policy.check(event.url, kinds=("http",))
        timestamp = str(int(time.time()))
        parts = httpx.URL(checked.url)
        headers = {
            "Host": parts.netloc.decode("ascii"),
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Vqe-Webhook-Id": event.id,
            "Vqe-Webhook-Timestamp": timestamp,
            "Vqe-Webhook-Signature": sign(self.settings.webhook_secret, timestamp, body),
        }
        ext = {"sni_hostname": checked.host} if parts.scheme == "https" else {}
        with httpx.Client(
            timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False
        ) as client:
            request = client.build_request(
                "POST", checked.pinned_url(), headers=headers, content=body, extensions=ext
            )
            return client.send(request).status_code
