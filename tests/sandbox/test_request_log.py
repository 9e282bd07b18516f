"""Every request is recorded as received, before anything else happens to it."""

from __future__ import annotations

import httpx

from liveness_proxy.sandbox import Sandbox, SandboxConfig

from .flows import RESULT_PATH_PREFIX, fetch_result, request_token


async def test_every_request_is_logged_in_order(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await request_token(client)
    await client.get("/nowhere")
    assert [(entry.method, entry.path) for entry in sandbox.request_log] == [
        ("POST", "/oauth/token"),
        ("GET", "/nowhere"),
    ]


async def test_raw_path_keeps_percent_encoding(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await client.get(RESULT_PATH_PREFIX + "%2e%2e/%2e%2e/oauth/token")
    entry = sandbox.request_log[-1]
    assert (entry.raw_path, entry.path) == (
        "/service/liveness-v2/liveness_result/%2e%2e/%2e%2e/oauth/token",
        "/service/liveness-v2/liveness_result/../../oauth/token",
    )


async def test_raw_path_includes_the_query_string(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await client.get("/somewhere?next=%2Fadmin&x=1")
    assert sandbox.request_log[-1].raw_path == "/somewhere?next=%2Fadmin&x=1"


async def test_headers_are_logged_with_lower_case_names(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    await fetch_result(client, {**auth_headers, "X-Request-Id": "req-1"}, "some-id")
    headers = sandbox.request_log[-1].headers
    assert (headers["authorization"], headers["x-domain-id"], headers["x-request-id"]) == (
        auth_headers["Authorization"],
        "sandbox-domain",
        "req-1",
    )


async def test_body_size_is_logged(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    await client.post("/anywhere", content=b"x" * 1234)
    assert sandbox.request_log[-1].body_size == 1234


async def test_control_api_calls_are_logged() -> None:
    sandbox = Sandbox(SandboxConfig(control_enabled=True))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://localhost"
    ) as client:
        await client.get("/_sandbox/stats")
    assert sandbox.request_log[-1].path == "/_sandbox/stats"


async def test_reset_log_empties_the_log_but_not_the_counters(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await request_token(client)
    sandbox.reset_log()
    assert (sandbox.request_log, sandbox.tokens_issued) == ([], 1)


async def test_oversized_request_is_refused_and_still_logged(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    response = await client.post("/oauth/token", content=b"x" * (1024 * 1024 + 1))
    assert (response.status_code, response.json()["error"], sandbox.request_log[-1].path) == (
        413,
        "payload_too_large",
        "/oauth/token",
    )


async def test_oversized_request_never_reaches_the_endpoint(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    await client.post("/oauth/token", content=b"x" * (1024 * 1024 + 1))
    assert sandbox.token_requests == 0


async def test_a_body_of_exactly_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    form = b"grant_type=client_credentials&client_id=sandbox-client&client_secret=sandbox-secret&pad="
    body = form + b"a" * (1024 * 1024 - len(form))
    response = await client.post(
        "/oauth/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200
