"""Metrics: families and label bounds, request metrics (observed by RequestContextMiddleware), the
protected endpoint (in-process, through ASGI), and the token manager's observer hooks (the upstream
client's, against a real sandbox, are in integration/test_metrics_observers.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    ProblemError,
    TokenUnavailable,
    render_problem,
)
from liveness_proxy.metrics import ProxyMetrics, metrics_endpoint
from liveness_proxy.middleware import RequestContextMiddleware
from liveness_proxy.observability import Redactor, build_logger
from liveness_proxy.upstream.oauth import FetchedToken, TokenEndpointError
from liveness_proxy.upstream.tokens import TokenManager
from metric_samples import RecordingObserver, samples, value

ITEM_TEMPLATE = "/items/{item_id}/detail"
METRICS_TOKEN = "metrics-token-0123456789abcdef"
REQUESTS = "liveness_proxy_http_requests_total"
UPSTREAM_REQUESTS = "liveness_proxy_upstream_requests_total"


def label_values(metrics: ProxyMetrics, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (sample, labels) in samples(metrics) if sample == name}


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics(include_process_metrics=False)


# --- ProxyMetrics ----------------------------------------------------------------------------


def test_render_shows_every_family_after_one_call_of_each_kind() -> None:
    metrics = ProxyMetrics()
    metrics.observe_request("/healthz", "GET", 200, 0.002)
    metrics.observe_upstream("result", "200", 0.05)
    metrics.token_refreshed("ok", 0.1)
    metrics.token_cache(hit=True)
    metrics.rate_limited("daily_attempts")
    metrics.audit_committed(batch_size=3, seconds=0.004)
    metrics.watch_upstream_gate(lambda: 2, lambda: 1)
    metrics.upstream_slot_rejected()

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    expected_lines = [
        'liveness_proxy_http_requests_total{method="GET",route="/healthz",status="200"} 1.0',
        'liveness_proxy_http_request_duration_seconds_count{method="GET",route="/healthz"} 1.0',
        'liveness_proxy_upstream_requests_total{endpoint="result",outcome="200"} 1.0',
        "liveness_proxy_upstream_request_duration_seconds_bucket"
        '{endpoint="result",le="0.05",outcome="200"} 1.0',
        'liveness_proxy_upstream_token_refreshes_total{outcome="ok"} 1.0',
        'liveness_proxy_upstream_token_refresh_duration_seconds_count{outcome="ok"} 1.0',
        'liveness_proxy_upstream_token_cache_lookups_total{result="hit"} 1.0',
        'liveness_proxy_rate_limited_requests_total{limit="daily_attempts"} 1.0',
        'liveness_proxy_audit_batch_records_bucket{le="4.0"} 1.0',
        "liveness_proxy_audit_batch_records_sum 3.0",
        "liveness_proxy_audit_commit_duration_seconds_count 1.0",
        "liveness_proxy_upstream_calls_in_flight 2.0",
        "liveness_proxy_upstream_calls_waiting 1.0",
        "liveness_proxy_upstream_calls_rejected_total 1.0",
        "process_cpu_seconds_total",
    ]
    for line in expected_lines:
        assert line in text, line


def test_latency_buckets_span_a_millisecond_to_thirty_seconds(metrics: ProxyMetrics) -> None:
    metrics.observe_request("/healthz", "GET", 200, 0.0005)
    bounds = label_values(metrics, "liveness_proxy_http_request_duration_seconds_bucket", "le")
    assert {"0.001", "30.0", "+Inf"} <= bounds


def test_known_label_values_show_zero_before_the_first_event(metrics: ProxyMetrics) -> None:
    text = metrics.render()[0].decode()
    assert 'liveness_proxy_upstream_token_refreshes_total{outcome="failed"} 0.0' in text
    assert 'liveness_proxy_upstream_token_cache_lookups_total{result="miss"} 0.0' in text
    assert 'liveness_proxy_rate_limited_requests_total{limit="session_token"} 0.0' in text


def test_two_instances_count_independently() -> None:
    # Both with process metrics: in one shared registry the second would fail on duplicate names.
    first, second = ProxyMetrics(), ProxyMetrics()
    first.observe_request("/healthz", "GET", 200, 0.001)
    first.observe_request("/healthz", "GET", 200, 0.001)
    second.observe_request("/healthz", "GET", 200, 0.001)
    assert value(first, REQUESTS, route="/healthz", method="GET", status="200") == 2
    assert value(second, REQUESTS, route="/healthz", method="GET", status="200") == 1


def test_label_values_outside_the_fixed_sets_become_other(metrics: ProxyMetrics) -> None:
    metrics.observe_request("/healthz", "BREW", 200, 0.001)
    metrics.observe_request("/healthz", "GET", 1000, 0.001)
    metrics.observe_upstream("/service/liveness-v2/liveness_result/abc", "200", 0.01)
    metrics.observe_upstream("result", "session abc not found", 0.01)
    metrics.token_refreshed("exploded", 0.01)
    metrics.rate_limited("per-subject:alice")
    text = metrics.render()[0].decode()
    for leaked in ("BREW", "1000", "abc", "exploded", "alice"):
        assert leaked not in text
    assert value(metrics, REQUESTS, route="/healthz", method="other", status="200") == 1
    assert value(metrics, REQUESTS, route="/healthz", method="GET", status="other") == 1
    assert value(metrics, UPSTREAM_REQUESTS, endpoint="other", outcome="200") == 1
    assert value(metrics, UPSTREAM_REQUESTS, endpoint="result", outcome="other") == 1
    assert value(metrics, "liveness_proxy_upstream_token_refreshes_total", outcome="other") == 1
    assert value(metrics, "liveness_proxy_rate_limited_requests_total", limit="other") == 1


def test_retention_counts_each_kind_and_the_last_complete_run(metrics: ProxyMetrics) -> None:
    removed = "liveness_proxy_retention_removed_total"
    last_run = "liveness_proxy_retention_last_run_timestamp_seconds"
    assert value(metrics, removed, kind="audit_plaintext") == 0  # every kind shows before the first run
    metrics.retention_swept(
        {"sessions": 3, "audit_plaintext": 0, "alice@example.com": 2}, at=1000.0, complete=True
    )
    metrics.retention_swept({"sessions": 2}, at=2000.0, complete=False)  # cut short: not a finished run
    assert value(metrics, removed, kind="sessions") == 5
    assert value(metrics, removed, kind="other") == 2
    assert "alice" not in metrics.render()[0].decode()
    assert value(metrics, last_run) == 1000.0


# --- Request metrics: RequestContextMiddleware's `observe`, as create_app wires it -------------


async def _item(request: Request) -> Response:
    return PlainTextResponse(request.path_params["item_id"])


async def _broken(_request: Request) -> Response:
    raise RuntimeError("a bug")


def _observing(app: ASGIApp, metrics: ProxyMetrics) -> RequestContextMiddleware:
    """The combined middleware around `app`, observing into `metrics` as create_app wires it."""
    return RequestContextMiddleware(app, logger=_quiet_logger(), observe=metrics.observe_request)


def _quiet_logger() -> structlog.typing.FilteringBoundLogger:
    return build_logger(level="info", log_format="json", redactor=Redactor(), stream=io.StringIO())


@pytest.fixture
async def tiny(metrics: ProxyMetrics) -> AsyncIterator[httpx.AsyncClient]:
    """A two-route app with the middleware outside the router, where the proxy puts it."""
    app = Starlette(
        routes=[Route(ITEM_TEMPLATE, _item, methods=["GET"]), Route("/broken", _broken)],
        middleware=[
            Middleware(RequestContextMiddleware, logger=_quiet_logger(), observe=metrics.observe_request)
        ],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_requests_are_labelled_by_route_template(
    tiny: httpx.AsyncClient, metrics: ProxyMetrics
) -> None:
    response = await tiny.get("/items/item-42/detail")
    assert response.text == "item-42"
    assert value(metrics, REQUESTS, route=ITEM_TEMPLATE, method="GET", status="200") == 1
    assert "item-42" not in metrics.render()[0].decode()


async def test_wrong_method_keeps_the_template_and_unknown_paths_are_unmatched(
    tiny: httpx.AsyncClient, metrics: ProxyMetrics
) -> None:
    assert (await tiny.post("/items/item-42/detail")).status_code == 405
    assert (await tiny.get("/no/such/path")).status_code == 404
    assert value(metrics, REQUESTS, route=ITEM_TEMPLATE, method="POST", status="405") == 1
    assert value(metrics, REQUESTS, route="unmatched", method="GET", status="404") == 1
    assert "/no/such/path" not in metrics.render()[0].decode()


async def test_an_app_that_raises_is_counted_as_500(tiny: httpx.AsyncClient, metrics: ProxyMetrics) -> None:
    assert (await tiny.get("/broken")).status_code == 500
    assert value(metrics, REQUESTS, route="/broken", method="GET", status="500") == 1


async def test_an_exception_that_escapes_the_app_is_counted_as_the_500_it_is_answered_with(
    metrics: ProxyMetrics,
) -> None:
    # Without Starlette around it: the middleware itself answers the 500 and counts it.
    async def raising_app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug")

    transport = httpx.ASGITransport(app=_observing(raising_app, metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/anything")
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert value(metrics, REQUESTS, route="unmatched", method="GET", status="500") == 1


async def test_a_client_that_leaves_before_the_answer_is_counted_as_499(metrics: ProxyMetrics) -> None:
    async def reading_app(scope: Scope, receive: Receive, send: Send) -> None:
        # What reading the body does when the client has gone: Request.body() raises ClientDisconnect.
        assert (await receive())["type"] == "http.disconnect"
        raise ClientDisconnect()

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(_message: Message) -> None:
        raise AssertionError("nothing should be sent")

    scope: Scope = {"type": "http", "method": "POST", "path": "/upload", "headers": []}
    await _observing(reading_app, metrics)(scope, receive, send)  # nothing to answer, nothing raised
    assert value(metrics, REQUESTS, route="unmatched", method="POST", status="499") == 1


async def test_a_thousand_distinct_ids_add_no_series(tiny: httpx.AsyncClient, metrics: ProxyMetrics) -> None:
    await tiny.get("/items/warm-up/detail")
    series_before = len(samples(metrics))
    for number in range(1000):
        await tiny.get(f"/items/id-{number:04d}/detail")
        await tiny.get(f"/unknown/id-{number:04d}")
    text = metrics.render()[0].decode()
    assert "id-0" not in text
    assert value(metrics, REQUESTS, route=ITEM_TEMPLATE, method="GET", status="200") == 1001
    assert value(metrics, REQUESTS, route="unmatched", method="GET", status="404") == 1000
    # Only the one "unmatched" counter and its histogram joined; the ids added nothing.
    unmatched_series = len([key for key in samples(metrics) if ("route", "unmatched") in key[1]])
    assert len(samples(metrics)) == series_before + unmatched_series


async def test_non_http_scopes_pass_through_uncounted(metrics: ProxyMetrics) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(_message: Message) -> None:
        return None

    await _observing(inner, metrics)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]
    assert label_values(metrics, REQUESTS, "route") == set()


# --- The /metrics endpoint -------------------------------------------------------------------


async def _render_problem(request: Request, exc: Exception) -> Response:
    # What the proxy's own handler does, without importing app.py.
    assert isinstance(exc, ProblemError)
    return Response(
        render_problem(exc, "test-request"),
        status_code=exc.response_status(),
        media_type=PROBLEM_CONTENT_TYPE,
        headers=exc.headers,
    )


def _metrics_app(metrics: ProxyMetrics, *, token: str, allowed_networks: list[str]) -> Starlette:
    handler = metrics_endpoint(metrics, token=token, allowed_networks=allowed_networks)
    return Starlette(
        routes=[Route("/metrics", handler, methods=["GET"])],
        exception_handlers={ProblemError: _render_problem},
    )


async def _scrape(
    app: Starlette, *, client_host: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/metrics", headers=headers)


async def test_metrics_needs_the_token_when_one_is_set(metrics: ProxyMetrics) -> None:
    app = _metrics_app(metrics, token=METRICS_TOKEN, allowed_networks=["127.0.0.0/8"])

    missing = await _scrape(app)
    assert missing.status_code == 401
    assert missing.headers["content-type"] == PROBLEM_CONTENT_TYPE
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "liveness_proxy" not in missing.text

    wrong = await _scrape(app, headers={"Authorization": f"Bearer {METRICS_TOKEN}x"})
    assert wrong.status_code == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]

    other_scheme = await _scrape(app, headers={"Authorization": f"Basic {METRICS_TOKEN}"})
    assert other_scheme.status_code == 401

    right = await _scrape(app, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert right.status_code == 200
    assert right.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert right.headers["cache-control"] == "no-store"
    assert "liveness_proxy_http_requests_total" in right.text


async def test_metrics_without_a_token_is_open_to_the_allowed_networks(metrics: ProxyMetrics) -> None:
    app = _metrics_app(metrics, token="", allowed_networks=["10.0.0.0/8", "127.0.0.0/8"])
    assert (await _scrape(app)).status_code == 200


@pytest.mark.parametrize(
    ("client_host", "allowed_networks", "status"),
    [
        ("192.0.2.7", ["127.0.0.0/8", "10.0.0.0/8"], 404),
        ("10.1.2.3", ["127.0.0.0/8", "10.0.0.0/8"], 200),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], 200),  # an IPv4 peer seen by a dual-stack listener
        ("2001:db8::1", ["fc00::/7"], 404),
        ("127.0.0.1", [], 404),  # an empty list allows nobody
        ("not-an-address", ["0.0.0.0/0"], 404),
    ],
)
async def test_metrics_is_hidden_from_clients_outside_the_allowed_networks(
    metrics: ProxyMetrics, client_host: str, allowed_networks: list[str], status: int
) -> None:
    app = _metrics_app(metrics, token=METRICS_TOKEN, allowed_networks=allowed_networks)
    # The right token does not help outside the networks: the endpoint looks like any unknown route.
    response = await _scrape(
        app, client_host=client_host, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert response.status_code == status
    if status == 404:
        assert response.json()["type"] == "urn:liveness-proxy:problem:not-found"


# --- Observer hooks: the token manager on its own --------------------------------------------


class ScriptedFetcher:
    """Answers token requests from a script: a token, or a TokenEndpointError."""

    def __init__(self, *answers: FetchedToken | TokenEndpointError) -> None:
        self.answers = list(answers)

    async def fetch(self) -> FetchedToken:
        answer = self.answers.pop(0)
        if isinstance(answer, TokenEndpointError):
            raise answer
        return answer


class SteppingClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _manager(fetcher: ScriptedFetcher, observer: RecordingObserver, clock: SteppingClock) -> TokenManager:
    return TokenManager(
        fetcher, refresh_margin=lambda _: 60.0, failure_backoff_seconds=5, clock=clock, observer=observer
    )


async def test_token_manager_reports_one_refresh_then_cache_hits() -> None:
    observer = RecordingObserver()
    tokens = _manager(ScriptedFetcher(FetchedToken("token-one", 3600)), observer, SteppingClock())
    for _ in range(3):
        await tokens.get()
    assert observer.refreshes == ["ok"]
    assert observer.cache == [False, True, True]


async def test_token_manager_reports_a_failed_refresh() -> None:
    observer = RecordingObserver()
    tokens = _manager(
        ScriptedFetcher(TokenEndpointError("token endpoint timed out")), observer, SteppingClock()
    )
    with pytest.raises(TokenUnavailable):
        await tokens.get()
    assert observer.refreshes == ["failed"]
    assert observer.cache == [False]


async def test_a_token_in_its_refresh_window_is_a_hit_while_it_is_replaced() -> None:
    observer = RecordingObserver()
    clock = SteppingClock()
    fetcher = ScriptedFetcher(FetchedToken("token-one", 3600), FetchedToken("token-two", 3600))
    tokens = _manager(fetcher, observer, clock)
    first = await tokens.get()
    clock.now += 3600 - 30  # inside the 60 s margin, not expired
    assert await tokens.get() is first  # the caller does not wait for the background refresh
    await asyncio.sleep(0)  # let the background refresh finish
    await asyncio.sleep(0)
    assert observer.cache == [False, True]
    assert observer.refreshes == ["ok", "ok"]
    await tokens.close()
