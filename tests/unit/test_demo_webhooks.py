"""The demo backend's webhook check, judged against the official `standardwebhooks` package: what it
signs, the demo accepts; anything forged, tampered, stale or replayed, the demo refuses or lists once."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import socket

import orjson
import pytest
import standardwebhooks

from liveness_proxy.demo.servers import loopback_webhook_url
from liveness_proxy.demo.webhooks import WebhookInbox, WebhookRefused, WebhookVerifier
from liveness_proxy.serving.sockets import bound_sockets
from liveness_proxy.webhook_signing import new_webhook_secret

NOW = 1_800_000_000
BODY = orjson.dumps(
    {
        "type": "liveness.session.completed",
        "timestamp": "2027-01-15T08:00:00.000Z",
        "data": {"session_id": "s-1", "status": "SUCCEEDED", "confidence": 97.3, "passed": True},
    }
)


def signed(secret: str, body: bytes = BODY, *, message_id: str = "msg_1", at: int = NOW) -> dict[str, str]:
    """Headers as the Standard Webhooks reference library signs them."""
    signature = standardwebhooks.Webhook(secret).sign(message_id, dt.datetime.fromtimestamp(at, dt.UTC), body)
    return {"webhook-id": message_id, "webhook-timestamp": str(at), "webhook-signature": signature}


def verifier(secret: str, now: float = NOW) -> WebhookVerifier:
    return WebhookVerifier(secret, wall_clock=lambda: now)


def test_what_the_reference_library_signs_is_accepted() -> None:
    secret = new_webhook_secret()
    delivery = verifier(secret).verify(signed(secret), BODY)
    assert (delivery.webhook_id, delivery.timestamp) == ("msg_1", NOW)


def test_any_secret_of_a_rotation_and_any_offered_signature_will_do() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    headers = signed(old)
    # A sender mid-rotation offers one signature per secret; an unknown version is skipped.
    headers["webhook-signature"] = "v1a,bm90LW1pbmU= " + headers["webhook-signature"] + " v1,bm90LW1pbmU="
    assert verifier(f"{new} {old}").verify(headers, BODY).webhook_id == "msg_1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"webhook-signature": ""}, "needs"),
        ({"webhook-id": ""}, "needs"),
        ({"webhook-timestamp": ""}, "needs"),
        ({"webhook-id": "msg 1"}, "not an id"),
        ({"webhook-timestamp": "1.8e9"}, "Unix time"),
        ({"webhook-timestamp": str(NOW - 301)}, "more than 300 s"),
        ({"webhook-timestamp": str(NOW + 301)}, "more than 300 s"),
        (
            {"webhook-signature": "v1," + base64.b64encode(secrets.token_bytes(32)).decode()},
            "No webhook-signature",
        ),
        ({"webhook-id": "msg_2"}, "No webhook-signature"),  # the id is signed too
    ],
)
def test_a_forged_or_stale_delivery_is_refused(change: dict[str, str], reason: str) -> None:
    secret = new_webhook_secret()
    headers = signed(secret) | change
    with pytest.raises(WebhookRefused, match=reason) as refused:
        verifier(secret).verify(headers, BODY)
    assert refused.value.status == 400
    assert secret not in refused.value.detail


def test_a_tampered_body_or_another_key_is_refused() -> None:
    secret = new_webhook_secret()
    tampered = BODY.replace(b"SUCCEEDED", b"FAILED")
    with pytest.raises(WebhookRefused, match="No webhook-signature"):
        verifier(secret).verify(signed(secret), tampered)
    with pytest.raises(WebhookRefused, match="No webhook-signature"):
        verifier(secret).verify(signed(new_webhook_secret()), BODY)


def test_a_stale_but_validly_signed_delivery_is_refused_at_the_tolerance_edge() -> None:
    secret = new_webhook_secret()
    assert verifier(secret, now=NOW + 300).verify(signed(secret), BODY).timestamp == NOW
    with pytest.raises(WebhookRefused, match="more than 300 s"):
        verifier(secret, now=NOW + 300.5).verify(signed(secret), BODY)


def test_the_inbox_lists_an_id_once_and_keeps_only_the_latest() -> None:
    secret = new_webhook_secret()
    check = verifier(secret)
    inbox = WebhookInbox(capacity=2)
    first = inbox.accept(check.verify(signed(secret), BODY), BODY, received_at=NOW)
    assert first is not None
    assert first.as_json() | {"received_at": 0} == {
        "sequence": 1,
        "webhook_id": "msg_1",
        "type": "liveness.session.completed",
        "session_id": "s-1",
        "status": "SUCCEEDED",
        "confidence": 97.3,
        "passed": True,
        "signed_at": NOW,
        "received_at": 0,
        "signature_verified": True,
    }
    # A retry of the same event (its 2xx answer lost) is acknowledged but not listed again.
    assert inbox.accept(check.verify(signed(secret), BODY), BODY, received_at=NOW) is None
    assert inbox.duplicates == 1
    for number in (2, 3):
        headers = signed(secret, message_id=f"msg_{number}")
        assert inbox.accept(check.verify(headers, BODY), BODY, received_at=NOW) is not None
    events, latest = inbox.since(0)
    assert [event.webhook_id for event in events] == ["msg_2", "msg_3"]
    assert latest == 3
    assert inbox.since(3) == ([], 3)


def test_a_signed_body_that_is_not_an_event_is_refused_and_not_listed() -> None:
    secret = new_webhook_secret()
    inbox = WebhookInbox()
    for body in (b"not json", b"[1, 2]", b'{"data": {}}'):
        delivery = verifier(secret).verify(signed(secret, body), body)
        with pytest.raises(WebhookRefused):
            inbox.accept(delivery, body, received_at=NOW)
    assert inbox.since(0) == ([], 0)


def test_the_proxy_posts_to_a_loopback_address_the_demo_listens_on() -> None:
    """Bound, never listening: the address the demo's proxy is told to post its webhooks to."""
    with bound_sockets("localhost", 0, "--port") as sockets:
        ipv4 = next(sock for sock in sockets if sock.family == socket.AF_INET)
        assert loopback_webhook_url(sockets) == f"http://127.0.0.1:{ipv4.getsockname()[1]}/demo/webhooks"
    # Every address (`--host ''`): loopback among them.
    with bound_sockets("", 0, "--port") as sockets:
        url = loopback_webhook_url(sockets)
        assert url is not None
        assert url.startswith("http://127.0.0.1:")
    if socket.has_ipv6:
        with bound_sockets("::1", 0, "--port") as sockets:
            assert (
                loopback_webhook_url(sockets) == f"http://[::1]:{sockets[0].getsockname()[1]}/demo/webhooks"
            )
