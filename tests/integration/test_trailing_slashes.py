"""No redirects: a path with a trailing slash is an unknown path. Starlette's router would answer it
with a 307 to `http://<the client's Host>/…`, before authentication and without an audit record, and
`/metrics/` would give away the `/metrics` that a 404 hides."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx

from liveness_proxy.api.routes import ROUTES
from support import ProxyHarness

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SOME_SESSION_ID = "00000000-0000-0000-0000-000000000000"


def assert_unknown_path(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.request.url, response.status_code)
    assert "location" not in response.headers
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "urn:liveness-proxy:problem:not-found"
    assert body["request_id"] == response.headers["x-request-id"]


def test_every_route_with_a_trailing_slash_is_an_unknown_path_and_not_audited(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    rows_before = len(proxy.audit_rows())
    for route in ROUTES:
        path = route.path.replace("{session_id}", SOME_SESSION_ID) + "/"
        # As a real caller would send it: a valid credential, and a body where the route takes one.
        answer = client.request(
            route.method,
            path,
            headers={**proxy.auth(proxy.keys.admin), "X-Request-ID": "slash-1"},
            json={} if route.method == "POST" else None,
        )
        assert_unknown_path(answer)
        assert answer.headers["x-request-id"] == "slash-1"
    assert len(proxy.audit_rows()) == rows_before
    assert proxy.upstream_paths() == []  # nothing reached the upstream either


def test_metrics_with_a_slash_hides_like_metrics(make_proxy: MakeProxy) -> None:
    """Disabled, or closed to this address: `/metrics/` answers exactly like `/metrics`."""
    settings = (
        {"LIVENESS_PROXY_METRICS_ENABLED": False},
        {"LIVENESS_PROXY_METRICS_ALLOWED_NETWORKS": "10.0.0.0/8"},
    )
    for overrides in settings:
        with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
            plain, slashed = client.get("/metrics"), client.get("/metrics/")
        assert plain.status_code == 404
        assert_unknown_path(slashed)
        assert slashed.json()["detail"] == plain.json()["detail"]
