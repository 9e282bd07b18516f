"""What browsers need from us: security headers on every response (`SecurityHeaders`, added by
RequestContextMiddleware's single `send` wrapper), and CORS for an allow-list of exact origins (a
pure-ASGI middleware).

CORS here never allows credentials (cookies): callers authenticate with an Authorization header,
so there is no ambient credential a foreign page could ride on, and no wildcard is ever sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.errors import Forbidden
from liveness_proxy.middleware import request_id_of, send_problem

# An API answers JSON only: nothing of ours should ever be rendered, framed or sniffed as HTML.
_BASE_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
CORS_ALLOWED_METHODS = ("GET", "POST")
# traceparent and tracestate: a browser's OpenTelemetry SDK starts the trace (W3C Trace Context);
# whether the proxy continues it is tracing/server.py's decision, and a tracestate is never passed on.
CORS_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "idempotency-key",
        "x-api-key",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
CORS_EXPOSED_HEADERS = (
    "X-Request-ID, Retry-After, Location, WWW-Authenticate, Idempotent-Replayed, X-Liveness-Result-Source"
)
CORS_MAX_AGE_SECONDS = "600"


class SecurityHeaders:
    """The security headers of every HTTP response: the fixed set, `Cache-Control: no-store` where
    the app did not choose a caching policy itself, and HSTS when the request came over TLS."""

    def __init__(self, *, hsts_max_age_seconds: int) -> None:
        self._hsts = (
            f"max-age={hsts_max_age_seconds}; includeSubDomains".encode() if hsts_max_age_seconds else None
        )

    def add_to(self, headers: list[tuple[bytes, bytes]], scope: Scope) -> None:
        """Appends them to a response's raw header list."""
        has_cache_control = any(name.lower() == b"cache-control" for name, _ in headers)
        headers.extend(_BASE_SECURITY_HEADERS)
        if not has_cache_control:
            headers.append((b"cache-control", b"no-store"))
        if self._hsts is not None and scope.get("scheme") == "https":
            headers.append((b"strict-transport-security", self._hsts))


class CorsMiddleware:
    """CORS for exact origins. A preflight from an allowed origin for an allowed method and headers
    gets 204; any other preflight gets a 403 problem. Actual requests from allowed origins get the
    Allow-Origin header; others get none (the browser then withholds the answer).

    Why not Starlette's CORSMiddleware (compared with 1.10): a product rule, every refusal is
    problem+json with the request id. Starlette refuses with a `400 text/plain` built in
    `preflight_response`, which sees the request headers but not the scope (no request id), so a
    subclass would override `__call__` and the whole preflight, inheriting only the ~15 lines that
    decorate actual answers. It would also allow the CORS-safelisted Accept, Accept-Language and
    Content-Language beyond the five documented headers, and send Expose-Headers to foreign origins.
    """

    def __init__(self, app: ASGIApp, *, origins: Iterable[str]) -> None:
        self.app = app
        self._origins = frozenset(origin.lower() for origin in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._origins:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = origin.lower() in self._origins
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(scope, send, headers, origin if allowed else None)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers.add_vary_header("Origin")
                if allowed:
                    response_headers["access-control-allow-origin"] = origin
                    response_headers["access-control-expose-headers"] = CORS_EXPOSED_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope: Scope, send: Send, headers: Headers, origin: str | None) -> None:
        method = headers["access-control-request-method"].strip().upper()
        requested = {
            name.strip().lower() for name in headers.get("access-control-request-headers", "").split(",")
        } - {""}
        refusal = None
        if origin is None:
            refusal = "This origin is not allowed to call the liveness proxy."
        elif method not in CORS_ALLOWED_METHODS:
            refusal = f"The method {method[:16]!r} is not allowed across origins."
        elif not requested <= CORS_ALLOWED_HEADERS:
            refusal = "A requested header is not allowed across origins."
        vary = (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        if refusal is not None or origin is None:
            await send_problem(send, Forbidden(refusal or ""), request_id_of(scope), [vary])
            return
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-methods", ", ".join(CORS_ALLOWED_METHODS).encode()),
                    (b"access-control-allow-headers", ", ".join(sorted(CORS_ALLOWED_HEADERS)).encode()),
                    (b"access-control-max-age", CORS_MAX_AGE_SECONDS.encode()),
                    vary,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
