"""Every error the proxy raises on purpose, and its one rendering as RFC 9457 problem details.

The tree:

    LivenessProxyError
    ├── ConfigurationError            a setting is missing or invalid (start-up, CLI)
    ├── StartRefused                  a start cannot proceed (a port already taken)
    └── ProblemError                  answered to the caller as application/problem+json
        ├── BadRequest                400  body is not JSON, session id malformed, ...
        ├── Unauthenticated           401  missing or wrong credentials (+ WWW-Authenticate)
        ├── Forbidden                 403  authenticated, but the route needs a scope the caller lacks
        ├── NotFound                  404  unknown route, unknown or foreign session
        ├── MethodNotAllowed          405
        ├── PayloadTooLarge           413
        ├── UnsupportedMediaType      415
        ├── Conflict                  409  (+ Retry-After) an idempotent create with this key is in flight
        ├── UnprocessableContent      422  JSON that is not the declared shape (an unknown field, a bad type)
        │   ├── SessionTokenInvalid   422  a session token that is unknown, foreign, used or expired
        │   └── IdempotencyKeyReused  422  an Idempotency-Key already used with another body
        ├── RateLimited               429  (+ Retry-After; the body names the limit)
        ├── InternalError             500  a bug: the caller sees only the request id
        ├── ServiceUnavailable        503  (+ Retry-After) readiness, overload
        ├── StoreUnavailable          503  (+ Retry-After) the database cannot be reached
        └── UpstreamError             the Cynopsis API failed us
            ├── UpstreamTimeout       504
            ├── UpstreamUnavailable   502  refused, reset, 5xx
            ├── UpstreamMalformed     502  not JSON, not an object, too large, missing session id
            ├── UpstreamRateLimited   429  (+ the upstream's Retry-After)
            ├── UpstreamRejected      4xx  the upstream refused the request; same status, sanitized detail
            ├── UpstreamNotFound      404  the upstream does not know the session (looks like NotFound)
            └── TokenUnavailable      503  (+ Retry-After) no upstream access token can be had now

A `ProblemError` carries only text written here, never upstream bodies, secrets or stack traces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:liveness-proxy:problem:"


class LivenessProxyError(Exception):
    """Base of every error this package raises on purpose."""


class StartRefused(LivenessProxyError):
    """A start that cannot proceed for a reason outside the settings (a port already taken): the
    command ends with one line naming it and a non-zero exit."""


class ConfigurationError(LivenessProxyError):
    """A setting is missing or invalid. The message names the variable, never its value."""


class ProblemError(LivenessProxyError):
    """An error that is answered to the caller as problem details."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def response_status(self) -> int:
        return self.status

    def extensions(self) -> dict[str, object]:
        """RFC 9457 extension members of this problem (none by default)."""
        return {}


class BadRequest(ProblemError):
    status = 400
    slug = "bad-request"
    title = "Bad request"


class Unauthenticated(ProblemError):
    status = 401
    slug = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str, *, error: str | None = None) -> None:
        challenge = 'Bearer realm="liveness-proxy"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(ProblemError):
    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFound(ProblemError):
    status = 404
    slug = "not-found"
    title = "Not found"


class MethodNotAllowed(ProblemError):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"


class PayloadTooLarge(ProblemError):
    status = 413
    slug = "payload-too-large"
    title = "Payload too large"


class UnsupportedMediaType(ProblemError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class UnprocessableContent(ProblemError):
    status = 422
    slug = "unprocessable-content"
    title = "Unprocessable content"


class SessionTokenInvalid(UnprocessableContent):
    """One answer for every reason a session token is refused, so none of them can be told apart."""

    slug = "session-token-invalid"
    title = "Session token invalid"

    def __init__(
        self,
        detail: str = "The session token is not valid for this caller: get a new one from "
        "POST /v1/liveness/session-token.",
    ) -> None:
        super().__init__(detail)


class IdempotencyKeyReused(UnprocessableContent):
    slug = "idempotency-key-reused"
    title = "Idempotency key reused"

    def __init__(
        self,
        detail: str = "This Idempotency-Key was used with another request body: use a new key for a "
        "new request.",
    ) -> None:
        super().__init__(detail)


class Conflict(ProblemError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class IdempotencyKeyInFlight(Conflict):
    slug = "idempotency-key-in-flight"
    title = "Idempotency key in flight"

    def __init__(
        self,
        detail: str = "A request with this Idempotency-Key is still being processed; retry after it ends.",
        *,
        retry_after_seconds: int,
    ) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_seconds))})


class RateLimited(ProblemError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after_seconds: int, limit: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_seconds))})
        self.retry_after_seconds = max(1, retry_after_seconds)
        self.limit = limit

    def extensions(self) -> dict[str, object]:
        return {} if self.limit is None else {"limit": self.limit}


class InternalError(ProblemError):
    status = 500
    slug = "internal-error"
    title = "Internal error"


class ServiceUnavailable(ProblemError):
    status = 503
    slug = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after_seconds: int | None = None) -> None:
        headers = (
            {"Retry-After": str(max(1, retry_after_seconds))} if retry_after_seconds is not None else None
        )
        super().__init__(detail, headers=headers)


class StoreUnavailable(ProblemError):
    """The database did not answer: nothing can be authenticated, bound or recorded, so nothing is
    answered but this (an answer the audit log does not hold is never sent)."""

    status = 503
    slug = "store-unavailable"
    title = "Store unavailable"

    def __init__(self, detail: str = "The proxy's database cannot be reached; retry shortly.") -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class UpstreamError(ProblemError):
    """The Cynopsis API did not give a usable answer. `upstream_status` is for the audit log.

    `not_processed` is True when Cynopsis certainly did not act on the request: it was never sent
    (no connection could be made), or refused unprocessed (401, 429). A create that failed so has
    not spent its session token upstream, and its answer is not one to replay."""

    status = 502
    slug = "upstream-error"
    title = "Upstream error"
    not_processed: bool = False

    def __init__(
        self, detail: str, *, upstream_status: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail, headers=headers)
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    status = 504
    slug = "upstream-timeout"
    title = "Upstream timed out"


class UpstreamUnavailable(UpstreamError):
    status = 502
    slug = "upstream-unavailable"
    title = "Upstream unavailable"


class UpstreamMalformed(UpstreamError):
    status = 502
    slug = "upstream-malformed"
    title = "Upstream sent an unusable response"


class UpstreamRateLimited(UpstreamError):
    status = 429
    slug = "upstream-rate-limited"
    title = "Upstream rate limit"
    not_processed = True  # a throttled request is refused before anything is done with it

    def __init__(self, detail: str, *, retry_after_seconds: int, upstream_status: int = 429) -> None:
        super().__init__(
            detail, upstream_status=upstream_status, headers={"Retry-After": str(max(1, retry_after_seconds))}
        )


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx: the caller sees the same status and a detail written here."""

    slug = "upstream-rejected"
    title = "Upstream rejected the request"

    def __init__(self, detail: str, *, upstream_status: int) -> None:
        super().__init__(detail, upstream_status=upstream_status)

    def response_status(self) -> int:
        return self.upstream_status or 502


class UpstreamNotFound(UpstreamError):
    """The upstream answered 404 for a session: the caller sees exactly what NotFound shows."""

    status = NotFound.status
    slug = NotFound.slug
    title = NotFound.title

    def __init__(self, detail: str) -> None:
        super().__init__(detail, upstream_status=404)


class TokenUnavailable(UpstreamError):
    """No access token. `upstream_status` stays None: the liveness API was never called."""

    status = 503
    slug = "upstream-token-unavailable"
    title = "Upstream access token unavailable"

    def __init__(self, detail: str, *, retry_after_seconds: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_seconds))})


class UpstreamCircuitOpen(UpstreamError):
    """The circuit breaker is open: the liveness API failed repeatedly and is not called now.
    `upstream_status` stays None: nothing was sent."""

    status = 503
    slug = "upstream-circuit-open"
    title = "Upstream temporarily unavailable"

    def __init__(self, detail: str, *, retry_after_seconds: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_seconds))})


class RequestTimeout(ProblemError):
    """The client did not send its whole request (head or body) in time."""

    status = 408
    slug = "request-timeout"
    title = "Request timeout"

    def __init__(self, detail: str = "The request was not received in time.") -> None:
        super().__init__(detail, headers={"Connection": "close"})


class RequestHeaderFieldsTooLarge(ProblemError):
    status = 431
    slug = "request-header-fields-too-large"
    title = "Request header fields too large"

    def __init__(self, detail: str = "The request line and headers are too large.") -> None:
        super().__init__(detail, headers={"Connection": "close"})


def render_problem(
    error: ProblemError, request_id: str, extensions: Mapping[str, object] | None = None
) -> bytes:
    """The problem+json body of `error`, plus RFC 9457 extension members (e.g. readiness checks)."""
    body: dict[str, object] = {
        "type": error.type_uri,
        "title": error.title,
        "status": error.response_status(),
        "detail": error.detail,
        "request_id": request_id,
    }
    body.update(error.extensions())
    if extensions:
        body.update(extensions)
    return orjson.dumps(body)


def problem_head(error: ProblemError, request_id: str) -> list[tuple[bytes, bytes]]:
    """The headers every problem answer carries, whoever sends it (a handler, a middleware, the
    server protocol): the media type, no caching, the request id, and the error's own headers
    (`Retry-After`, `WWW-Authenticate`, `Allow`, `Connection`)."""
    return [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"cache-control", b"no-store"),
        (b"x-request-id", request_id.encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
