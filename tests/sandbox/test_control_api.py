"""The /_sandbox HTTP control API: absent by default, a remote control when enabled."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from liveness_proxy.sandbox import ManualClock, Sandbox, SandboxConfig

from .flows import (
    asgi_client,
    bearer_headers,
    create_session,
    fetch_access_token,
    fetch_result,
    request_token,
)

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def controlled(clock: ManualClock) -> Sandbox:
    return Sandbox(SandboxConfig(clock=clock, control_enabled=True))


@pytest.fixture
async def control_client(controlled: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(controlled) as client:
        yield client


@pytest.fixture
async def control_auth(control_client: httpx.AsyncClient) -> dict[str, str]:
    return bearer_headers(await fetch_access_token(control_client))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/_sandbox/sessions/x/complete"),
        ("POST", "/_sandbox/sessions/x/expire"),
        ("POST", "/_sandbox/tokens/revoke"),
        ("POST", "/_sandbox/faults"),
        ("DELETE", "/_sandbox/faults"),
        ("GET", "/_sandbox/stats"),
        ("POST", "/_sandbox/clock/advance"),
        ("POST", "/_sandbox/client-secret"),
    ],
)
async def test_control_api_is_absent_by_default(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path, json={})
    assert (response.status_code, response.json()["error"]) == (404, "not_found")


async def test_complete_marks_the_session_live(
    control_client: httpx.AsyncClient, control_auth: dict[str, str]
) -> None:
    session_id = await create_session(control_client, control_auth)
    response = await control_client.post(
        f"/_sandbox/sessions/{session_id}/complete", json={"outcome": "live", "confidence": 90.5}
    )
    assert (response.status_code, response.json()) == (
        200,
        {"session_id": session_id, "status": "SUCCEEDED", "confidence": 90.5},
    )


async def test_complete_as_spoof_fails_the_session(
    control_client: httpx.AsyncClient, control_auth: dict[str, str]
) -> None:
    session_id = await create_session(control_client, control_auth)
    await control_client.post(f"/_sandbox/sessions/{session_id}/complete", json={"outcome": "spoof"})
    assert (await fetch_result(control_client, control_auth, session_id)).json()["status"] == "FAILED"


async def test_complete_unknown_session_is_404(control_client: httpx.AsyncClient) -> None:
    response = await control_client.post("/_sandbox/sessions/nope/complete", json={"outcome": "live"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"outcome": "maybe"}',
        b'{"outcome": "live", "confidence": 101}',
        b'{"outcome": "live", "x": 1}',
    ],
    ids=["empty", "truncated", "bad-outcome", "confidence-range", "extra-field"],
)
async def test_complete_with_a_bad_body_is_422(
    control_client: httpx.AsyncClient, control_auth: dict[str, str], body: bytes
) -> None:
    session_id = await create_session(control_client, control_auth)
    response = await control_client.post(
        f"/_sandbox/sessions/{session_id}/complete", content=body, headers=JSON
    )
    assert response.status_code == 422


async def test_expire_expires_the_session(
    control_client: httpx.AsyncClient, control_auth: dict[str, str]
) -> None:
    session_id = await create_session(control_client, control_auth)
    response = await control_client.post(f"/_sandbox/sessions/{session_id}/expire")
    assert (response.status_code, response.json()["status"]) == (200, "EXPIRED")


async def test_expire_unknown_session_is_404(control_client: httpx.AsyncClient) -> None:
    assert (await control_client.post("/_sandbox/sessions/nope/expire")).status_code == 404


async def test_revoke_invalidates_issued_tokens(
    control_client: httpx.AsyncClient, control_auth: dict[str, str]
) -> None:
    revoke = await control_client.post("/_sandbox/tokens/revoke")
    after = await control_client.post("/service/liveness-v2/get_session_token", headers=control_auth, json={})
    assert (revoke.status_code, after.status_code) == (200, 401)


async def test_posting_a_fault_injects_it(control_client: httpx.AsyncClient) -> None:
    created = await control_client.post(
        "/_sandbox/faults", json={"target": "token", "kind": "status", "status": 503}
    )
    token = await request_token(control_client)
    assert (created.status_code, created.json()["status"], token.status_code) == (201, 503, 503)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"target": "token"}',
        b'{"target": "token", "kind": "status", "count": 0}',
        b'{"target": "token", "kind": "status", "colour": "red"}',
    ],
    ids=["empty", "array", "no-kind", "zero-count", "extra-field"],
)
async def test_posting_a_bad_fault_is_422(control_client: httpx.AsyncClient, body: bytes) -> None:
    response = await control_client.post("/_sandbox/faults", content=body, headers=JSON)
    assert (response.status_code, response.json()["error"]) == (422, "invalid_request")


async def test_deleting_faults_clears_them(control_client: httpx.AsyncClient) -> None:
    await control_client.post("/_sandbox/faults", json={"target": "token", "kind": "status"})
    deleted = await control_client.delete("/_sandbox/faults")
    token = await request_token(control_client)
    assert (deleted.status_code, token.status_code) == (204, 200)


async def test_stats_report_counters(control_client: httpx.AsyncClient, control_auth: dict[str, str]) -> None:
    await create_session(control_client, control_auth)
    await request_token(control_client, client_secret="wrong")
    stats = (await control_client.get("/_sandbox/stats")).json()
    # Requests: token, session token, session, failed token, and this stats call itself.
    assert stats == {"tokens_issued": 1, "token_requests": 2, "requests": 5, "sessions": 1}


async def test_clock_advance_moves_a_manual_clock(
    control_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    before = clock.now()
    response = await control_client.post("/_sandbox/clock/advance", json={"seconds": 90.5})
    assert (response.status_code, clock.now()) == (200, before + 90.5)


async def test_clock_advance_refuses_negative_seconds(control_client: httpx.AsyncClient) -> None:
    response = await control_client.post("/_sandbox/clock/advance", json={"seconds": -1})
    assert response.status_code == 422


async def test_clock_advance_needs_a_manual_clock() -> None:
    sandbox = Sandbox(SandboxConfig(control_enabled=True))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sandbox.app), base_url="http://localhost"
    ) as client:
        response = await client.post("/_sandbox/clock/advance", json={"seconds": 1})
    assert (response.status_code, response.json()["error"]) == (409, "clock_not_manual")


async def test_client_secret_rotation(control_client: httpx.AsyncClient) -> None:
    rotated = await control_client.post("/_sandbox/client-secret", json={"client_secret": "fresh"})
    old = await request_token(control_client)
    new = await request_token(control_client, client_secret="fresh")
    assert (rotated.status_code, old.status_code, new.status_code) == (204, 401, 200)


async def test_client_secret_must_not_be_empty(control_client: httpx.AsyncClient) -> None:
    response = await control_client.post("/_sandbox/client-secret", json={"client_secret": ""})
    assert response.status_code == 422


async def test_control_api_rejects_wrong_methods(control_client: httpx.AsyncClient) -> None:
    response = await control_client.get("/_sandbox/tokens/revoke")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


# -- what a web page could send --------------------------------------------------------------------


async def test_a_cross_site_text_plain_post_changes_nothing(control_client: httpx.AsyncClient) -> None:
    """A page on any site can POST text/plain to loopback without a preflight: refused before use."""
    fault = b'{"target": "token", "kind": "status", "status": 503}'
    plain = await control_client.post(
        "/_sandbox/faults", content=fault, headers={"Content-Type": "text/plain"}
    )
    form = await control_client.post("/_sandbox/clock/advance", data={"seconds": "60"})
    assert (plain.status_code, plain.json()["error"]) == (415, "unsupported_media_type")
    assert form.status_code == 415
    assert (await request_token(control_client)).status_code == 200  # no fault was injected


async def test_a_body_less_route_takes_no_body_or_a_json_one(
    control_client: httpx.AsyncClient, control_auth: dict[str, str]
) -> None:
    plain = await control_client.post(
        "/_sandbox/tokens/revoke", content=b"x", headers={"Content-Type": "text/plain"}
    )
    untyped = await control_client.delete("/_sandbox/faults", headers={"Content-Type": "text/plain"})
    still_valid = await control_client.post(
        "/service/liveness-v2/get_session_token", headers=control_auth, json={}
    )
    assert (plain.status_code, untyped.status_code, still_valid.status_code) == (415, 415, 200)
    assert (await control_client.post("/_sandbox/tokens/revoke", json={})).status_code == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:9999", "http://evil"])
async def test_another_sites_origin_is_refused(
    control_client: httpx.AsyncClient, control_auth: dict[str, str], origin: str
) -> None:
    """Browsers name the page's origin on every cross-origin POST: a body-less one is refused too."""
    revoke = await control_client.post("/_sandbox/tokens/revoke", headers={"Origin": origin})
    fault = await control_client.post(
        "/_sandbox/faults", json={"target": "token", "kind": "status"}, headers={"Origin": origin}
    )
    assert (revoke.status_code, revoke.json()["error"], fault.status_code) == (403, "forbidden", 403)
    after = await control_client.post("/service/liveness-v2/get_session_token", headers=control_auth, json={})
    assert after.status_code == 200  # the tokens were not revoked
    assert (await request_token(control_client)).status_code == 200  # nor a fault injected


async def test_its_own_origin_is_accepted(control_client: httpx.AsyncClient) -> None:
    answer = await control_client.post("/_sandbox/tokens/revoke", headers={"Origin": "http://localhost"})
    assert answer.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "10.0.0.1", "127.0.0.1.evil.example"])
async def test_a_host_name_that_is_not_loopback_is_refused(
    control_client: httpx.AsyncClient, host: str
) -> None:
    """DNS rebinding: a foreign name pointed at 127.0.0.1 is the page's own origin to the browser."""
    stats = await control_client.get("/_sandbox/stats", headers={"Host": host})
    revoke = await control_client.post("/_sandbox/tokens/revoke", headers={"Host": host})
    assert (stats.status_code, revoke.status_code, revoke.json()["error"]) == (403, 403, "forbidden")


@pytest.mark.parametrize("host", ["127.0.0.1:8081", "localhost", "[::1]:8081", "LOCALHOST:1"])
async def test_loopback_host_names_are_answered(control_client: httpx.AsyncClient, host: str) -> None:
    assert (await control_client.get("/_sandbox/stats", headers={"Host": host})).status_code == 200


async def test_control_hosts_none_answers_any_host_name_but_still_refuses_other_sites() -> None:
    sandbox = Sandbox(SandboxConfig(control_enabled=True, control_hosts=None))
    async with asgi_client(sandbox) as client:
        named = await client.get("/_sandbox/stats", headers={"Host": "sandbox.internal"})
        foreign = await client.post(
            "/_sandbox/tokens/revoke",
            headers={"Host": "sandbox.internal", "Origin": "https://evil.example"},
        )
    assert (named.status_code, foreign.status_code) == (200, 403)


async def test_the_liveness_endpoints_answer_any_host(client: httpx.AsyncClient) -> None:
    """The checks are the control API's: the proxy reaches the simulated Cynopsis API by any name."""
    answer = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
        },
        headers={"Host": "sandbox.example"},
    )
    assert answer.status_code == 200
