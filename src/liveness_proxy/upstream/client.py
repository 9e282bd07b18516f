"""The three Cynopsis liveness calls, with the access token and domain id injected.

Status handling branches on the HTTP status only (never on upstream text):
2xx -> the JSON object; 401 -> drop that token, get a new one, retry once; 429 -> UpstreamRateLimited
with its Retry-After; 404 on a result -> UpstreamNotFound; 404 on a POST (our configured path is
wrong) -> 502; other 4xx -> UpstreamRejected (same status); 3xx, 5xx, persistent 401/403,
non-JSON -> 502; timeouts -> 504.

Two checks make an answer unusable (502 `upstream-malformed`) before anything reads it: an answer,
of any status, that contains one of our own secrets anywhere (the access token the call carried, the
client secret, or a value the caller names, such as its API key), raw or behind JSON escapes; and a
2xx result for another session than the one asked for. An echo of a secret is never passed on (not
even as an error code), and a mismatched result never becomes a verdict.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import orjson
from opentelemetry.trace import SpanKind

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
from liveness_proxy.tracing import Tracing, client_attributes, record_answer, sampled_trace_id
from liveness_proxy.upstream.answers import upstream_error_code
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.echoes import refuse_echoed_secrets
from liveness_proxy.upstream.tokens import AccessToken, TokenManager

UpstreamEndpoint = Literal["session_token", "create_session", "result"]


class UpstreamObserver(Protocol):
    """Told about every upstream HTTP exchange, e.g. to count it; must not raise or block."""

    def observe_upstream(
        self, endpoint: str, outcome: str, seconds: float, trace_id: str | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    status: int
    payload: dict[str, Any]
    # The body as it came, and the payload re-encoded: where an echoed secret is looked for.
    raw: bytes
    canonical: bytes


@dataclass(frozen=True, slots=True)
class ShapedResult:
    """A result read's answer as every caller of one Cynopsis call is given it (`body`, encoded once,
    after the declared-answer filter), and what another caller's credentials are looked for in: the
    upstream answer as it came and re-encoded, as the call looked for its starter's. Nothing else of
    the upstream answer is kept; a reused one is dropped once its window has passed
    (upstream/single_flight.py)."""

    body: bytes
    status: int
    raw: bytes
    canonical: bytes

    def refuse_caller_secrets(self, caller_secrets: Sequence[str]) -> None:
        """UpstreamMalformed when the upstream answer holds one of `caller_secrets`, as the call
        refused it for its starter: whether a caller is refused does not depend on whether its
        answer was shared (a member the filter drops counts too: a body carried it there)."""
        refuse_echoed_secrets(self.raw, self.canonical, caller_secrets, status=self.status)


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


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One call: what goes out, and what its answer is checked against."""

    endpoint: UpstreamEndpoint
    method: str
    url: Url
    body: bytes | None
    request_id: str
    result_of: str | None  # the session id a result is asked for
    caller_secrets: Sequence[str]
    before_sending: Callable[[], Awaitable[None]] | None


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
        session_id_fields: Sequence[str] = ("session_id",),
        own_secrets: Callable[[], Sequence[str]] = tuple,
        tracing: Tracing | None = None,
    ) -> None:
        """`own_secrets()` gives the values no answer may contain besides the access token (the
        client secret); `session_id_fields` are where an answer carries its session id."""
        self._http = http
        self._tracing = tracing or Tracing.off()
        self._session_id_fields = tuple(session_id_fields)
        self._own_secrets = own_secrets
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
        # Each call's client-span attributes, built once: the path as its template, never the id.
        self._span_attributes = {
            endpoint: client_attributes(
                method,
                self._origin,
                **{"url.template": template, "liveness_proxy.upstream.endpoint": endpoint},
            )
            for endpoint, method, template in (
                ("session_token", "POST", endpoints.session_token_path),
                ("create_session", "POST", endpoints.session_path),
                ("result", "GET", endpoints.result_path),
            )
        }

    async def get_session_token(
        self, body: bytes, request_id: str, *, caller_secrets: Sequence[str] = ()
    ) -> UpstreamResult:
        """`body` is a JSON object, already encoded. `caller_secrets`: values of the caller's (its
        credential) that the answer must not contain either."""
        return await self._call(
            "session_token", "POST", self._session_token_url, body, request_id, caller_secrets=caller_secrets
        )

    async def create_session(
        self,
        body: bytes,
        request_id: str,
        *,
        before_sending: Callable[[], Awaitable[None]] | None = None,
        caller_secrets: Sequence[str] = (),
    ) -> UpstreamResult:
        """`body` is a JSON object, already encoded. `before_sending` runs right before the call goes
        out: admitted by the circuit breaker, with an access token in hand (e.g. to use a session
        token and count a daily attempt). A call refused before it costs nothing, and if
        `before_sending` raises, nothing is sent."""
        return await self._call(
            "create_session",
            "POST",
            self._session_url,
            body,
            request_id,
            before_sending=before_sending,
            caller_secrets=caller_secrets,
        )

    async def get_result(
        self, session_id: str, request_id: str, *, caller_secrets: Sequence[str] = ()
    ) -> UpstreamResult:
        # The caller validated session_id against [A-Za-z0-9_-]{1,128}: it cannot leave this path.
        before, after = self._result_target
        url = Url(self._origin, before + session_id + after)
        return await self._call(
            "result", "GET", url, None, request_id, result_of=session_id, caller_secrets=caller_secrets
        )

    async def _call(
        self,
        endpoint: UpstreamEndpoint,
        method: str,
        url: Url,
        body: bytes | None,
        request_id: str,
        *,
        result_of: str | None = None,
        before_sending: Callable[[], Awaitable[None]] | None = None,
        caller_secrets: Sequence[str] = (),
    ) -> UpstreamResult:
        exchange = _Exchange(
            endpoint, method, url, body, request_id, result_of, caller_secrets, before_sending
        )
        circuit = self._circuit
        if circuit is None:
            return await self._call_upstream(exchange)
        probe = circuit.admit()
        try:
            result = await self._call_upstream(exchange)
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

    async def _call_upstream(self, exchange: _Exchange) -> UpstreamResult:
        endpoint, method, url, body, request_id = (
            exchange.endpoint,
            exchange.method,
            exchange.url,
            exchange.body,
            exchange.request_id,
        )
        token = await self._tokens.get()
        if exchange.before_sending is not None:
            # Last before the send: the access token is in hand, so nothing of ours can stop it now.
            await exchange.before_sending()
        answer, seconds = await self._send(endpoint, method, url, body, token, request_id)
        if answer.status == 401:
            # Counted now: getting a token for the retry may fail, and the retry is an exchange of its own.
            self._observe(endpoint, "401", seconds)
            # Rejected token (revoked or expired early): replace it, and retry once. The upstream
            # did not process a request it refused to authenticate, so a POST is safe too. If the
            # token manager keeps the token (one was replaced moments ago), there is no retry.
            self._tokens.invalidate(token)
            try:
                fresh = await self._tokens.get()
            except UpstreamError as error:
                error.not_processed = True  # Cynopsis refused the request unauthenticated
                raise
            if fresh is token:
                return self._interpret(answer, exchange, token)
            token = fresh
            answer, seconds = await self._send(endpoint, method, url, body, token, request_id)
        # Observed after interpreting: a 2xx whose body is unusable is counted as "malformed".
        outcome = str(answer.status)
        try:
            return self._interpret(answer, exchange, token)
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
        """The answer and how long the exchange took; a failed exchange is observed here. With
        tracing on, the exchange is a client span, and Cynopsis gets its `traceparent`."""
        headers = [
            ("Authorization", f"Bearer {token.value}"),
            ("X-Domain-Id", self._domain_id),
            ("X-Request-ID", request_id),
            ("Accept", "application/json"),
        ]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        if self._tracing.tracer is None:
            return await self._exchange(endpoint, method, url, body, headers)
        with self._tracing.span(
            method, kind=SpanKind.CLIENT, attributes=self._span_attributes[endpoint]
        ) as span:
            headers.extend(self._tracing.outbound_headers())
            response, seconds = await self._exchange(endpoint, method, url, body, headers)
            record_answer(span, response.status)
            return response, seconds

    async def _exchange(
        self,
        endpoint: UpstreamEndpoint,
        method: str,
        url: Url,
        body: bytes | None,
        headers: list[tuple[str, str]],
    ) -> tuple[HttpResponse, float]:
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
            # No connection, no request: the one failure that certainly sent nothing.
            problem.not_processed = outcome == "connect_error"
            self._observe(endpoint, outcome, time.perf_counter() - started)
            raise problem from None
        return response, time.perf_counter() - started

    def _observe(self, endpoint: UpstreamEndpoint, outcome: str, seconds: float) -> None:
        if self._observer is not None:
            # The trace of a sampled call as the latency's exemplar; nothing to look up when off.
            trace_id = None if self._tracing.tracer is None else sampled_trace_id()
            self._observer.observe_upstream(endpoint, outcome, seconds, trace_id)

    def _interpret(self, answer: HttpResponse, exchange: _Exchange, token: AccessToken) -> UpstreamResult:
        status = answer.status
        is_result = exchange.result_of is not None
        secrets = (token.value, *exchange.caller_secrets)
        if 200 <= status < 300:
            payload = self._parse_object(answer)
            canonical = _canonical(payload, status)
            self._refuse_echoed_secrets(answer, canonical, secrets)
            if exchange.result_of is not None:
                self._refuse_other_session(payload, exchange.result_of, status)
            return UpstreamResult(status=status, payload=payload, raw=answer.body, canonical=canonical)
        # An error answer is read for little (its status, a Retry-After, a short error code that the
        # caller sees in the problem detail), but one that holds a secret is refused all the same: an
        # error code may be nothing but an echoed token.
        self._refuse_echoed_secrets(answer, _canonical_error(answer.body), secrets)
        if status == 429:
            raise UpstreamRateLimited(
                "The liveness service is rate limiting requests; retry later.",
                retry_after_seconds=parse_retry_after(answer.header(b"retry-after")),
            )
        if status in (401, 403):
            refused = UpstreamUnavailable(
                "The liveness service refused the proxy's credentials.", upstream_status=status
            )
            refused.not_processed = status == 401
            raise refused
        if status == 404 and is_result:
            raise UpstreamNotFound("No such liveness session.")
        if 400 <= status < 500 and status != 404:
            code = upstream_error_code(answer.body)
            detail = "The liveness service rejected the request"
            detail += f" ({code})." if code else "."
            raise UpstreamRejected(detail, upstream_status=status)
        raise UpstreamUnavailable(f"The liveness service failed (HTTP {status}).", upstream_status=status)

    def _refuse_echoed_secrets(self, answer: HttpResponse, decoded: bytes, secrets: Sequence[str]) -> None:
        """UpstreamMalformed when the answer holds a secret of ours (`echoes.refuse_echoed_secrets`)."""
        refuse_echoed_secrets(answer.body, decoded, (*secrets, *self._own_secrets()), status=answer.status)

    def _refuse_other_session(self, payload: dict[str, Any], session_id: str, status: int) -> None:
        for name in self._session_id_fields:
            value = payload.get(name)
            if value is not None and value != session_id:
                raise UpstreamMalformed(
                    "The liveness service answered for another session than the one asked for.",
                    upstream_status=status,
                )

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


def _canonical(payload: dict[str, Any], status: int) -> bytes:
    """A 2xx answer's object, re-encoded: what a caller could be given of it."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        # orjson reads deeper nesting (1024) than it writes (254): no caller could get it anyway.
        raise UpstreamMalformed(
            "The liveness service sent JSON nested too deeply.", upstream_status=status
        ) from None


def _canonical_error(body: bytes) -> bytes:
    """An error answer's JSON re-encoded, plus its error code decoded (the one part a caller sees);
    empty when the body is not JSON. Never raises: an error answer stays the error it is."""
    try:
        canonical = orjson.dumps(orjson.loads(body))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        canonical = b""
    code = upstream_error_code(body)
    return canonical if code is None else canonical + b"\n" + orjson.dumps(code)
