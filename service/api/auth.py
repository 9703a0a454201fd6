"""API keys: ``VQE_API_KEYS`` turns on bearer-token authentication for ``/v1``.

With keys configured, every request under ``/v1`` must carry
``Authorization: Bearer <key>`` (else 401 with the usual JSON error and
``WWW-Authenticate: Bearer``). The key is compared in constant time
(:func:`hmac.compare_digest` on SHA-256 digests, every configured key tried)
and never logged or stored: a job records only the key's *id*, the first 16
hex digits of its SHA-256. A key sees only its own jobs; another key's job
answers 404 (and is left out of listings), so job ids reveal nothing. Jobs made
while keys were off have no owner: they are hidden from every key but the admin
keys (``VQE_ADMIN_KEYS``), which see, cancel and delete them as well as their own.

``/metrics`` then needs ``VQE_METRICS_TOKEN`` as bearer token, an admin key, or a
client address in ``VQE_METRICS_ALLOWLIST``. Health routes, ``/docs``,
``/openapi.json``, the web page and its static files stay open. With no keys
configured nothing changes.

The key id of the current request lives in a context variable, so the
handlers (and the threads they hand work to) reach it without new arguments:
:func:`owner` is the filter to apply (None: no filter), :func:`scoped` turns an
``Idempotency-Key`` into one private to the key.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from service.api.schemas import ErrorResponse

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

PROTECTED_PREFIX = "/v1"
METRICS_PATH = "/metrics"
_OPEN = object()  # the context value when authentication is off
_owner: contextvars.ContextVar[object] = contextvars.ContextVar("vqe_key_id", default=_OPEN)
_admin: contextvars.ContextVar[bool] = contextvars.ContextVar("vqe_admin", default=False)


def key_id(key: str) -> str:
    """The stored id of an API key (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def owner() -> str | None:
    """The key id whose jobs the current request may see; None when keys are off."""
    value = _owner.get()
    return None if value is _OPEN else str(value)


def is_admin() -> bool:
    """The current request carries an admin key (sees the jobs that have no owner)."""
    return _admin.get()


def may_see(job_owner: str | None) -> bool:
    value = _owner.get()
    if value is _OPEN:
        return True
    if job_owner is None:
        return _admin.get()
    return job_owner == value


def scoped(idempotency_key: str | None) -> str | None:
    """An ``Idempotency-Key`` private to the current key (two clients may use the same)."""
    mine = owner()
    if not idempotency_key or mine is None:
        return idempotency_key
    return f"{mine}:{idempotency_key}"[:255]


class KeyRing:
    """The configured keys as SHA-256 digests, matched in constant time."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = [
            (hashlib.sha256(k.encode()).digest(), key_id(k)) for k in dict.fromkeys(keys)
        ]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, presented: str) -> str | None:
        """The id of the key ``presented`` is, or None. Tries every key (no early exit)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate, kid in self._digests:
            if hmac.compare_digest(digest, candidate):
                found = kid
        return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthMiddleware:
    """ASGI middleware: checks the bearer key of ``/v1`` requests (and ``/metrics``) and
    records its id."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        admins: KeyRing,
        metrics_token: KeyRing,
        metrics_allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
    ) -> None:
        self.app = app
        self.keys = keys
        self.admins = admins
        self.metrics_token = metrics_token
        self.metrics_allowlist = metrics_allowlist

    def _metrics_allowed(self, scope: Scope, token: str | None) -> bool:
        if token is not None and (self.metrics_token.match(token) or self.admins.match(token)):
            return True
        client = (scope.get("client") or ("", 0))[0]
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in net for net in self.metrics_allowlist)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        protected = path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
        if scope["type"] == "http" and path == METRICS_PATH:
            token = bearer_token(scope.get("headers", []))
            if self._metrics_allowed(scope, token):
                await self.app(scope, receive, send)
            else:
                await _unauthorized(
                    send, "/metrics needs VQE_METRICS_TOKEN (or an admin key) as bearer token"
                )
            return
        if scope["type"] != "http" or not protected:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        kid = self.keys.match(token) if token is not None else None
        admin = token is not None and self.admins.match(token) is not None
        if kid is None:
            message = (
                "missing API key: send `Authorization: Bearer <key>`"
                if token is None
                else "the API key is not valid"
            )
            await _unauthorized(send, message)
            return
        reset, reset_admin = _owner.set(kid), _admin.set(admin)
        try:
            await self.app(scope, receive, send)
        finally:
            _owner.reset(reset)
            _admin.reset(reset_admin)


async def _unauthorized(send: Any, message: str) -> None:
    body = (
        ErrorResponse.model_validate({"error": {"code": "unauthorized", "message": message}})
        .model_dump_json()
        .encode()
    )
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="vqe"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``VQE_METRICS_ALLOWLIST``: IPs or CIDRs (``ValueError`` for anything else)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def install(
    app: FastAPI,
    api_keys: tuple[str, ...],
    admin_keys: tuple[str, ...] = (),
    metrics_token: str = "",
    metrics_allowlist: tuple[str, ...] = (),
) -> None:
    """Require keys on ``/v1`` (and guard ``/metrics``) when keys are configured; document
    it in OpenAPI. Admin keys are keys too."""
    keys = KeyRing(api_keys + admin_keys)
    if not keys:
        return
    app.add_middleware(
        AuthMiddleware,
        keys=keys,
        admins=KeyRing(admin_keys),
        metrics_token=KeyRing((metrics_token,) if metrics_token else ()),
        metrics_allowlist=networks(metrics_allowlist),
    )
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default()
            components = spec.setdefault("components", {})
            components.setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the keys in `VQE_API_KEYS` (or `VQE_ADMIN_KEYS`).",
            }
            unauthorized = {
                "description": "Missing or unknown API key.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                },
            }
            for path, ops in spec.get("paths", {}).items():
                if not path.startswith(PROTECTED_PREFIX + "/"):
                    continue
                for op in ops.values():
                    op["security"] = [{"apiKey": []}]
                    op.setdefault("responses", {})["401"] = unauthorized
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
