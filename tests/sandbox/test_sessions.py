"""Session tokens, sessions and results: the liveness workflow itself."""

from __future__ import annotations

import base64

import httpx
import pytest

from liveness_proxy.sandbox import ManualClock, Sandbox

from .flows import (
    SESSION_PATH,
    SESSION_TOKEN_PATH,
    create_session,
    fetch_result,
    fetch_session_token,
)


async def open_session(
    client: httpx.AsyncClient, headers: dict[str, str], session_token: str
) -> httpx.Response:
    return await client.post(SESSION_PATH, headers=headers, json={"session_token": session_token})


# --- get_session_token ---------------------------------------------------------------------


async def test_session_token_response_shape(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    response = await client.post(SESSION_TOKEN_PATH, headers=auth_headers, json={})
    body = response.json()
    assert (response.status_code, sorted(body), body["expires_in"]) == (
        200,
        ["expires_in", "session_token"],
        300,
    )


async def test_session_token_accepts_an_empty_body(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(SESSION_TOKEN_PATH, headers=auth_headers)
    assert response.status_code == 200


async def test_session_token_accepts_extra_fields(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(SESSION_TOKEN_PATH, headers=auth_headers, json={"locale": "en"})
    assert response.status_code == 200


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"null", b"{", b"\xff"])
async def test_session_token_needs_a_json_object(
    client: httpx.AsyncClient, auth_headers: dict[str, str], body: bytes
) -> None:
    response = await client.post(SESSION_TOKEN_PATH, headers=auth_headers, content=body)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


# --- liveness_session ----------------------------------------------------------------------


async def test_session_response_shape(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    session_token = await fetch_session_token(client, auth_headers)
    body = (await open_session(client, auth_headers, session_token)).json()
    assert (sorted(body), body["status"], body["expires_in"]) == (
        ["expires_in", "session_id", "status"],
        "CREATED",
        180,
    )


async def test_session_token_is_single_use(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    session_token = await fetch_session_token(client, auth_headers)
    await open_session(client, auth_headers, session_token)
    again = await open_session(client, auth_headers, session_token)
    assert (again.status_code, again.json()["error"]) == (409, "session_token_used")


async def test_unknown_session_token_is_400(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    response = await open_session(client, auth_headers, "sst_made-up")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_session_token")


async def test_expired_session_token_is_410(
    client: httpx.AsyncClient, auth_headers: dict[str, str], clock: ManualClock
) -> None:
    session_token = await fetch_session_token(client, auth_headers)
    clock.advance(300)
    response = await open_session(client, auth_headers, session_token)
    assert (response.status_code, response.json()["error"]) == (410, "session_token_expired")


async def test_session_token_works_until_just_before_expiry(
    client: httpx.AsyncClient, auth_headers: dict[str, str], clock: ManualClock
) -> None:
    session_token = await fetch_session_token(client, auth_headers)
    clock.advance(299)
    assert (await open_session(client, auth_headers, session_token)).status_code == 200


async def test_expired_session_token_is_not_used_up(
    client: httpx.AsyncClient, auth_headers: dict[str, str], clock: ManualClock
) -> None:
    session_token = await fetch_session_token(client, auth_headers)
    clock.advance(300)
    await open_session(client, auth_headers, session_token)
    # Still reported as expired rather than used: the failed attempt did not consume it.
    assert (await open_session(client, auth_headers, session_token)).status_code == 410


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b'{"session_token": 5}', b'{"sessionToken": "x"}', b"[]", b"{"],
    ids=["empty", "no-token", "number", "camel-case", "array", "truncated"],
)
async def test_session_needs_a_session_token_string(
    client: httpx.AsyncClient, auth_headers: dict[str, str], body: bytes
) -> None:
    response = await client.post(SESSION_PATH, headers=auth_headers, content=body)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


async def test_session_ids_are_uuids_listed_in_order(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    first = await create_session(client, auth_headers)
    second = await create_session(client, auth_headers)
    assert sandbox.session_ids == [first, second]


# --- liveness_result -----------------------------------------------------------------------


async def test_new_session_result_is_created_without_images(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    session_id = await create_session(client, auth_headers)
    body = (await fetch_result(client, auth_headers, session_id)).json()
    assert body == {
        "session_id": session_id,
        "status": "CREATED",
        "confidence": None,
        "reference_image": None,
        "audit_images": [],
    }


@pytest.mark.parametrize(
    ("live", "status", "confidence"), [(True, "SUCCEEDED", 98.2), (False, "FAILED", 12.3)]
)
async def test_completion_sets_status_and_default_confidence(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    sandbox: Sandbox,
    live: bool,
    status: str,
    confidence: float,
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.complete_session(session_id, live=live)
    body = (await fetch_result(client, auth_headers, session_id)).json()
    assert (body["status"], body["confidence"]) == (status, confidence)


async def test_completion_confidence_can_be_chosen(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.complete_session(session_id, live=True, confidence=61.0)
    assert (await fetch_result(client, auth_headers, session_id)).json()["confidence"] == 61.0


async def test_completion_confidence_must_be_a_percentage(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    session_id = await create_session(client, auth_headers)
    with pytest.raises(ValueError, match="confidence"):
        sandbox.complete_session(session_id, live=True, confidence=150.0)


async def test_completed_result_carries_base64_png_images(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.complete_session(session_id, live=True)
    body = (await fetch_result(client, auth_headers, session_id)).json()
    images = [body["reference_image"], *body["audit_images"]]
    decoded = [base64.b64decode(image["bytes"], validate=True) for image in images]
    assert (len(body["audit_images"]), all(data.startswith(b"\x89PNG") for data in decoded)) == (2, True)


async def test_images_carry_a_bounding_box(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.complete_session(session_id, live=False)
    body = (await fetch_result(client, auth_headers, session_id)).json()
    assert set(body["reference_image"]["bounding_box"]) == {"width", "height", "left", "top"}


async def test_session_expires_after_its_lifetime(
    client: httpx.AsyncClient, auth_headers: dict[str, str], clock: ManualClock
) -> None:
    session_id = await create_session(client, auth_headers)
    clock.advance(180)
    assert (await fetch_result(client, auth_headers, session_id)).json()["status"] == "EXPIRED"


async def test_session_is_still_created_just_before_expiry(
    client: httpx.AsyncClient, auth_headers: dict[str, str], clock: ManualClock
) -> None:
    session_id = await create_session(client, auth_headers)
    clock.advance(179)
    assert (await fetch_result(client, auth_headers, session_id)).json()["status"] == "CREATED"


async def test_completed_session_does_not_expire_by_clock(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox, clock: ManualClock
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.complete_session(session_id, live=True)
    clock.advance(3600)
    assert (await fetch_result(client, auth_headers, session_id)).json()["status"] == "SUCCEEDED"


async def test_expire_session_expires_it_now(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sandbox: Sandbox
) -> None:
    session_id = await create_session(client, auth_headers)
    sandbox.expire_session(session_id)
    assert (await fetch_result(client, auth_headers, session_id)).json()["status"] == "EXPIRED"


async def test_unknown_session_result_is_404(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    response = await fetch_result(client, auth_headers, "00000000-0000-0000-0000-000000000000")
    assert (response.status_code, response.json()["error"]) == (404, "not_found")


def test_completing_an_unknown_session_raises_key_error(sandbox: Sandbox) -> None:
    with pytest.raises(KeyError):
        sandbox.complete_session("unknown", live=True)


def test_expiring_an_unknown_session_raises_key_error(sandbox: Sandbox) -> None:
    with pytest.raises(KeyError):
        sandbox.expire_session("unknown")
