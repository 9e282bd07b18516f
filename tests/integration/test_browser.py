"""Browser callers through the running proxy: CORS for an exact allow-list, and security headers on
every response."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx

from support import ProxyHarness

ORIGIN = "https://app.example.com"
MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def _cors_proxy(make_proxy: MakeProxy) -> AbstractContextManager[ProxyHarness]:
    return make_proxy(proxy_overrides={"LIVENESS_PROXY_CORS_ORIGINS": f"{ORIGIN},http://localhost:3000"})


def _preflight(
    origin: str, method: str = "POST", headers: str = "authorization, content-type"
) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


def test_preflight_from_an_allowed_origin_is_answered(make_proxy: MakeProxy) -> None:
    with _cors_proxy(make_proxy) as proxy, proxy.client() as client:
        response = client.options("/v1/liveness/sessions", headers=_preflight(ORIGIN))
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in response.headers
    assert "Origin" in response.headers["vary"]


def test_preflight_from_other_origins_methods_or_headers_is_refused(make_proxy: MakeProxy) -> None:
    with _cors_proxy(make_proxy) as proxy, proxy.client() as client:
        refused = [
            client.options("/v1/liveness/sessions", headers=_preflight("https://evil.example.com")),
            client.options("/v1/liveness/sessions", headers=_preflight("https://app.example.com.evil.net")),
            client.options("/v1/liveness/sessions", headers=_preflight("null")),
            client.options("/v1/liveness/sessions", headers=_preflight(ORIGIN, method="DELETE")),
            client.options("/v1/liveness/sessions", headers=_preflight(ORIGIN, headers="x-domain-id")),
        ]
    for response in refused:
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert "access-control-allow-origin" not in response.headers


def test_actual_requests_get_allow_origin_only_for_allowed_origins(make_proxy: MakeProxy) -> None:
    with _cors_proxy(make_proxy) as proxy, proxy.client() as client:
        allowed = client.post(
            "/v1/liveness/session-token", headers={**proxy.auth(), "Origin": "http://localhost:3000"}
        )
        foreign = client.post(
            "/v1/liveness/session-token", headers={**proxy.auth(), "Origin": "https://evil.example.com"}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "X-Request-ID" in allowed.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in foreign.headers
    assert "Origin" in foreign.headers["vary"]


def test_without_configured_origins_there_is_no_cors_at_all(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    preflight = client.options("/v1/liveness/sessions", headers=_preflight(ORIGIN))
    actual = client.post("/v1/liveness/session-token", headers={**proxy.auth(), "Origin": ORIGIN})
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in actual.headers


def test_security_headers_on_every_kind_of_response(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    responses = [
        client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()),
        client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth(proxy.keys.bob)),
        client.post("/v1/liveness/session-token"),
        client.get("/no/such/route"),
        client.get("/healthz"),
        client.get("/readyz"),
        client.get("/openapi.json"),
    ]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.url, name)
        assert "strict-transport-security" not in response.headers  # plain HTTP here
    for response in responses[:4]:
        assert response.headers["cache-control"] == "no-store"
