"""No secret, access token or API key in anything the proxy writes: responses, logs, audit rows."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from liveness_proxy.sandbox import Fault
from support import CLIENT_SECRET, TEST_PEPPER, Harness, LogScan, ProxyHarness, find_leaks

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


def _exercise(proxy: ProxyHarness, client: httpx.Client) -> None:
    """Successes, failures of every kind, token refreshes: everything that could spill a secret."""
    token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
    session_id = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token}).json()[
        "session_id"
    ]
    proxy.sandbox.complete_session(session_id, live=True)
    client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
    client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.admin))
    client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.bob))
    client.post(SESSION_TOKEN, headers={"Authorization": f"Bearer {proxy.keys.alice}x"})
    client.post(SESSION_TOKEN, headers={"X-API-Key": proxy.keys.bob[:-3]})
    proxy.sandbox.revoke_tokens()  # forces a 401 -> refresh -> retry
    client.post(SESSION_TOKEN, headers=proxy.auth())
    for fault in (
        Fault(target="session_token", kind="status", status=500),
        Fault(target="session_token", kind="malformed"),
        Fault(target="session_token", kind="rate_limit"),
        Fault(target="session_token", kind="status", status=401, count=3),
    ):
        proxy.sandbox.inject_fault(fault)
        client.post(SESSION_TOKEN, headers=proxy.auth())
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=5))
    proxy.clock.advance(28800 + 10)
    client.post(SESSION_TOKEN, headers=proxy.auth())
    client.get("/readyz")
    proxy.sandbox.clear_faults()
    proxy.clock.advance(60)
    client.post(SESSION_TOKEN, headers=proxy.auth())


def test_nothing_written_contains_a_secret_token_key_or_image(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    _exercise(proxy, client)

    access_tokens = {
        record.headers["authorization"].removeprefix("Bearer ")
        for record in proxy.sandbox.request_log
        if "authorization" in record.headers
    }
    assert len(access_tokens) >= 2  # the scenario really rotated tokens
    keys = {proxy.keys.alice, proxy.keys.bob, proxy.keys.admin, proxy.keys.revocable}
    key_secrets = {key.split("_", 2)[2] for key in keys}  # lpk_<id>_<secret>; the secret may contain "_"
    assert all(len(secret) >= 40 for secret in key_secrets)
    forbidden = {CLIENT_SECRET, TEST_PEPPER, *access_tokens, *keys, *key_secrets}

    captured = {
        "responses": b"\n".join(proxy.responses).decode("utf-8", "replace"),
        "logs": proxy.log_text(),
        "audit": "\n".join(str(row) for row in proxy.audit_rows()),
    }
    assert captured["logs"].count('"event":"request"') >= 10
    for where, text in captured.items():
        for secret in forbidden:
            assert secret not in text, f"a secret leaked into {where}"
        # Sandbox images are base64 PNGs: their signature must not appear anywhere either.
        assert base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()[:10] not in text, (
            f"an image leaked into {where}"
        )


def test_the_log_scanner_recognises_every_kind_of_secret() -> None:
    planted = [
        CLIENT_SECRET,
        TEST_PEPPER,
        "sbx_" + "a" * 43,
        "sst_" + "b" * 32,
        "lpk_0123456789abcdef_" + "c" * 43,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
        base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"face").decode(),
    ]
    for secret in planted:
        leaks = find_leaks(f'{{"event": "request", "detail": "{secret}"}}')
        assert len(leaks) == 1, secret
        assert secret not in leaks[0]  # a report never repeats the whole secret
    assert find_leaks('{"event":"request","credential_id":"0123456789abcdef","status":200}') == []


def test_a_harness_scans_its_proxy_log_when_it_stops(tmp_path: Path) -> None:
    scan = LogScan()
    with Harness(tmp_path, log_scan=scan, origin="probe") as proxy, proxy.client() as client:
        proxy.create_session(client)
        proxy.log.write("planted sbx_" + "x" * 40 + "\n")
    assert scan.lines_scanned >= 3
    assert len(scan.leaks) == 1
    assert scan.leaks[0].startswith("probe: sbx_")
