"""The security layer through the running proxy: JWT callers beside API keys, and /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from integration.test_jwt import AUDIENCE, ISSUER, JwksEndpoint, rsa_jwk, sign
from support import ProxyHarness, ServerThread

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SESSION_TOKEN = "/v1/liveness/session-token"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def identity_provider(signing_key: rsa.RSAPrivateKey) -> Iterator[tuple[str, JwksEndpoint]]:
    endpoint = JwksEndpoint(keys=[rsa_jwk(signing_key, "rsa-1")])
    server = ServerThread(endpoint.app(), lifespan="off").start()
    yield f"{server.url}/jwks.json", endpoint
    server.stop()


def _jwt_proxy(make_proxy: MakeProxy, jwks_url: str) -> AbstractContextManager[ProxyHarness]:
    return make_proxy(
        proxy_overrides={
            "LIVENESS_PROXY_JWT_JWKS_URL": jwks_url,
            "LIVENESS_PROXY_JWT_ISSUER": ISSUER,
            "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
        }
    )


def test_jwt_callers_own_their_sessions_beside_api_key_callers(
    make_proxy: MakeProxy, identity_provider: tuple[str, JwksEndpoint], signing_key: rsa.RSAPrivateKey
) -> None:
    jwks_url, endpoint = identity_provider
    dana = {"Authorization": f"Bearer {sign(signing_key, sub='dana')}"}
    erin = {"Authorization": f"Bearer {sign(signing_key, sub='erin')}"}
    admin = {"Authorization": f"Bearer {sign(signing_key, sub='ops-bot', scope='liveness:admin')}"}
    with _jwt_proxy(make_proxy, jwks_url) as proxy, proxy.client() as client:
        token = client.post(SESSION_TOKEN, headers=dana).json()["session_token"]
        created = client.post("/v1/liveness/sessions", headers=dana, json={"session_token": token})
        session_id = created.json()["session_id"]
        own = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=dana)
        foreign = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=erin)
        by_admin = client.get(f"/v1/liveness/sessions/{session_id}", headers=admin)
        api_key_still_works = client.post(SESSION_TOKEN, headers=proxy.auth())
        expired = client.post(
            SESSION_TOKEN, headers={"Authorization": f"Bearer {sign(signing_key, exp=1_000_000)}"}
        )
        audit = proxy.audit_rows()
    assert created.status_code == 201
    assert own.status_code == 200
    assert foreign.status_code == 404
    assert by_admin.json()["subject"] == "dana"
    assert api_key_still_works.status_code == 200
    assert expired.status_code == 401
    assert "invalid_token" in expired.headers["www-authenticate"]
    assert audit[0]["subject"] == "dana"
    assert audit[0]["credential_id"] == "jwt:rsa-1"
    assert endpoint.requests == 1  # fetched once at start-up, then served from the cache


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


def test_jwt_without_issuer_or_audience_is_accepted_but_warned_about(
    make_proxy: MakeProxy, identity_provider: tuple[str, JwksEndpoint], signing_key: rsa.RSAPrivateKey
) -> None:
    jwks_url, _ = identity_provider
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_JWT_JWKS_URL": jwks_url}) as proxy,
        proxy.client() as client,
    ):
        other_app = sign(signing_key, aud="some-other-app")
        response = client.post(SESSION_TOKEN, headers={"Authorization": f"Bearer {other_app}"})
        log = proxy.log_text()
    assert response.status_code == 200
    warning = next(line for line in log.splitlines() if "jwt_claims_not_checked" in line)
    assert "LIVENESS_PROXY_JWT_ISSUER" in warning
    assert "LIVENESS_PROXY_JWT_AUDIENCE" in warning


def test_one_json_log_line_per_request_with_route_template_subject_and_upstream_status(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    session_id = proxy.create_session(client)
    response = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
    line = proxy.access_line(response.headers["x-request-id"])
    request_lines = proxy.log_events("request")
    assert line["route"] == "/v1/liveness/sessions/{session_id}/result"
    assert line["method"] == "GET"
    assert line["status"] == 200
    assert line["subject"] == "alice"
    assert line["upstream_status"] == 200
    assert line["duration_ms"] > 0
    assert line["level"] == "info"
    assert session_id not in json.dumps(request_lines)  # the template, never the raw path
