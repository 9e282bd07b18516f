"""/metrics through the running proxy: what it reports (without ids), and its token or switch-off."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager

from support import ProxyHarness

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]


def test_metrics_report_routes_upstream_tokens_limits_and_audit_without_ids(make_proxy: MakeProxy) -> None:
    overrides = {"LIVENESS_PROXY_RATE_LIMIT_RESULT": "2/minute"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        session_id = proxy.create_session(client)
        for _ in range(3):
            client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
        client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth(proxy.keys.bob))
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    def value(pattern: str) -> float:
        match = re.search(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)
        assert match is not None, pattern
        return float(match.group(1))

    result_route = '"/v1/liveness/sessions/{session_id}/result"'
    assert (
        value(rf'liveness_proxy_http_requests_total\{{method="GET",route={result_route},status="200"\}}') == 2
    )
    assert (
        value(rf'liveness_proxy_http_requests_total\{{method="GET",route={result_route},status="429"\}}') == 1
    )
    assert value(r'liveness_proxy_rate_limited_requests_total\{limit="result"\}') == 1
    assert value(r'liveness_proxy_upstream_requests_total\{endpoint="result",outcome="200"\}') == 2
    assert value(r'liveness_proxy_upstream_requests_total\{endpoint="create_session",outcome="200"\}') == 1
    assert value(r'liveness_proxy_upstream_token_refreshes_total\{outcome="ok"\}') == 1
    assert value(r'liveness_proxy_upstream_token_cache_lookups_total\{result="hit"\}') >= 3
    assert value(r"liveness_proxy_audit_batch_records_count") >= 1
    assert value(r"liveness_proxy_audit_commit_duration_seconds_count") >= 1
    assert value(r"liveness_proxy_upstream_calls_in_flight") == 0
    assert session_id not in text
    assert "alice" not in text


def test_metrics_can_require_a_token_or_be_switched_off(make_proxy: MakeProxy) -> None:
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_METRICS_TOKEN": "metrics-token-" + "m" * 20}) as guarded,
        guarded.client() as client,
    ):
        anonymous = client.get("/metrics")
        with_token = client.get("/metrics", headers={"Authorization": "Bearer metrics-token-" + "m" * 20})
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_METRICS_ENABLED": False}) as off, off.client() as client:
        absent = client.get("/metrics")
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_METRICS_ALLOWED_NETWORKS": "10.0.0.0/8"}) as far,
        far.client() as client,
    ):
        outside = client.get("/metrics")
    assert anonymous.status_code == 401
    assert with_token.status_code == 200
    assert absent.status_code == 404
    assert outside.status_code == 404
