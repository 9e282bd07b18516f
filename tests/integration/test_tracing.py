"""Tracing end to end: the proxy exports over OTLP/HTTP (the real SDK exporter) to a real receiver
that decodes the protobuf (tests/otlp_receiver.py), and what arrives is checked span by span."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Mount

from liveness_proxy import create_app
from liveness_proxy.auth import Caller
from otlp_receiver import OtlpReceiver, ReceivedSpan, render_tree
from support import ProxyHarness, ServerThread, find_leaks, proxy_settings, upstream_sandbox, wait_until
from webhook_receiver import WebhookReceiver

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
RESULT_ROUTE = "GET /v1/liveness/sessions/{session_id}/result"


@contextmanager
def traced_proxy(make_proxy: MakeProxy, **overrides: Any) -> Iterator[tuple[ProxyHarness, OtlpReceiver]]:
    with OtlpReceiver() as receiver:
        settings = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **overrides}
        with make_proxy(proxy_overrides=settings) as proxy:
            yield proxy, receiver


def flush(proxy: ProxyHarness) -> None:
    assert proxy.app.service.tracing.force_flush()


def one(spans: list[ReceivedSpan], name: str, **attributes: object) -> ReceivedSpan:
    found = [
        span
        for span in spans
        if span.name == name and all(span.attributes.get(key) == value for key, value in attributes.items())
    ]
    assert len(found) == 1, f"{name} {attributes}: {len(found)} in\n{render_tree(spans)}"
    return found[0]


def token_lines(proxy: ProxyHarness) -> list[dict[str, Any]]:
    return [line for line in proxy.log_events("request") if line["route"] == "/v1/liveness/session-token"]


def sampled_traceparent(trace_id: str, span_id: str) -> Callable[[str], bool]:
    """Whether a traceparent names this span as sampled (the SDK may also set W3C level 2's
    "random" flag, 0x02)."""

    def names(value: str) -> bool:
        version, trace, span, flags = value.split("-")
        return (version, trace, span) == ("00", trace_id, span_id) and int(flags, 16) & 1 == 1

    return names


def children_of(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[str]:
    return sorted(span.name for span in spans if span.parent_span_id == parent.span_id)


def test_a_result_read_is_one_trace_continuing_the_trusted_callers(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True)
        response = client.get(
            f"/v1/liveness/sessions/{session_id}/result",
            headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT, "tracestate": "vendor=private"},
        )
        assert response.status_code == 200
        flush(proxy)
        spans = receiver.traces()[CALLER_TRACE]
        sandbox_requests = list(proxy.sandbox.request_log)
        # Written once the answer has gone out: waited for.
        access = wait_until(
            lambda: [line for line in proxy.log_events("request") if line["route"].endswith("/result")]
        )
    server = one(spans, RESULT_ROUTE)
    # Continued: the caller's trace and its span as our parent (the test client is on loopback,
    # a trusted forwarder by default).
    assert server.kind == "SERVER"
    assert server.parent_span_id == CALLER_SPAN
    assert server.attributes["http.route"] == "/v1/liveness/sessions/{session_id}/result"
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["liveness_proxy.request_id"] == response.headers["x-request-id"]
    assert children_of(spans, server) == ["GET", "audit commit", "authenticate", "limits"]
    upstream = one(spans, "GET", **{"liveness_proxy.upstream.endpoint": "result"})
    assert upstream.kind == "CLIENT"
    assert str(upstream.attributes["url.template"]).endswith("{session_id}")
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.resource_attributes["service.name"] == "liveness-proxy"
    # Cynopsis got our client span's traceparent, never the caller's header or its tracestate.
    [result_call] = [r for r in sandbox_requests if r.path.endswith(session_id)]
    assert sampled_traceparent(CALLER_TRACE, upstream.span_id)(result_call.headers["traceparent"])
    assert "tracestate" not in result_call.headers
    # The access log names the trace next to the request id.
    assert access[-1]["trace_id"] == CALLER_TRACE
    assert access[-1]["request_id"] == response.headers["x-request-id"]
    # The session id is in no span: routes are templates, the upstream path too.
    assert session_id not in render_tree(spans, attributes=None)
    assert all(session_id not in str(span.attributes) for span in spans)


def test_an_untrusted_callers_traceparent_is_only_a_link(make_proxy: MakeProxy) -> None:
    # The in-process client is 127.0.0.1: not among these forwarders.
    with (
        traced_proxy(make_proxy, FORWARDED_ALLOW_IPS="10.9.9.9") as (proxy, receiver),
        proxy.client() as client,
    ):
        response = client.post(
            "/v1/liveness/session-token", headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT}
        )
        assert response.status_code == 200
        flush(proxy)
        spans = receiver.spans()
    server = one(spans, "POST /v1/liveness/session-token")
    assert server.trace_id != CALLER_TRACE
    assert server.parent_span_id is None
    [link] = server.links
    assert (link.trace_id, link.span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert CALLER_TRACE not in {span.trace_id for span in spans}


def test_trust_incoming_continues_any_callers_trace(make_proxy: MakeProxy) -> None:
    overrides = {"FORWARDED_ALLOW_IPS": "10.9.9.9", "LIVENESS_PROXY_TRACE_TRUST_INCOMING": True}
    with traced_proxy(make_proxy, **overrides) as (proxy, receiver), proxy.client() as client:
        client.post("/v1/liveness/session-token", headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT})
        flush(proxy)
        server = one(receiver.spans(), "POST /v1/liveness/session-token")
    assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert server.links == []


def test_an_outsider_cannot_force_sampling(make_proxy: MakeProxy) -> None:
    """Sampling 0%: a sampled traceparent from an untrusted caller exports nothing."""
    overrides = {
        "FORWARDED_ALLOW_IPS": "10.9.9.9",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    with traced_proxy(make_proxy, **overrides) as (proxy, receiver), proxy.client() as client:
        for _ in range(5):
            client.post(
                "/v1/liveness/session-token", headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT}
            )
        flush(proxy)
        tokens = [r for r in proxy.sandbox.request_log if r.path.endswith("get_session_token")]
        wait_until(lambda: len(token_lines(proxy)) == 5)
        access = token_lines(proxy)
    assert receiver.spans() == []
    # Not sampled, still one trace id per request (in the access log), and Cynopsis gets a
    # traceparent saying "not sampled".
    assert all(line["trace_id"] and line["trace_id"] != CALLER_TRACE for line in access)
    assert len(tokens) == 5
    assert all(int(r.headers["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0 for r in tokens)


def test_garbage_traceparents_start_a_new_trace(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        for garbage in (
            "00-zz",
            f"00-{'0' * 32}-{CALLER_SPAN}-01",
            "x" * 4000,
            f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",
        ):
            response = client.post(
                "/v1/liveness/session-token", headers={**proxy.auth(), "traceparent": garbage}
            )
            assert response.status_code == 200
        flush(proxy)
        servers = [span for span in receiver.spans() if span.kind == "SERVER"]
    assert len(servers) == 4
    assert all(span.parent_span_id is None and span.links == [] for span in servers)


def test_health_readiness_and_metrics_are_not_traced(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200
        client.get("/no/such/route")
        flush(proxy)
        spans = [span for span in receiver.spans() if span.kind == "SERVER"]
    # Only the unmatched request: named by its method, no route (the raw path is never a name).
    assert [(span.name, span.attributes.get("http.response.status_code")) for span in spans] == [("GET", 404)]
    assert "http.route" not in spans[0].attributes


def test_the_token_refresh_a_request_waited_for_is_its_own_trace_linked_both_ways(
    make_proxy: MakeProxy,
) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        response = client.post("/v1/liveness/session-token", headers=proxy.auth())
        assert response.status_code == 200
        flush(proxy)
        spans = receiver.spans()
        [token_call] = [r for r in proxy.sandbox.request_log if r.path == "/oauth/token"]
    server = one(spans, "POST /v1/liveness/session-token")
    wait = one(spans, "upstream token wait")
    refresh = one(spans, "upstream token refresh")
    token_post = one(spans, "POST", **{"liveness_proxy.upstream.endpoint": "token"})
    assert wait.parent_span_id == server.span_id
    assert refresh.trace_id != server.trace_id
    assert refresh.parent_span_id is None
    assert [(link.trace_id, link.span_id) for link in wait.links] == [(refresh.trace_id, refresh.span_id)]
    assert [(link.trace_id, link.span_id) for link in refresh.links] == [
        (server.trace_id, wait.parent_span_id)
    ]
    assert token_post.parent_span_id == refresh.span_id
    assert sampled_traceparent(refresh.trace_id, token_post.span_id)(token_call.headers["traceparent"])


def test_failures_are_errors_with_a_type_and_no_message(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        refused = client.post(
            "/v1/liveness/session-token", headers={"Authorization": "Bearer lpk_0123456789abcdef_nope"}
        )
        assert refused.status_code == 401
        missing = client.get("/v1/liveness/sessions/no-such-session/result", headers=proxy.auth())
        assert missing.status_code == 404
        flush(proxy)
        spans = receiver.spans()
    authenticate = [span for span in spans if span.name == "authenticate" and span.status_code == "ERROR"]
    assert [span.attributes["error.type"] for span in authenticate] == ["unauthenticated"]
    assert all(span.status_message == "" for span in spans)
    assert all(span.events == [] for span in spans)  # no exception events: they quote messages
    # A 4xx is the caller's: the server span is not an error.
    assert all(span.status_code != "ERROR" for span in spans if span.kind == "SERVER")


def test_exported_spans_leak_no_secret_subject_or_image(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True)
        client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
        client.post("/v1/liveness/session-token", headers={"Authorization": f"Bearer {proxy.keys.bob}x"})
        flush(proxy)
        raw = b"".join(receiver.raw_bodies())
        spans = receiver.spans()
    assert spans
    text = raw.decode("latin-1")
    assert find_leaks(text) == []
    for value in (proxy.keys.alice, proxy.keys.bob, "alice", session_id):
        assert value not in text


def test_cors_preflight_allows_a_browser_to_send_traceparent(make_proxy: MakeProxy) -> None:
    origin = "https://app.example"
    with traced_proxy(make_proxy, LIVENESS_PROXY_CORS_ORIGINS=origin) as (proxy, receiver):
        with proxy.client() as client:
            preflight = client.options(
                "/v1/liveness/session-token",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, traceparent, tracestate",
                },
            )
            traced = client.post(
                "/v1/liveness/session-token",
                headers={**proxy.auth(), "Origin": origin, "traceparent": CALLER_TRACEPARENT},
            )
        flush(proxy)
        server = one(receiver.spans(), "POST /v1/liveness/session-token")
    assert preflight.status_code == 204
    allowed = {name.strip() for name in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"traceparent", "tracestate"} <= allowed
    assert traced.status_code == 200
    assert server.trace_id == CALLER_TRACE


def test_with_tracing_off_nothing_is_sent_or_logged(proxy: ProxyHarness, client: httpx.Client) -> None:
    assert not proxy.app.service.tracing.enabled
    client.post("/v1/liveness/session-token", headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT})
    assert all("traceparent" not in r.headers for r in proxy.sandbox.request_log)
    assert all(line["trace_id"] is None for line in wait_until(lambda: token_lines(proxy)))


FOLLOWED = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.8",
    "LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS": 5,
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
    "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2",
}


def test_one_attempt_is_one_trace_from_the_frontend_to_the_customers_backend(make_proxy: MakeProxy) -> None:
    """The frontend's create, the finalizer's polls, the verdict's webhook and the backend that
    receives it: one trace, the one the (trusted) frontend started."""
    with WebhookReceiver() as backend:
        backend_port = urlsplit(backend.url).port
        overrides = {**FOLLOWED, **backend.settings()}
        with traced_proxy(make_proxy, **overrides) as (proxy, receiver), proxy.client() as client:
            traced = {**proxy.auth(), "traceparent": CALLER_TRACEPARENT}
            token = client.post("/v1/liveness/session-token", headers=traced).json()["session_token"]
            created = client.post("/v1/liveness/sessions", headers=traced, json={"session_token": token})
            assert created.status_code == 201
            session_id = created.json()["session_id"]
            proxy.sandbox.complete_session(session_id, live=True)
            [delivery] = backend.wait_for(1)
            receiver.wait_for(lambda span: span.name == "webhook delivery", timeout=10)
            flush(proxy)
            spans = receiver.traces()[CALLER_TRACE]
    create = one(spans, "POST /v1/liveness/sessions")
    assert create.parent_span_id == CALLER_SPAN
    polls = [span for span in spans if span.name == "finalizer poll"]
    assert polls, render_tree(spans)
    assert all(span.parent_span_id == create.span_id for span in polls)
    terminal_poll = polls[-1]
    assert children_of(spans, terminal_poll)[:1] == ["GET"]
    delivery_span = one(spans, "webhook delivery")
    # The verdict was recorded by the finalizer's poll: the delivery follows from it.
    assert delivery_span.parent_span_id == terminal_poll.span_id
    assert delivery_span.attributes["liveness_proxy.webhook.event_id"] == delivery.webhook_id
    post = one(spans, "POST", **{"server.port": backend_port})
    assert post.parent_span_id == delivery_span.span_id
    assert post.kind == "CLIENT"
    # The backend joins the trace: its traceparent names our webhook POST.
    assert sampled_traceparent(CALLER_TRACE, post.span_id)(delivery.headers["traceparent"])
    assert "tracestate" not in delivery.headers
    tree = render_tree(spans, durations=False)
    assert session_id not in tree
    assert "alice" not in tree


def test_latency_exemplars_name_sampled_traces_for_an_openmetrics_scraper(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, _receiver), proxy.client() as client:
        session_id = proxy.create_session(client)
        read = client.get(
            f"/v1/liveness/sessions/{session_id}/result",
            headers={**proxy.auth(), "traceparent": CALLER_TRACEPARENT},
        )
        assert read.status_code == 200
        wait_until(lambda: any(line["route"].endswith("/result") for line in proxy.log_events("request")))
        openmetrics = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        plain = client.get("/metrics")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [
        line
        for line in openmetrics.text.splitlines()
        if line.startswith(
            (
                "liveness_proxy_http_request_duration_seconds_bucket",
                "liveness_proxy_upstream_request_duration_seconds_bucket",
            )
        )
        and "# {" in line
    ]
    assert any(
        'route="/v1/liveness/sessions/{session_id}/result"' in line and CALLER_TRACE in line
        for line in exemplars
    )
    assert any('endpoint="result"' in line and CALLER_TRACE in line for line in exemplars)
    assert "# {" not in plain.text


def test_readiness_waiting_for_a_first_token_starts_no_trace_of_its_own(make_proxy: MakeProxy) -> None:
    with traced_proxy(make_proxy) as (proxy, receiver), proxy.client() as client:
        assert client.get("/readyz").status_code == 200  # waited for the first token
        flush(proxy)
        spans = receiver.spans()
    # The token refresh is real work, a root of its own (as is the worker's retention sweep); the
    # probe made nothing else.
    roots = {span.name for span in spans if span.parent_span_id is None}
    assert roots <= {"upstream token refresh", "retention sweep"}
    assert "upstream token refresh" in roots
    assert "upstream token wait" not in {span.name for span in spans}
    assert all(span.kind != "SERVER" for span in spans)


def test_mounted_in_a_host_the_prefixed_operational_routes_are_not_traced(tmp_path: Path) -> None:
    sandbox = upstream_sandbox()
    sandbox_server = ServerThread(sandbox.app, lifespan="off").start()
    try:
        with OtlpReceiver() as receiver:
            settings = proxy_settings(
                sandbox_server.url, tmp_path / "proxy.db", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint
            )
            proxy = create_app(settings, authenticate_caller=host_hook, migrate=True)

            @contextlib.asynccontextmanager
            async def lifespan(_app: Starlette) -> AsyncIterator[None]:
                async with proxy.running():
                    yield

            host = Starlette(routes=[Mount("/kyc/liveness", app=proxy)], lifespan=lifespan)
            host_server = ServerThread(host).start()
            try:
                with httpx.Client(
                    base_url=host_server.url, headers={"X-Host-User": "zoe@example.com"}
                ) as client:
                    for path in ("/healthz", "/readyz", "/metrics"):
                        client.get(f"/kyc/liveness{path}")
                    assert client.post("/kyc/liveness/v1/liveness/session-token").status_code == 200
                    assert proxy.service.tracing.force_flush()
            finally:
                host_server.stop()
            spans = receiver.spans()
    finally:
        sandbox_server.stop()
    [server] = [span for span in spans if span.kind == "SERVER"]
    assert server.name == "POST /v1/liveness/session-token"
    # The host's own credential id is an e-mail here: the span says only that the host vouched.
    assert one(spans, "authenticate").attributes["liveness_proxy.credential.kind"] == "host"
    assert "zoe@" not in render_tree(spans)


async def host_hook(request: HTTPConnection) -> Caller | None:
    user = request.headers.get("x-host-user")
    return None if user is None else Caller(subject=user, scopes=frozenset(), credential_id=user)
