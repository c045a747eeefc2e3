"""The gateway's outer ASGI layer: authenticate, rate-limit and bound a request before any of its body is read.

Order per request: the key (401/403) -> rate limit (429) -> cross-site and media type checks (403/415) ->
the declared size (413) -> the app, whose body reads are counted (413 once over the cap, for chunked bodies).
It also records the request metrics, labelled by route template (never the raw path).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from serving.auth import Keyring, Principal, RateLimiter, Scope
from serving.exceptions import BadRequest, RateLimited, ServingError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

PRINCIPAL = "taoflow.principal"  # scope key the endpoints read the caller from
DASHBOARD_MAX_BYTES = 4096  # the login form is one field


def error_response(exc: ServingError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """OpenAI's error shape: (status, headers, body)."""
    body = orjson.dumps({"error": {"message": str(exc), "type": exc.type, "param": None, "code": exc.code}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, RateLimited):
        headers.append((b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode()))
    return exc.status, headers, body


def scope_of(path: str) -> Scope | None:
    """Which key an endpoint needs; None: the endpoint checks by itself (dashboard cookie) or is public."""
    if path == "/healthz" or path == "/dashboard" or path.startswith("/dashboard/"):
        return None
    if path == "/metrics":
        return "metrics"
    if path.startswith("/admin/") or path == "/admin":
        return "admin"
    return "user"  # /v1/* and anything unknown: an unknown path answers 404 only to a caller with a key


class Guard:
    """Wraps the FastAPI app; see the module docstring."""

    def __init__(self, app: ASGIApp, gateway: Any) -> None:
        self.app = app
        self.gw = gateway
        self.keys: Keyring = gateway.keys
        self.limiter = RateLimiter(gateway.cfg.rate_limit_per_s, gateway.cfg.rate_limit_burst)
        self.max_bytes: int = gateway.cfg.max_request_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            cap = self._admit(scope)
        except ServingError as exc:
            code, headers, body = error_response(exc)
            await observed({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            try:
                await self.app(scope, self._counted(receive, cap), observed)
            finally:
                self._observe(scope, status[0], t0)
            return
        self._observe(scope, status[0], t0)

    def _observe(self, scope: MutableMapping[str, Any], status: int, t0: float) -> None:
        route = scope.get("route")  # set by the router on a match: the template, e.g. /admin/adapters/{name}/rollback
        endpoint = getattr(route, "path", None) or "other"
        self.gw.metrics.requests.labels(endpoint, str(status)).inc()
        self.gw.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _admit(self, scope: MutableMapping[str, Any]) -> int:
        """Check everything the headers can tell; returns the body size cap. Raises ServingError."""
        path: str = scope["path"]
        need = scope_of(path)
        headers = dict(scope["headers"])  # ASGI lower-cases names; a repeated header keeps its last value
        if need is not None:
            principal: Principal = self.keys.identify(headers.get(b"authorization"), need)
            scope[PRINCIPAL] = principal
            if principal.key is not None and not principal.admin and need == "user":
                self.limiter.take(principal.key)
            if self.keys.open and headers.get(b"sec-fetch-site") == b"cross-site":
                # no keys: a page on another site must not drive the gateway through the user's browser
                raise BadRequest("cross-site requests are refused", status=403, code="cross_site")
        if scope["method"] == "POST" and path.startswith("/v1/"):
            ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if ctype != b"application/json":
                # forms and text/plain are what a web page can post without a CORS preflight
                raise BadRequest(
                    f"Content-Type must be application/json, not {ctype.decode('latin-1')[:60] or 'missing'}",
                    status=415,
                    code="unsupported_media_type",
                )
        cap = DASHBOARD_MAX_BYTES if need is None else self.max_bytes
        size = headers.get(b"content-length")
        if size is not None:
            if not size.isdigit():
                raise BadRequest("Content-Length is not a number", code="invalid_request")
            if int(size) > cap:
                msg = f"request body of {int(size)} bytes exceeds the limit of {cap}"
                raise BadRequest(msg, status=413, code="request_too_large")
        return cap

    @staticmethod
    def _counted(receive: Receive, cap: int) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BadRequest(
                        f"request body exceeds the limit of {cap} bytes", status=413, code="request_too_large"
                    )
            return message

        return counted
