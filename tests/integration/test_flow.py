"""The whole liveness flow through the proxy, against the sandbox over loopback."""

from __future__ import annotations

import httpx

from support import DOMAIN_ID, ProxyHarness


def test_session_token_returns_the_upstream_one_time_token(proxy: ProxyHarness, client: httpx.Client) -> None:
    response = client.post("/v1/liveness/session-token", headers=proxy.auth())
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["session_token"], str)
    assert body["session_token"]
    assert body["expires_in"] == 300
    assert response.headers["cache-control"] == "no-store"


def test_create_session_binds_it_and_points_at_the_result(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    owner = proxy.app.service.ownership
    assert owner._cache[session_id].subject == "alice"
    response = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
    assert response.status_code == 200
    assert response.json()["status"] == "CREATED"


def test_completed_live_session_reads_succeeded_without_images(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.complete_session(session_id, live=True)
    body = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()).json()
    assert body["status"] == "SUCCEEDED"
    assert body["confidence"] > 90
    assert "reference_image" not in body
    assert "audit_images" not in body
    assert body["redacted_fields"] == ["audit_images", "reference_image"]


def test_spoof_session_reads_failed(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.complete_session(session_id, live=False)
    body = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()).json()
    assert body["status"] == "FAILED"
    assert body["confidence"] < 50


def test_every_upstream_call_carries_token_domain_and_request_id(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    client.post("/v1/liveness/session-token", headers={**proxy.auth(), "X-Request-ID": "trace-123"})
    liveness_calls = [r for r in proxy.sandbox.request_log if "liveness-v2" in r.path]
    assert len(liveness_calls) == 1
    headers = liveness_calls[0].headers
    assert headers["authorization"].startswith("Bearer sbx_")
    assert headers["x-domain-id"] == DOMAIN_ID
    assert headers["x-request-id"] == "trace-123"
