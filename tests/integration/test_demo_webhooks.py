"""`liveness-proxy demo` plays the customer's backend: the proxy it starts posts verdicts to the demo
server's own `/demo/webhooks`, which verifies each one and lists it for the page.

Runs the demo's own start-up (`serving_demo`: sandbox, proxy and page on loopback sockets, the
settings the demo builds) in this process, and drives it over real HTTP as the page and an attacker
would. No browser: `e2e/test_demo_browser.py` shows the same on the page.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import httpx
import orjson
import standardwebhooks

from liveness_proxy.demo.servers import RunningDemo
from liveness_proxy.webhook_signing import new_webhook_secret


async def received(http: httpx.AsyncClient, count: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        listed: dict[str, Any] = (await http.get("/demo/api/webhooks")).json()
        if len(listed["events"]) >= count:
            return listed
        assert time.monotonic() < deadline, f"{len(listed['events'])} of {count} webhooks listed: {listed}"
        await asyncio.sleep(0.05)


def event_body(session_id: str, status: str) -> bytes:
    return orjson.dumps(
        {
            "type": "liveness.session.completed",
            "timestamp": "2027-01-15T08:00:00.000Z",
            "data": {"session_id": session_id, "status": status, "confidence": 99.9, "passed": True},
        }
    )


def signed_headers(secret: str, message_id: str, body: bytes, *, at: float | None = None) -> dict[str, str]:
    """Signed as the Standard Webhooks reference library signs: with the right secret, what the
    proxy would send; with another, what an attacker can."""
    when = dt.datetime.fromtimestamp(time.time() if at is None else at, dt.UTC)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": standardwebhooks.Webhook(secret).sign(message_id, when, body),
    }


async def test_a_verdict_nobody_read_reaches_the_demo_backend_verified(demo: RunningDemo) -> None:
    # The demo configured its proxy to post to the demo server itself, with a fresh secret.
    assert demo.webhook_url == f"{demo.proxy_url}/demo/webhooks"
    assert demo.settings.liveness_proxy_webhook_url == demo.webhook_url
    assert demo.settings.liveness_proxy_webhook_secret.get_secret_value().startswith("whsec_")
    assert demo.settings.liveness_proxy_finalizer is True
    async with httpx.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
        config = (await http.get("/demo/api/config")).json()
        assert config["webhook_url"] == demo.webhook_url
        token = (await http.post("/demo/api/sign-in", json={})).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        session_token = (await http.post("/v1/liveness/session-token", headers=auth)).json()["session_token"]
        created = await http.post(
            "/v1/liveness/sessions", headers=auth, json={"session_token": session_token}
        )
        session_id = created.json()["session_id"]

        # The person holds up a photo, and the page is already closed: nobody asks for the result.
        completed = await http.post(
            f"{demo.sandbox_url}/_sandbox/sessions/{session_id}/complete", json={"outcome": "spoof"}
        )
        assert completed.status_code == 200
        started = time.monotonic()
        listed = await received(http, 1)
        assert time.monotonic() - started < 5  # the demo's finalizer reads every second at first
        [event] = listed["events"]
        assert event["signature_verified"] is True
        assert event["type"] == "liveness.session.completed"
        assert event["session_id"] == session_id
        assert (event["status"], event["confidence"]) == ("FAILED", 12.3)
        assert event["webhook_id"].startswith("msg_")
        assert abs(event["signed_at"] - time.time()) < 30
        assert listed["refused"] == 0
        # The proxy read it on its own: every result read upstream was the finalizer's.
        calls = (await http.get("/demo/api/upstream-calls")).json()["calls"]
        reads = [call for call in calls if call["endpoint"] == "liveness_result"]
        assert reads
        assert {call["asked_by"] for call in reads} == {"the finalizer"}
        # The demo never hands out the webhook secret, and the leak check looks for it.
        leak = await http.post("/demo/api/leak-check", json={"received": [orjson.dumps(listed).decode()]})
        assert "the webhook signing secret" in leak.json()["looked_for"]
        assert leak.json()["found"] == []


async def test_forged_or_replayed_webhooks_are_refused_and_never_listed(demo: RunningDemo) -> None:
    secret = demo.settings.liveness_proxy_webhook_secret.get_secret_value()
    forged = event_body("someone-elses-session", "SUCCEEDED")
    async with httpx.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
        # Unsigned, as any page or script that reaches the demo could send it.
        unsigned = await http.post(
            "/demo/webhooks", content=forged, headers={"content-type": "application/json"}
        )
        assert unsigned.status_code == 400
        assert unsigned.headers["content-type"] == "application/problem+json"
        assert unsigned.json()["request_id"] == unsigned.headers["x-request-id"]
        # Signed, but with a secret that is not the demo's.
        foreign = await http.post(
            "/demo/webhooks",
            content=forged,
            headers=signed_headers(new_webhook_secret(), "msg_forged", forged),
        )
        assert foreign.status_code == 400
        assert "signature" in foreign.json()["detail"]
        # The right secret, but ten minutes old: a delivery captured earlier, replayed.
        stale = await http.post(
            "/demo/webhooks",
            content=forged,
            headers=signed_headers(secret, "msg_stale", forged, at=time.time() - 600),
        )
        assert stale.status_code == 400
        # A cross-site "simple" POST (no preflight) never reaches the check; nor does a foreign Host.
        plain = await http.post(
            "/demo/webhooks",
            content=forged,
            headers={**signed_headers(secret, "msg_p", forged), "content-type": "text/plain"},
        )
        assert plain.status_code == 415
        rebound = await http.post(
            "/demo/webhooks",
            content=forged,
            headers={**signed_headers(secret, "msg_h", forged), "host": "evil.example"},
        )
        assert rebound.status_code == 403
        listed = (await http.get("/demo/api/webhooks")).json()
        assert listed["events"] == []
        assert listed["refused"] == 3
        assert secret not in orjson.dumps(listed).decode()
        # Had it reached a browser, the page's leak check would say so.
        leaked = await http.post(
            "/demo/api/leak-check", json={"received": [f"x{secret.removeprefix('whsec_')}x"]}
        )
        assert leaked.json()["found"] == ["the webhook signing secret"]

        # What carries the demo's signature is accepted, once per webhook-id (a retry is not listed twice).
        genuine = event_body("a-session", "SUCCEEDED")
        for _ in range(2):
            answer = await http.post(
                "/demo/webhooks", content=genuine, headers=signed_headers(secret, "msg_1", genuine)
            )
            assert answer.status_code == 204
        listed = (await http.get("/demo/api/webhooks")).json()
        assert [event["webhook_id"] for event in listed["events"]] == ["msg_1"]
        assert listed["duplicates"] == 1
        assert (await http.get("/demo/api/webhooks", params={"after": listed["next"]})).json()["events"] == []
        assert (await http.get("/demo/api/webhooks", params={"after": "x"})).status_code == 400
