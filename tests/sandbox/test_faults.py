"""Injected faults: each kind, how many calls it hits, and which calls it hits."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from pydantic import ValidationError

from liveness_proxy.sandbox import Fault, Sandbox, SandboxConfig, running_sandbox
from liveness_proxy.sandbox.faults import GARBAGE_BYTES, RESET_BODY

from .flows import (
    RESULT_PATH_PREFIX,
    SESSION_PATH,
    create_session,
    fetch_access_token,
    fetch_result,
    post_session_token,
    request_token,
)


async def test_status_fault_answers_with_that_status(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="status", status=503))
    response = await request_token(client)
    assert (response.status_code, response.json()) == (
        503,
        {"error": "upstream_failure", "message": "injected"},
    )


async def test_fault_applies_to_count_calls_then_disappears(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    sandbox.inject_fault(Fault(target="token", kind="status", count=2))
    statuses = [(await request_token(client)).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]


async def test_rate_limit_fault_sends_retry_after(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="rate_limit", retry_after_seconds=7))
    response = await request_token(client)
    assert (response.status_code, response.headers["retry-after"], response.json()["error"]) == (
        429,
        "7",
        "rate_limited",
    )


async def test_timeout_fault_hangs_then_answers_504(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="timeout", hang_seconds=0.01))
    assert (await request_token(client)).status_code == 504


async def test_timeout_fault_really_hangs(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="timeout", hang_seconds=5))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(request_token(client), timeout=0.05)


async def test_latency_fault_delays_a_normal_answer(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="latency", delay_seconds=0.05))
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await request_token(client)
    assert (response.status_code, loop.time() - started >= 0.05) == (200, True)


async def test_malformed_fault_sends_truncated_json(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="malformed"))
    response = await request_token(client)
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)


async def test_wrong_content_type_fault_sends_html(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="wrong_content_type"))
    response = await request_token(client)
    assert (response.status_code, response.headers["content-type"].split(";")[0], response.text) == (
        200,
        "text/html",
        "<html>oops</html>",
    )


async def test_oversized_fault_sends_valid_json_of_the_requested_size(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    sandbox.inject_fault(Fault(target="token", kind="oversized", size_bytes=5000))
    response = await request_token(client)
    assert (
        len(response.content),
        response.headers["content-length"],
        orjson.loads(response.content)["session_id"],
    ) == (
        5000,
        "5000",
        "x",
    )


async def test_oversized_fault_defaults_to_ten_mebibytes(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="oversized"))
    assert len((await request_token(client)).content) == 10 * 1024 * 1024


async def test_fault_skips_calls_to_other_endpoints(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="session_token", kind="status"))
    token_status = (await request_token(client)).status_code
    assert token_status == 200


async def test_fault_waits_for_its_endpoint(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    token = await fetch_access_token(client)
    sandbox.inject_fault(Fault(target="session_token", kind="status", status=502))
    await request_token(client)
    response = await post_session_token(
        client, {"Authorization": f"Bearer {token}", "X-Domain-Id": "sandbox-domain"}
    )
    assert response.status_code == 502


async def test_fault_comes_before_authentication(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="liveness_result", kind="status", status=503))
    response = await client.get(RESULT_PATH_PREFIX + "whatever")
    assert response.status_code == 503


async def test_liveness_session_fault_does_not_use_up_the_session_token(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    session_token = (await post_session_token(client, auth_headers)).json()["session_token"]
    sandbox.inject_fault(Fault(target="liveness_session", kind="status"))
    body = {"session_token": session_token}
    first = await client.post(SESSION_PATH, headers=auth_headers, json=body)
    second = await client.post(SESSION_PATH, headers=auth_headers, json=body)
    assert (first.status_code, second.status_code) == (500, 200)


async def test_liveness_result_fault_hits_results(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.inject_fault(Fault(target="liveness_result", kind="rate_limit"))
    assert (await fetch_result(client, auth_headers, session_id)).status_code == 429


async def test_any_target_hits_every_upstream_endpoint(
    client: httpx.AsyncClient, sandbox: Sandbox, auth_headers: dict[str, str]
) -> None:
    sandbox.inject_fault(Fault(target="any", kind="status", count=4, status=502))
    statuses = [
        (await request_token(client)).status_code,
        (await post_session_token(client, auth_headers)).status_code,
        (await client.post(SESSION_PATH, headers=auth_headers, json={"session_token": "x"})).status_code,
        (await fetch_result(client, auth_headers, "x")).status_code,
    ]
    assert statuses == [502, 502, 502, 502]


async def test_faults_matching_the_same_call_apply_in_injection_order(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    sandbox.inject_fault(Fault(target="any", kind="status", status=501))
    sandbox.inject_fault(Fault(target="token", kind="status", status=502))
    statuses = [(await request_token(client)).status_code for _ in range(3)]
    assert statuses == [501, 502, 200]


async def test_clear_faults_drops_pending_faults(client: httpx.AsyncClient, sandbox: Sandbox) -> None:
    sandbox.inject_fault(Fault(target="token", kind="status", count=5))
    sandbox.clear_faults()
    assert (await request_token(client)).status_code == 200


async def test_faults_never_hit_the_control_api() -> None:
    sandbox = Sandbox(SandboxConfig(control_enabled=True))
    sandbox.inject_fault(Fault(target="any", kind="status"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://localhost"
    ) as client:
        stats = await client.get("/_sandbox/stats")
        token = await request_token(client)
    assert (stats.status_code, token.status_code) == (200, 500)


async def test_faulted_token_calls_count_as_requests_not_issues(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    sandbox.inject_fault(Fault(target="token", kind="status"))
    await request_token(client)
    assert (sandbox.token_requests, sandbox.tokens_issued) == (1, 0)


def test_injecting_does_not_change_the_callers_fault(sandbox: Sandbox) -> None:
    fault = Fault(target="token", kind="status", count=3)
    sandbox.inject_fault(fault)
    assert fault.count == 3


@pytest.mark.parametrize(
    "fields",
    [
        {"target": "nowhere", "kind": "status"},
        {"target": "token", "kind": "explode"},
        {"target": "token", "kind": "status", "count": 0},
        {"target": "token", "kind": "status", "status": 99},
        {"target": "token", "kind": "latency", "delay_seconds": -1.0},
        {"target": "token", "kind": "timeout", "hang_seconds": float("inf")},
    ],
    ids=["target", "kind", "count", "status", "negative-delay", "infinite-hang"],
)
def test_invalid_faults_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Fault(**fields)  # type: ignore[arg-type]


# --- faults below HTTP, over a real server: uvicorn gives them the connection ---------------------


async def _raw_exchange(base_url: str, request: bytes) -> tuple[bytes, BaseException | None]:
    """Sends `request` on a fresh connection; everything received until the connection ended, and
    the error it ended with (None for a clean close)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    received = b""
    ended_with: BaseException | None = None
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    except ConnectionResetError as exc:
        ended_with = exc
    finally:
        writer.close()
    return received, ended_with


_TOKEN_REQUEST = (
    b"POST /oauth/token HTTP/1.1\r\nHost: sandbox\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 0\r\n\r\n"
)


async def test_reset_fault_sends_half_the_announced_body_then_a_tcp_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox = Sandbox(SandboxConfig())
    sandbox.inject_fault(Fault(target="token", kind="reset"))
    async with running_sandbox(sandbox) as base_url:
        received, ended_with = await _raw_exchange(base_url, _TOKEN_REQUEST)
        # The server is unharmed: the next call is answered normally.
        async with httpx.AsyncClient(base_url=base_url) as client:
            assert (await request_token(client)).status_code == 200
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {len(RESET_BODY)}".encode() in head.lower()
    assert body == RESET_BODY[: len(RESET_BODY) // 2]
    assert isinstance(ended_with, ConnectionResetError)
    assert not [record for record in caplog.records if record.name.startswith("uvicorn")]


async def test_garbage_fault_sends_bytes_that_are_not_http_then_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sandbox = Sandbox(SandboxConfig())
    sandbox.inject_fault(Fault(target="token", kind="garbage"))
    async with running_sandbox(sandbox) as base_url:
        received, ended_with = await _raw_exchange(base_url, _TOKEN_REQUEST)
        async with httpx.AsyncClient(base_url=base_url) as client:
            assert (await request_token(client)).status_code == 200
    assert (received, ended_with) == (GARBAGE_BYTES, None)
    assert not [record for record in caplog.records if record.name.startswith("uvicorn")]


async def test_garbage_fault_without_a_real_server_says_it_cannot_be_done(
    client: httpx.AsyncClient, sandbox: Sandbox
) -> None:
    sandbox.inject_fault(Fault(target="token", kind="garbage"))
    response = await request_token(client)
    assert (response.status_code, response.json()["error"]) == (500, "fault_unsupported")


@pytest.mark.parametrize("expires_in", [0, -60, 10**12])
async def test_token_expires_in_fault_issues_a_real_token_with_that_claim(
    client: httpx.AsyncClient, sandbox: Sandbox, expires_in: int
) -> None:
    sandbox.inject_fault(Fault(target="token", kind="token_expires_in", expires_in=expires_in))
    answer = (await request_token(client)).json()
    assert answer["expires_in"] == expires_in
    # The token itself works for the sandbox's configured lifetime, whatever the answer claimed.
    headers = {"Authorization": f"Bearer {answer['access_token']}", "X-Domain-Id": "sandbox-domain"}
    assert (await post_session_token(client, headers)).status_code == 200
    assert (await request_token(client)).json()["expires_in"] == 28800


def test_token_expires_in_fault_is_refused_for_other_targets() -> None:
    with pytest.raises(ValidationError):
        Fault(target="any", kind="token_expires_in")
