"""The three Cynopsis liveness calls, with the access token and domain id injected.

Status handling branches on the HTTP status only (never on upstream text):
2xx -> the JSON object; 401 -> drop that token, get a new one, retry once; 429 -> UpstreamRateLimited
with its Retry-After; 404 on a result -> UpstreamNotFound; 404 on a POST (our configured path is
wrong) -> 502; other 4xx -> UpstreamRejected (same status); 3xx, 5xx, persistent 401/403,
non-JSON -> 502; timeouts -> 504.

Every HTTP exchange (the retry after a 401 too) is reported to an optional `UpstreamObserver` with its
endpoint name, its outcome (the status, or "timeout", "connect_error", "connection_error",
"malformed") and how long it took.

An optional `CircuitBreaker` (upstream/circuit.py) refuses calls at once while the upstream is
failing; each call's outcome is reported to it.

The calls go through an `HttpTransport` (liveness_proxy/http/; in production an `Http1Transport`,
in tests possibly a `MemoryTransport`). What a failed exchange means for the caller (status, problem
type, outcome label) is http/problems.py's table, the one place that decides it.

Nothing is retried here but the single 401 case. The HTTP/1.1 transport re-sends a GET once when a
pooled keep-alive connection turns out to be closed (RFC 9112 section 9.3.1); a POST that may have
reached the upstream is never sent twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import orjson

from liveness_proxy.errors import (
    TokenUnavailable,
    UpstreamError,
    UpstreamMalformed,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from liveness_proxy.http import HttpError, HttpResponse, HttpTransport, Url
from liveness_proxy.http.base import PATH_SAFE as _PATH_SAFE
from liveness_proxy.http.problems import upstream_problem
from liveness_proxy.http.retry_after import parse_retry_after
from liveness_proxy.upstream.answers import upstream_error_code
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.tokens import AccessToken, TokenManager

UpstreamEndpoint = Literal["session_token", "create_session", "result"]


class UpstreamObserver(Protocol):
    """Told about every upstream HTTP exchange, e.g. to count it; must not raise or block."""

    def observe_upstream(self, endpoint: str, outcome: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    status: int
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CynopsisEndpoints:
    api_base_url: str
    session_token_path: str
    session_path: str
    result_path: str  # contains "{session_id}" once

    @property
    def origin(self) -> str:
        """scheme://host[:port] of the liveness API: what one connection pool talks to."""
        parts = urlsplit(self.api_base_url)
        return f"{parts.scheme}://{parts.netloc}"

    def target(self, path: str) -> str:
        """The request target (base URL path + `path`), percent-encoded."""
        return quote(urlsplit(self.api_base_url).path.rstrip("/") + path, safe=_PATH_SAFE)


# The statuses a gateway or an overloaded server gives: the upstream is unavailable, whatever was
# asked. A plain 500 is left out on purpose: Cynopsis may answer it to a body it chokes on, and the
# bodies come from callers, who must never be able to open the circuit for everybody.
OUTAGE_STATUSES = frozenset({502, 503, 504})


def signals_outage(error: UpstreamError) -> bool:
    """True for what the circuit breaker counts as a failure: no answer at all (unreachable, reset,
    garbage, timed out) or an outage status, whatever the body (an oversized or encoded 503 too)."""
    if isinstance(error, UpstreamTimeout):
        return True
    if isinstance(error, UpstreamUnavailable | UpstreamMalformed):
        return error.upstream_status is None or error.upstream_status in OUTAGE_STATUSES
    return False


class CynopsisClient:
    def __init__(
        self,
        http: HttpTransport,
        tokens: TokenManager,
        *,
        endpoints: CynopsisEndpoints,
        domain_id: str,
        max_response_bytes: int,
        timeout_seconds: float,
        observer: UpstreamObserver | None = None,
        circuit: CircuitBreaker | None = None,
    ) -> None:
        self._http = http
        self._circuit = circuit
        self._tokens = tokens
        self._endpoints = endpoints
        self._domain_id = domain_id
        self._max_response_bytes = max_response_bytes
        self._timeout_seconds = timeout_seconds
        self._observer = observer
        self._origin = endpoints.origin
        self._session_token_url = Url(self._origin, endpoints.target(endpoints.session_token_path))
        self._session_url = Url(self._origin, endpoints.target(endpoints.session_path))
        # The result path around its "{session_id}": the id (validated [A-Za-z0-9_-]) goes in between.
        before, _, after = endpoints.result_path.partition("{session_id}")
        self._result_target = (endpoints.target(before), quote(after, safe=_PATH_SAFE))

    async def get_session_token(self, body: bytes, request_id: str) -> UpstreamResult:
        """`body` is a JSON object, already encoded."""
        return await self._call("session_token", "POST", self._session_token_url, body, request_id)

    async def create_session(
        self,
        body: bytes,
        request_id: str,
        *,
        before_sending: Callable[[], Awaitable[None]] | None = None,
    ) -> UpstreamResult:
        """`body` is a JSON object, already encoded. `before_sending` runs once the call is admitted
        by the circuit breaker, right before it goes out (e.g. to count a daily attempt): a call the
        breaker refuses costs nothing, and if `before_sending` raises, nothing is sent."""
        return await self._call(
            "create_session", "POST", self._session_url, body, request_id, before_sending=before_sending
        )

    async def get_result(self, session_id: str, request_id: str) -> UpstreamResult:
        # The caller validated session_id against [A-Za-z0-9_-]{1,128}: it cannot leave this path.
        before, after = self._result_target
        url = Url(self._origin, before + session_id + after)
        return await self._call("result", "GET", url, None, request_id, is_result=True)

    async def _call(
        self,
        endpoint: UpstreamEndpoint,
        method: str,
        url: Url,
        body: bytes | None,
        request_id: str,
        *,
        is_result: bool = False,
        before_sending: Callable[[], Awaitable[None]] | None = None,
    ) -> UpstreamResult:
        circuit = self._circuit
        if circuit is None:
            if before_sending is not None:
                await before_sending()
            return await self._call_upstream(endpoint, method, url, body, request_id, is_result)
        probe = circuit.admit()
        try:
            if before_sending is not None:
                await before_sending()
            result = await self._call_upstream(endpoint, method, url, body, request_id, is_result)
        except UpstreamError as exc:
            if isinstance(exc, TokenUnavailable):
                circuit.abandoned(probe)  # the liveness API was never called
            elif signals_outage(exc):
                circuit.failed(probe)
            else:
                circuit.succeeded(probe)  # 4xx, 429, 500, an unusable body: the upstream answered
            raise
        except BaseException:
            circuit.abandoned(probe)  # refused before sending, cancelled (the caller left), or a bug
            raise
        circuit.succeeded(probe)
        return result

    async def _call_upstream(
        self,
        endpoint: UpstreamEndpoint,
        method: str,
        url: Url,
        body: bytes | None,
        request_id: str,
        is_result: bool,
    ) -> UpstreamResult:
        token = await self._tokens.get()
        answer, seconds = await self._send(endpoint, method, url, body, token, request_id)
        if answer.status == 401:
            # Counted now: getting a token for the retry may fail, and the retry is an exchange of its own.
            self._observe(endpoint, "401", seconds)
            # Rejected token (revoked or expired early): replace it, and retry once. The upstream
            # did not process a request it refused to authenticate, so a POST is safe too. If the
            # token manager keeps the token (one was replaced moments ago), there is no retry.
            self._tokens.invalidate(token)
            fresh = await self._tokens.get()
            if fresh is token:
                return self._interpret(answer, is_result=is_result)
            answer, seconds = await self._send(endpoint, method, url, body, fresh, request_id)
        # Observed after interpreting: a 2xx whose body is unusable is counted as "malformed".
        outcome = str(answer.status)
        try:
            return self._interpret(answer, is_result=is_result)
        except UpstreamMalformed:
            outcome = "malformed"
            raise
        finally:
            self._observe(endpoint, outcome, seconds)

    async def _send(
        self,
        endpoint: UpstreamEndpoint,
        method: str,
        url: Url,
        body: bytes | None,
        token: AccessToken,
        request_id: str,
    ) -> tuple[HttpResponse, float]:
        """The answer and how long the exchange took; a failed exchange is observed here."""
        headers = [
            ("Authorization", f"Bearer {token.value}"),
            ("X-Domain-Id", self._domain_id),
            ("X-Request-ID", request_id),
            ("Accept", "application/json"),
        ]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        started = time.perf_counter()
        try:
            response = await self._http.request(
                method,
                url,
                headers=headers,
                body=body,
                max_body_bytes=self._max_response_bytes,
                timeout_seconds=self._timeout_seconds,
            )
        except HttpError as exc:
            outcome, problem = upstream_problem(exc)
            self._observe(endpoint, outcome, time.perf_counter() - started)
            raise problem from None
        return response, time.perf_counter() - started

    def _observe(self, endpoint: UpstreamEndpoint, outcome: str, seconds: float) -> None:
        if self._observer is not None:
            self._observer.observe_upstream(endpoint, outcome, seconds)

    def _interpret(self, answer: HttpResponse, *, is_result: bool) -> UpstreamResult:
        status = answer.status
        if 200 <= status < 300:
            return UpstreamResult(status=status, payload=self._parse_object(answer))
        if status == 429:
            raise UpstreamRateLimited(
                "The liveness service is rate limiting requests; retry later.",
                retry_after_seconds=parse_retry_after(answer.header(b"retry-after")),
            )
        if status in (401, 403):
            raise UpstreamUnavailable(
                "The liveness service refused the proxy's credentials.", upstream_status=status
            )
        if status == 404 and is_result:
            raise UpstreamNotFound("No such liveness session.")
        if 400 <= status < 500 and status != 404:
            code = upstream_error_code(answer.body)
            detail = "The liveness service rejected the request"
            detail += f" ({code})." if code else "."
            raise UpstreamRejected(detail, upstream_status=status)
        raise UpstreamUnavailable(f"The liveness service failed (HTTP {status}).", upstream_status=status)

    def _parse_object(self, answer: HttpResponse) -> dict[str, Any]:
        if "json" not in (answer.header(b"content-type") or "").lower():
            raise UpstreamMalformed(
                "The liveness service sent a non-JSON response.", upstream_status=answer.status
            )
        try:
            payload = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed(
                "The liveness service sent malformed JSON.", upstream_status=answer.status
            ) from None
        if not isinstance(payload, dict):
            raise UpstreamMalformed(
                "The liveness service sent JSON that is not an object.", upstream_status=answer.status
            )
        return payload
