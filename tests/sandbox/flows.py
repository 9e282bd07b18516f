"""Request helpers shared by the sandbox tests: the steps a proxy takes against the upstream."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from liveness_proxy.sandbox import Sandbox

DEFAULTS = {
    "client_id": "sandbox-client",
    "client_secret": "sandbox-secret",
    "domain_id": "sandbox-domain",
}
TOKEN_PATH = "/oauth/token"
SESSION_TOKEN_PATH = "/service/liveness-v2/get_session_token"
SESSION_PATH = "/service/liveness-v2/liveness_session"
RESULT_PATH_PREFIX = "/service/liveness-v2/liveness_result/"


async def request_token(
    client: httpx.AsyncClient,
    *,
    client_id: str = DEFAULTS["client_id"],
    client_secret: str = DEFAULTS["client_secret"],
    grant_type: str = "client_credentials",
) -> httpx.Response:
    return await client.post(
        TOKEN_PATH,
        data={"grant_type": grant_type, "client_id": client_id, "client_secret": client_secret},
    )


async def fetch_access_token(client: httpx.AsyncClient) -> str:
    response = await request_token(client)
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


def bearer_headers(access_token: str, domain_id: str = DEFAULTS["domain_id"]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}", "X-Domain-Id": domain_id}


async def post_session_token(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.post(SESSION_TOKEN_PATH, headers=headers, json={})


async def fetch_session_token(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.post(SESSION_TOKEN_PATH, headers=headers, json={})
    assert response.status_code == 200, response.text
    session_token = response.json()["session_token"]
    assert isinstance(session_token, str)
    return session_token


async def create_session(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    session_token = await fetch_session_token(client, headers)
    response = await client.post(SESSION_PATH, headers=headers, json={"session_token": session_token})
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    assert isinstance(session_id, str)
    return session_id


async def fetch_result(client: httpx.AsyncClient, headers: dict[str, str], session_id: str) -> httpx.Response:
    return await client.get(RESULT_PATH_PREFIX + session_id, headers=headers)


@contextlib.asynccontextmanager
async def asgi_client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    """A client that talks to the sandbox app in-process."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://localhost"
    ) as client:
        yield client
