"""Nothing a client sends makes the sandbox fail: odd paths, odd methods, garbage bodies."""

from __future__ import annotations

import httpx
import pytest

from liveness_proxy.sandbox import Sandbox, SandboxConfig, create_sandbox_app

from .flows import RESULT_PATH_PREFIX, SESSION_PATH, SESSION_TOKEN_PATH, TOKEN_PATH, request_token

GARBAGE_BODIES = [
    b"",
    b"\x00\xff\xfe",
    b"null",
    b"[]",
    b"{",
    b"[" * 5000,
    b'{"session_token": {"nested": [1, 2, 3]}}',
    b'{"session_token": "' + b"\xc3" + b'"}',
    b"1e999999",
    b"grant_type=client_credentials&" * 50,
]
GARBAGE_IDS = [
    "empty",
    "binary",
    "null",
    "array",
    "truncated",
    "deep-nesting",
    "object-token",
    "bad-utf8",
    "huge-number",
    "repeated-form",
]


@pytest.mark.parametrize("path", [TOKEN_PATH, SESSION_TOKEN_PATH, SESSION_PATH])
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/x-www-form-urlencoded", "text/plain"]
)
@pytest.mark.parametrize("body", GARBAGE_BODIES, ids=GARBAGE_IDS)
async def test_garbage_bodies_get_client_errors(
    client: httpx.AsyncClient, auth_headers: dict[str, str], path: str, content_type: str, body: bytes
) -> None:
    headers = {**auth_headers, "Content-Type": content_type}
    response = await client.post(path, content=body, headers=headers)
    assert response.status_code < 500


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/oauth/token/",
        "/service/liveness-v2/",
        RESULT_PATH_PREFIX,
        RESULT_PATH_PREFIX + "a/b",
        "/%00",
        "/%ff%fe",
        "//double//slashes",
        "/" + "a" * 4000,
    ],
)
async def test_unknown_paths_are_json_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert (response.status_code, response.json()["error"]) == (404, "not_found")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_methods_are_json_405(client: httpx.AsyncClient, method: str) -> None:
    response = await client.request(method, SESSION_PATH)
    assert (response.status_code, response.json()["error"], response.headers["allow"]) == (
        405,
        "method_not_allowed",
        "POST",
    )


async def test_result_with_odd_session_id_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.get(RESULT_PATH_PREFIX + "%2e%2e", headers=auth_headers)
    assert response.status_code == 404


async def test_paths_come_from_the_config() -> None:
    sandbox = Sandbox(SandboxConfig(token_path="/auth/v2/token"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://sandbox"
    ) as client:
        moved = await client.post(
            "/auth/v2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "sandbox-client",
                "client_secret": "sandbox-secret",
            },
        )
        old = await request_token(client)
    assert (moved.status_code, old.status_code) == (200, 404)


async def test_two_sandboxes_keep_separate_state() -> None:
    first, second = Sandbox(SandboxConfig()), Sandbox(SandboxConfig())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=first.app), base_url="http://sandbox"
    ) as client:
        token = (await request_token(client)).json()["access_token"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=second.app), base_url="http://sandbox"
    ) as client:
        response = await client.post(
            SESSION_TOKEN_PATH,
            headers={"Authorization": f"Bearer {token}", "X-Domain-Id": "sandbox-domain"},
        )
    assert (response.status_code, first.tokens_issued, second.tokens_issued) == (401, 1, 0)


async def test_create_sandbox_app_serves_a_working_sandbox() -> None:
    app = create_sandbox_app(SandboxConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as client:
        assert (await request_token(client)).status_code == 200
