"""POST /oauth/token: the OAuth2 client-credentials grant."""

from __future__ import annotations

import httpx
import pytest

from liveness_proxy.sandbox import ManualClock, Sandbox, SandboxConfig

from .flows import TOKEN_PATH, request_token

FORM = "application/x-www-form-urlencoded"


async def test_valid_credentials_get_a_bearer_token(client: httpx.AsyncClient) -> None:
    response = await request_token(client)
    body = response.json()
    assert (response.status_code, body["token_type"], body["expires_in"], body["scope"]) == (
        200,
        "Bearer",
        28800,
        "liveness",
    )


async def test_access_tokens_are_opaque_and_unique(client: httpx.AsyncClient) -> None:
    first = (await request_token(client)).json()["access_token"]
    second = (await request_token(client)).json()["access_token"]
    assert first.startswith("sbx_")
    assert first != second


async def test_token_response_omits_expires_in_when_lifetime_is_unset(clock: ManualClock) -> None:
    sandbox = Sandbox(SandboxConfig(clock=clock, token_lifetime_seconds=None))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://sandbox"
    ) as client:
        body = (await request_token(client)).json()
    assert "expires_in" not in body


async def test_wrong_secret_is_invalid_client(client: httpx.AsyncClient) -> None:
    response = await request_token(client, client_secret="wrong")
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


async def test_unknown_client_id_is_invalid_client(client: httpx.AsyncClient) -> None:
    response = await request_token(client, client_id="someone-else")
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


async def test_missing_credentials_are_invalid_client(client: httpx.AsyncClient) -> None:
    response = await client.post(TOKEN_PATH, data={"grant_type": "client_credentials"})
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


async def test_other_grant_types_are_unsupported(client: httpx.AsyncClient) -> None:
    response = await request_token(client, grant_type="password")
    assert (response.status_code, response.json()["error"]) == (400, "unsupported_grant_type")


async def test_missing_grant_type_is_invalid_request(client: httpx.AsyncClient) -> None:
    response = await client.post(
        TOKEN_PATH, data={"client_id": "sandbox-client", "client_secret": "sandbox-secret"}
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


async def test_json_body_is_invalid_request(client: httpx.AsyncClient) -> None:
    response = await client.post(
        TOKEN_PATH,
        json={
            "grant_type": "client_credentials",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
        },
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


async def test_repeated_form_field_is_invalid_request(client: httpx.AsyncClient) -> None:
    body = b"grant_type=client_credentials&client_id=sandbox-client&client_secret=a&client_secret=b"
    response = await client.post(TOKEN_PATH, content=body, headers={"Content-Type": FORM})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


async def test_form_with_charset_and_percent_encoding_is_parsed(clock: ManualClock) -> None:
    sandbox = Sandbox(SandboxConfig(clock=clock, client_secret="s3cr&t=+ü"))
    body = b"grant_type=client_credentials&client_id=sandbox-client&client_secret=s3cr%26t%3D%2B%C3%BC"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://sandbox"
    ) as client:
        response = await client.post(
            TOKEN_PATH, content=body, headers={"Content-Type": f"{FORM}; charset=UTF-8"}
        )
    assert response.status_code == 200, response.text


async def test_get_on_the_token_endpoint_is_405(client: httpx.AsyncClient) -> None:
    response = await client.get(TOKEN_PATH)
    assert (response.status_code, response.json()["error"]) == (405, "method_not_allowed")


async def test_tokens_issued_counts_only_successes(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await request_token(client)
    await request_token(client, client_secret="wrong")
    await request_token(client)
    assert sandbox.tokens_issued == 2


async def test_token_requests_counts_every_call(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await request_token(client)
    await request_token(client, client_secret="wrong")
    await client.post(TOKEN_PATH, content=b"garbage")
    assert sandbox.token_requests == 3


async def test_rotated_secret_replaces_the_old_one(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.rotate_client_secret("new-secret")
    old = await request_token(client)
    new = await request_token(client, client_secret="new-secret")
    assert (old.status_code, new.status_code) == (401, 200)


def test_rotation_leaves_the_callers_config_alone(config: SandboxConfig) -> None:
    Sandbox(config).rotate_client_secret("new-secret")
    assert config.client_secret == "sandbox-secret"


@pytest.mark.parametrize(
    "body",
    [b"", b"%%%", b"\xff\xfe\x00", b"=&=&=", b"grant_type", b"a=1&" * 100],
    ids=["empty", "bad-escapes", "not-utf8", "empty-names", "no-value", "too-many-fields"],
)
async def test_garbage_forms_are_client_errors(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(TOKEN_PATH, content=body, headers={"Content-Type": FORM})
    assert 400 <= response.status_code < 500
