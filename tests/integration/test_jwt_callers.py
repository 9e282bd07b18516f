"""JWT callers through the running proxy: they own their sessions beside API-key callers, and a JWT
policy without issuer or audience is accepted but warned about."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

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


def test_jwt_with_any_audience_allowed_and_no_issuer_is_accepted_but_warned_about(
    make_proxy: MakeProxy, identity_provider: tuple[str, JwksEndpoint], signing_key: rsa.RSAPrivateKey
) -> None:
    jwks_url, _ = identity_provider
    overrides = {"LIVENESS_PROXY_JWT_JWKS_URL": jwks_url, "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE": "true"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        other_app = sign(signing_key, aud="some-other-app")
        response = client.post(SESSION_TOKEN, headers={"Authorization": f"Bearer {other_app}"})
        log = proxy.log_text()
    assert response.status_code == 200
    warning = next(line for line in log.splitlines() if "jwt_claims_not_checked" in line)
    assert "LIVENESS_PROXY_JWT_ISSUER" in warning
    assert "LIVENESS_PROXY_JWT_AUDIENCE" in warning


def test_the_reference_comes_from_the_jwt_claim_never_from_the_body(
    make_proxy: MakeProxy, identity_provider: tuple[str, JwksEndpoint], signing_key: rsa.RSAPrivateKey
) -> None:
    jwks_url, _endpoint = identity_provider
    settings = {
        "LIVENESS_PROXY_JWT_JWKS_URL": jwks_url,
        "LIVENESS_PROXY_JWT_ISSUER": ISSUER,
        "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
        "LIVENESS_PROXY_JWT_REFERENCE_CLAIM": "application_id",
        # A member the operator lets through to Cynopsis, so the body below is accepted at all.
        "LIVENESS_PROXY_EXTRA_BODY_FIELDS": "reference",
    }
    dana = {"Authorization": f"Bearer {sign(signing_key, sub='dana', application_id='loan-42')}"}
    no_claim = {"Authorization": f"Bearer {sign(signing_key, sub='erin')}"}
    unusable = {"Authorization": f"Bearer {sign(signing_key, sub='finn', application_id=['a', 'b'])}"}
    admin = {"Authorization": f"Bearer {sign(signing_key, sub='ops-bot', scope='liveness:admin')}"}
    with make_proxy(proxy_overrides=settings) as proxy, proxy.client() as client:

        def create(headers: dict[str, str]) -> str:
            token = client.post(SESSION_TOKEN, headers=headers).json()["session_token"]
            # A body that tries to set the reference is forwarded upstream, never believed.
            body = {"session_token": token, "reference": "forged-by-the-frontend"}
            created = client.post("/v1/liveness/sessions", headers=headers, json=body)
            assert created.status_code == 201, created.text
            return str(created.json()["session_id"])

        with_reference, without = create(dana), create(no_claim)
        records = {
            session_id: client.get(f"/v1/liveness/sessions/{session_id}", headers=admin).json()
            for session_id in (with_reference, without)
        }
        listed = client.get("/v1/liveness/sessions", params={"reference": "loan-42"}, headers=admin).json()
        refused = client.post(SESSION_TOKEN, headers=unusable)
    assert records[with_reference]["reference"] == "loan-42"
    assert records[without]["reference"] is None
    assert [session["session_id"] for session in listed["sessions"]] == [with_reference]
    assert refused.status_code == 401
    assert refused.json()["detail"] == "The token's reference claim is not usable."
