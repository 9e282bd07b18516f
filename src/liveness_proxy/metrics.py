"""Prometheus metrics: one registry per app and the `/metrics` handler (requests are observed by
RequestContextMiddleware, which calls `ProxyMetrics.observe_request`).

Nothing here is global: each `ProxyMetrics` owns its `CollectorRegistry`, so two apps in one process
(tests, the demo) count separately and never collide on a metric name.

Cardinality is bounded by construction. A label value is either a route template written in code,
a member of a fixed set (methods, endpoints, limits, outcomes; anything else becomes "other"), or an
HTTP status code (at most 500 distinct values). No session id, subject, key id or raw path is ever a
label value.

`/metrics` is refused (as an unknown route, 404) to clients outside the allowed networks, and needs
`Authorization: Bearer <token>` when a metrics token is configured. It answers in the classic text
format, or in OpenMetrics when the scraper's Accept header asks for `application/openmetrics-text`
(Prometheus does by default): only OpenMetrics carries exemplars, the trace ids that the latency
histograms keep beside their buckets so that a slow bucket leads to one of its traces.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.gc_collector import GCCollector
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.errors import NotFound, Unauthenticated

# From a loopback cache hit (~1 ms) to the longest upstream timeout anyone should configure (30 s).
LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Audit group commits: one record at idle, up to the configured batch maximum under load.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

OTHER = "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UPSTREAM_ENDPOINTS = frozenset({"session_token", "create_session", "result"})
# Outcomes of an upstream exchange that has no (usable) status; see upstream/client.py.
UPSTREAM_ERROR_KINDS = frozenset({"timeout", "connect_error", "connection_error", "malformed"})
TOKEN_REFRESH_OUTCOMES = frozenset({"ok", "failed"})
RATE_LIMITS = frozenset(
    {"session_token", "create_session", "result", "daily_attempts", "daily_attempts_total", "unauthenticated"}
)
# The kinds of credential a failed authentication presented (`store/failed_authentications.py`).
CREDENTIAL_KINDS = frozenset({"none", "api_key", "jwt", "other"})
# Where a result read's answer came from (api/result_reads.py).
RESULT_SOURCES = ("upstream", "shared", "stored")
# Parts of the state shared across replicas that fall back to per-process state when unreachable.
SHARED_STATE_COMPONENTS = frozenset({"token_cache", "rate_limits"})
FINALIZER_POLL_OUTCOMES = frozenset({"terminal", "pending", "failed"})
FINALIZER_OUTCOMES = frozenset({"final", "unresolved", "already_final"})
WEBHOOK_ATTEMPT_RESULTS = frozenset({"delivered", "failed", "gone", "dead_letter"})
JOB_KINDS = ("finalize", "deliver", "erase", "retention")
# What the retention sweep removes (store/retention.py `RetentionCounts`).
RETENTION_KINDS = frozenset(
    {
        "sessions",
        "webhook_events",
        "jobs",
        "audit_plaintext",
        "idempotency_records",
        "session_tokens",
        "erasure_notices",
    }
)
_STATUS_PATTERN = re.compile(r"[1-5][0-9][0-9]")


def _one_of(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


def _status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else OTHER


def _upstream_outcome_label(outcome: str) -> str:
    if outcome in UPSTREAM_ERROR_KINDS or _STATUS_PATTERN.fullmatch(outcome):
        return outcome
    return OTHER


class ProxyMetrics:
    """Every metric the proxy exposes, in a registry of its own. Label values are clamped to fixed
    sets here, so no caller can grow the number of series by passing request data."""

    def __init__(self, *, include_process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        if include_process_metrics:
            # What the default global registry would have shown: memory, CPU, fds, GC, Python version.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        registry = self.registry

        self._requests = Counter(
            "liveness_proxy_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self._request_duration = Histogram(
            "liveness_proxy_http_request_duration_seconds",
            "Time from receiving a request to sending the last byte of its answer.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._upstream_requests = Counter(
            "liveness_proxy_upstream_requests",
            "HTTP exchanges with the liveness API, by endpoint and outcome (status or error kind).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self._upstream_duration = Histogram(
            "liveness_proxy_upstream_request_duration_seconds",
            "Duration of one HTTP exchange with the liveness API, by endpoint and outcome.",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._token_refreshes = Counter(
            "liveness_proxy_upstream_token_refreshes",
            "Requests for a new upstream access token, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        self._token_refresh_duration = Histogram(
            "liveness_proxy_upstream_token_refresh_duration_seconds",
            "Duration of one upstream access token request, by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._token_cache = Counter(
            "liveness_proxy_upstream_token_cache_lookups",
            "Upstream access token lookups: hit when answered from the cache without waiting.",
            ["result"],
            registry=registry,
        )
        self._rate_limited = Counter(
            "liveness_proxy_rate_limited_requests",
            "Requests refused by one of the proxy's own rate limits or quotas, by limit.",
            ["limit"],
            registry=registry,
        )
        self._authentication_failures = Counter(
            "liveness_proxy_authentication_failures",
            "Requests to the liveness and admin routes without a valid credential, by the kind "
            "presented (none, api_key, jwt, other); 429s of the unauthenticated limit included.",
            ["credential"],
            registry=registry,
        )
        self._daily_attempts_total_used = Gauge(
            "liveness_proxy_daily_attempts_total_used_ratio",
            "How much of today's deployment-wide attempt cap (LIVENESS_PROXY_DAILY_ATTEMPTS_TOTAL) is "
            "used, 0-1, as this process last counted it (0 without a cap).",
            registry=registry,
        )
        self._audit_batch = Histogram(
            "liveness_proxy_audit_batch_records",
            "Audit records written by one group commit.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._audit_commit_duration = Histogram(
            "liveness_proxy_audit_commit_duration_seconds",
            "Duration of one audit group commit.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._audit_unavailable = Counter(
            "liveness_proxy_audit_unavailable",
            "Requests whose audit record could not be written because the database was unreachable: "
            "an answer withheld (503 store-unavailable), or a refusal sent unrecorded.",
            registry=registry,
        )
        self._upstream_in_flight = Gauge(
            "liveness_proxy_upstream_calls_in_flight",
            "Upstream calls holding a concurrency slot now.",
            registry=registry,
        )
        self._upstream_waiting = Gauge(
            "liveness_proxy_upstream_calls_waiting",
            "Upstream calls waiting for a concurrency slot now.",
            registry=registry,
        )
        self._upstream_rejected = Counter(
            "liveness_proxy_upstream_calls_rejected",
            "Upstream calls refused because no concurrency slot became free in time.",
            registry=registry,
        )
        self._circuit_open = Gauge(
            "liveness_proxy_upstream_circuit_open",
            "1 while the circuit breaker refuses liveness calls (the upstream kept failing), else 0.",
            registry=registry,
        )
        self._circuit_rejections = Counter(
            "liveness_proxy_upstream_circuit_rejections",
            "Liveness calls refused at once by the open circuit breaker (never sent upstream).",
            registry=registry,
        )
        self._shared_state_failures = Counter(
            "liveness_proxy_shared_state_failures",
            "Times a shared store (Redis, or the database for the token) could not be reached and "
            "this process fell back to its own state, by component.",
            ["component"],
            registry=registry,
        )
        self._result_reads = Counter(
            "liveness_proxy_result_reads",
            "Result reads answered, by source: upstream (this read's own Cynopsis call), shared "
            "(another read's call, in flight or within the reuse window) or stored (the final result "
            "from the proxy's own record, no call).",
            ["source"],
            registry=registry,
        )
        self._finalizer_polls = Counter(
            "liveness_proxy_finalizer_polls",
            "Result reads the finalizer made on its own, by outcome (terminal, pending, failed).",
            ["outcome"],
            registry=registry,
        )
        self._finalizer_outcomes = Counter(
            "liveness_proxy_finalizer_outcomes",
            "Sessions the finalizer ended, by outcome (final: it read the verdict; unresolved: "
            "the deadline passed; already_final: a caller's read recorded it first).",
            ["outcome"],
            registry=registry,
        )
        self._webhook_attempts = Counter(
            "liveness_proxy_webhook_attempts",
            "Webhook delivery attempts, by result (delivered, failed, gone, dead_letter).",
            ["result"],
            registry=registry,
        )
        self._jobs = Gauge(
            "liveness_proxy_jobs",
            "Background jobs in the database, by kind (finalize, deliver, erase, retention) and state "
            "(queued, dead); sampled by each process's worker.",
            ["kind", "state"],
            registry=registry,
        )
        self._webhook_endpoint_disabled = Gauge(
            "liveness_proxy_webhook_endpoint_disabled",
            "1 while the webhook endpoint is disabled (it answered 410 Gone), else 0.",
            registry=registry,
        )
        self._retention_removed = Counter(
            "liveness_proxy_retention_removed",
            "Rows the retention sweep removed, by kind (audit_plaintext: audit records whose plain "
            "values it erased; the records stay).",
            ["kind"],
            registry=registry,
        )
        self._retention_last_run = Gauge(
            "liveness_proxy_retention_last_run_timestamp_seconds",
            "When this process last completed a retention sweep (epoch seconds; 0: not yet). One "
            "replica sweeps at a time: take the maximum over the fleet.",
            registry=registry,
        )
        # Families with labels show up only once a series exists; these are known in advance, so a
        # dashboard sees zeros instead of gaps before the first event.
        for outcome in sorted(TOKEN_REFRESH_OUTCOMES):
            self._token_refreshes.labels(outcome=outcome)
        self._token_cache_hit = self._token_cache.labels(result="hit")
        self._token_cache_miss = self._token_cache.labels(result="miss")
        # Resolved label children of the per-request series (see observe_request).
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_series: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        for limit in sorted(RATE_LIMITS):
            self._rate_limited.labels(limit=limit)
        for kind in sorted(CREDENTIAL_KINDS):
            self._authentication_failures.labels(credential=kind)
        for component in sorted(SHARED_STATE_COMPONENTS):
            self._shared_state_failures.labels(component=component)
        # Resolved once: a read's count is a dict look-up and an increment.
        self._result_read_series = {
            source: self._result_reads.labels(source=source) for source in RESULT_SOURCES
        }
        for outcome in sorted(FINALIZER_POLL_OUTCOMES):
            self._finalizer_polls.labels(outcome=outcome)
        for outcome in sorted(FINALIZER_OUTCOMES):
            self._finalizer_outcomes.labels(outcome=outcome)
        for result in sorted(WEBHOOK_ATTEMPT_RESULTS):
            self._webhook_attempts.labels(result=result)
        for kind in sorted(RETENTION_KINDS):
            self._retention_removed.labels(kind=kind)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type: OpenMetrics (with exemplars) when `accept`, the
        scraper's Accept header, asks for it; else the classic text format every scraper reads."""
        if wants_openmetrics(accept):
            # The client library leaves this function without annotations; it returns bytes.
            body: bytes = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return body, openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def observe_request(
        self, route: str, method: str, status: int, seconds: float, trace_id: str | None = None
    ) -> None:
        """`route` must be a route template (or UNMATCHED_ROUTE), never a raw path. `trace_id` (the
        32 hex digits of a sampled span's trace) becomes the exemplar of the latency bucket."""
        method_label = _one_of(method, KNOWN_METHODS)
        key = (route, method_label, status)
        series = self._request_series.get(key)
        if series is None:
            # labels() takes a lock and validates on every call: resolved once per label set (keyed
            # by the bounded labels, so junk methods cannot crowd out the real ones).
            series = (
                self._requests.labels(route=route, method=method_label, status=_status_label(status)),
                self._request_duration.labels(route=route, method=method_label),
            )
            if len(self._request_series) < _MAX_CACHED_SERIES:
                self._request_series[key] = series
        series[0].inc()
        # Called for every request: without a trace id, exactly the one call it always was.
        if trace_id is None:
            series[1].observe(seconds)
        else:
            series[1].observe(seconds, {"trace_id": trace_id})

    def observe_upstream(
        self, endpoint: str, outcome: str, seconds: float, trace_id: str | None = None
    ) -> None:
        """`outcome` is the HTTP status ("200") or an error kind ("timeout", "malformed", ...);
        `trace_id` as for `observe_request`."""
        endpoint_label = _one_of(endpoint, UPSTREAM_ENDPOINTS)
        outcome_label = _upstream_outcome_label(outcome)
        key = (endpoint_label, outcome_label)
        series = self._upstream_series.get(key)
        if series is None:
            series = (
                self._upstream_requests.labels(endpoint=endpoint_label, outcome=outcome_label),
                self._upstream_duration.labels(endpoint=endpoint_label, outcome=outcome_label),
            )
            if len(self._upstream_series) < _MAX_CACHED_SERIES:
                self._upstream_series[key] = series
        series[0].inc()
        if trace_id is None:
            series[1].observe(seconds)
        else:
            series[1].observe(seconds, {"trace_id": trace_id})

    def token_refreshed(self, outcome: str, seconds: float) -> None:
        outcome_label = _one_of(outcome, TOKEN_REFRESH_OUTCOMES)
        self._token_refreshes.labels(outcome=outcome_label).inc()
        self._token_refresh_duration.labels(outcome=outcome_label).observe(seconds)

    def token_cache(self, hit: bool) -> None:
        (self._token_cache_hit if hit else self._token_cache_miss).inc()

    def rate_limited(self, limit: str) -> None:
        self._rate_limited.labels(limit=_one_of(limit, RATE_LIMITS)).inc()

    def authentication_failed(self, credential: str) -> None:
        self._authentication_failures.labels(credential=_one_of(credential, CREDENTIAL_KINDS)).inc()

    def watch_daily_attempts_total(self, used_ratio: Callable[[], float]) -> None:
        self._daily_attempts_total_used.set_function(used_ratio)

    def audit_committed(self, batch_size: int, seconds: float) -> None:
        self._audit_batch.observe(batch_size)
        self._audit_commit_duration.observe(seconds)

    def audit_unavailable(self) -> None:
        """One request's audit record could not be written: the store was unreachable."""
        self._audit_unavailable.inc()

    def watch_upstream_gate(self, in_flight: Callable[[], float], waiting: Callable[[], float]) -> None:
        """The concurrency limiter's state, read when the metrics are scraped (nothing per request)."""
        self._upstream_in_flight.set_function(in_flight)
        self._upstream_waiting.set_function(waiting)

    def circuit_changed(self, is_open: bool, consecutive_failures: int) -> None:
        self._circuit_open.set(1 if is_open else 0)

    def circuit_rejected(self) -> None:
        self._circuit_rejections.inc()

    def upstream_slot_rejected(self) -> None:
        self._upstream_rejected.inc()

    def result_read(self, source: str) -> None:
        """A result read answered from `source` (one of RESULT_SOURCES)."""
        self._result_read_series[source].inc()

    def finalizer_polled(self, outcome: str) -> None:
        self._finalizer_polls.labels(outcome=_one_of(outcome, FINALIZER_POLL_OUTCOMES)).inc()

    def finalizer_ended(self, outcome: str) -> None:
        self._finalizer_outcomes.labels(outcome=_one_of(outcome, FINALIZER_OUTCOMES)).inc()

    def webhook_attempted(self, result: str) -> None:
        self._webhook_attempts.labels(result=_one_of(result, WEBHOOK_ATTEMPT_RESULTS)).inc()

    def retention_swept(self, removed: Mapping[str, int], *, at: float, complete: bool) -> None:
        """One sweep's counts; `at` becomes the last-run time only when the sweep completed."""
        for kind, count in removed.items():
            if count > 0:
                self._retention_removed.labels(kind=_one_of(kind, RETENTION_KINDS)).inc(count)
        if complete:
            self._retention_last_run.set(at)

    def jobs_counted(self, counts: dict[tuple[str, str], int], *, endpoint_disabled: bool) -> None:
        # `erase` and `retention` too, for their dead count: a dead erasure follow-up left data it
        # should have removed, a dead sweep stopped (until the next start brings it back). The
        # sweep's one queued row is always 1, and means nothing more than that it is scheduled.
        for kind in JOB_KINDS:
            for state in ("queued", "dead"):
                self._jobs.labels(kind=kind, state=state).set(counts.get((kind, state), 0))
        self._webhook_endpoint_disabled.set(1 if endpoint_disabled else 0)

    def shared_state_failed(self, component: str) -> None:
        self._shared_state_failures.labels(component=_one_of(component, SHARED_STATE_COMPONENTS)).inc()


# Raw label inputs (method, status, outcome) come from requests; the cache stops growing at this size
# (the labels themselves are already bounded, the keys they are derived from are not).
_MAX_CACHED_SERIES = 512


def wants_openmetrics(accept: str) -> bool:
    """Whether an Accept header asks for OpenMetrics (any version, unless refused with q=0)."""
    for media_range in accept.split(","):
        media_type, *parameters = media_range.split(";")
        if media_type.strip().lower() != "application/openmetrics-text":
            continue
        refused = any(
            name.strip().lower() == "q" and _is_zero(value)
            for name, _, value in (parameter.partition("=") for parameter in parameters)
        )
        if not refused:
            return True
    return False


def _is_zero(quality: str) -> bool:
    try:
        return float(quality) == 0
    except ValueError:
        return False


def _parse_networks(
    allowed_networks: Sequence[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in allowed_networks)


def _client_is_allowed(
    host: str | None, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not host:
        return False  # no peer address (e.g. a Unix socket): nothing to check against, so refuse
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; match them against IPv4 networks.
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _bearer_credential(request: Request) -> str | None:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None


def metrics_endpoint(
    metrics: ProxyMetrics, *, token: str, allowed_networks: Sequence[str]
) -> Callable[[Request], Awaitable[Response]]:
    """The `/metrics` handler.

    A client outside `allowed_networks` (CIDR notation; an empty list allows nobody) gets the 404 of
    an unknown route, whatever it sends: the endpoint's existence is not revealed. Inside them, and
    when `token` is non-empty, `Authorization: Bearer <token>` is required (else 401). The client
    address is the direct peer's, unless the server is configured to trust forwarded headers.
    """
    networks = _parse_networks(allowed_networks)
    expected = token.encode()

    async def serve_metrics(request: Request) -> Response:
        if not _client_is_allowed(request.client.host if request.client else None, networks):
            raise NotFound("No such route.")
        if expected:
            presented = _bearer_credential(request)
            if presented is None:
                raise Unauthenticated("A metrics token is required.")
            if not hmac.compare_digest(presented.encode(), expected):
                raise Unauthenticated("The metrics token is not valid.", error="invalid_token")
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return serve_metrics
