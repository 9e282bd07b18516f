"""Bearer token and X-Domain-Id checks in front of every liveness endpoint."""

from __future__ import annotations

import httpx
import pytest

from liveness_proxy.sandbox import ManualClock, Sandbox, SandboxConfig

from .flows import (
    RESULT_PATH_PREFIX,
    SESSION_PATH,
    SESSION_TOKEN_PATH,
    bearer_headers,
    fetch_access_token,
    post_session_token,
    request_token,
)


async def test_a_fresh_token_is_accepted(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    assert (await post_session_token(client, auth_headers)).status_code == 200


async def test_missing_authorization_is_401_with_challenge(client: httpx.AsyncClient) -> None:
    response = await post_session_token(client, {"X-Domain-Id": "sandbox-domain"})
    assert (response.status_code, response.json()["error"], response.headers["www-authenticate"]) == (
        401,
        "invalid_token",
        'Bearer error="invalid_token"',
    )


async def test_unknown_token_is_401(client: httpx.AsyncClient) -> None:
    response = await post_session_token(client, bearer_headers("sbx_made-up"))
    assert response.status_code == 401


async def test_non_bearer_scheme_is_401(client: httpx.AsyncClient) -> None:
    token = await fetch_access_token(client)
    response = await post_session_token(
        client, {"Authorization": f"Basic {token}", "X-Domain-Id": "sandbox-domain"}
    )
    assert response.status_code == 401


async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient) -> None:
    token = await fetch_access_token(client)
    response = await post_session_token(
        client, {"Authorization": f"bearer {token}", "X-Domain-Id": "sandbox-domain"}
    )
    assert response.status_code == 200


async def test_token_is_valid_until_just_before_its_lifetime_ends(
    client: httpx.AsyncClient, clock: ManualClock
) -> None:
    headers = bearer_headers(await fetch_access_token(client))
    clock.advance(28800 - 0.001)
    assert (await post_session_token(client, headers)).status_code == 200


async def test_token_expires_after_its_lifetime(client: httpx.AsyncClient, clock: ManualClock) -> None:
    headers = bearer_headers(await fetch_access_token(client))
    clock.advance(28800)
    assert (await post_session_token(client, headers)).status_code == 401


async def test_token_without_expires_in_lives_an_hour(clock: ManualClock) -> None:
    sandbox = Sandbox(SandboxConfig(clock=clock, token_lifetime_seconds=None))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://sandbox"
    ) as client:
        headers = bearer_headers(await fetch_access_token(client))
        clock.advance(3599)
        before = (await post_session_token(client, headers)).status_code
        clock.advance(1)
        after = (await post_session_token(client, headers)).status_code
    assert (before, after) == (200, 401)


async def test_revoked_tokens_are_401(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    sandbox.revoke_tokens()
    assert (await post_session_token(client, auth_headers)).status_code == 401


async def test_tokens_issued_after_revocation_work(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.revoke_tokens()
    headers = bearer_headers(await fetch_access_token(client))
    assert (await post_session_token(client, headers)).status_code == 200


async def test_tokens_survive_secret_rotation(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    sandbox.rotate_client_secret("new-secret")
    assert (await post_session_token(client, auth_headers)).status_code == 200


async def test_missing_domain_id_is_403(client: httpx.AsyncClient) -> None:
    token = await fetch_access_token(client)
    response = await post_session_token(client, {"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()["error"]) == (403, "invalid_domain")


async def test_wrong_domain_id_is_403(client: httpx.AsyncClient) -> None:
    headers = bearer_headers(await fetch_access_token(client), domain_id="other-domain")
    assert (await post_session_token(client, headers)).status_code == 403


async def test_authentication_is_checked_before_the_domain(client: httpx.AsyncClient) -> None:
    response = await post_session_token(client, {"X-Domain-Id": "other-domain"})
    assert response.status_code == 401


LIVENESS_ENDPOINTS = [
    ("POST", SESSION_TOKEN_PATH),
    ("POST", SESSION_PATH),
    ("GET", RESULT_PATH_PREFIX + "some-id"),
]


@pytest.mark.parametrize(("method", "path"), LIVENESS_ENDPOINTS)
async def test_every_liveness_endpoint_requires_a_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers={"X-Domain-Id": "sandbox-domain"})
    assert response.status_code == 401


@pytest.mark.parametrize(("method", "path"), LIVENESS_ENDPOINTS)
async def test_every_liveness_endpoint_requires_the_domain(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    token = (await request_token(client)).json()["access_token"]
    response = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
