"""The audit log: one record per liveness request, accepted or rejected, committed before the answer."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from liveness_proxy.sandbox import Fault
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


def test_each_liveness_request_leaves_one_record_with_its_outcome(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    token = client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-Request-ID": "r1"}).json()["session_token"]
    created = client.post(
        SESSIONS, headers={**proxy.auth(), "X-Request-ID": "r2"}, json={"session_token": token}
    ).json()
    client.get(f"{SESSIONS}/{created['session_id']}/result", headers={**proxy.auth(), "X-Request-ID": "r3"})
    client.get(
        f"{SESSIONS}/{created['session_id']}/result",
        headers={**proxy.auth(proxy.keys.bob), "X-Request-ID": "r4"},
    )
    client.post(SESSION_TOKEN, headers={"X-Request-ID": "r5"})
    client.get("/healthz")  # not a liveness request: not audited

    # The failed authentication is in its window's aggregate record (see test_auth_flood.py).
    proxy.flush_failed_authentications()
    rows = proxy.audit_rows()
    summary = [
        (r["request_id"], r["action"], r["subject"], r["status"], r["upstream_status"], r["problem"])
        for r in rows
    ]
    assert summary == [
        ("r1", "session_token.create", "alice", 200, 200, None),
        ("r2", "session.create", "alice", 201, 200, None),
        ("r3", "result.read", "alice", 200, 200, None),
        ("r4", "result.read", "bob", 404, None, "not-found"),
        ("r5", "auth.failed", None, 401, None, "unauthenticated"),
    ]
    assert orjson.loads(rows[4]["detail"])["failures"] == 1
    assert rows[1]["session_id"] == created["session_id"]
    assert rows[2]["session_id"] == created["session_id"]
    assert rows[0]["credential_id"].startswith("key:")
    assert all(r["latency_ms"] >= 0 and r["occurred_at"] > 0 for r in rows)


def test_upstream_failures_are_audited_with_the_upstream_status(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=503))
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 502
    last = proxy.audit_rows()[-1]
    assert (last["status"], last["upstream_status"], last["problem"]) == (502, 503, "upstream-unavailable")


def test_upstream_404_is_audited_with_its_upstream_status_and_token_failures_without_one(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
    session_id = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token}).json()[
        "session_id"
    ]
    proxy.sandbox.inject_fault(Fault(target="liveness_result", kind="status", status=404))
    client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=10))
    proxy.clock.advance(28800 + 1)
    client.post(SESSION_TOKEN, headers=proxy.auth())
    read, token_failure = proxy.audit_rows()[-2:]
    assert (read["status"], read["upstream_status"]) == (404, 404)
    assert (token_failure["status"], token_failure["upstream_status"]) == (503, None)


@pytest.mark.served
def test_a_client_that_disconnects_mid_body_is_audited(proxy: ProxyHarness) -> None:
    import socket

    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/liveness/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\nX-Request-ID: gone-1\r\n"
            + f"Authorization: Bearer {proxy.keys.alice}\r\n\r\n".encode()
            + b'{"session_token": "abc'
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while not [r for r in proxy.audit_rows() if r["request_id"] == "gone-1"]:
        assert time.monotonic() < deadline, "no audit record for the disconnected request"
        time.sleep(0.05)
    record = next(r for r in proxy.audit_rows() if r["request_id"] == "gone-1")
    assert (record["status"], record["problem"]) == (499, "client-disconnected")
    assert not [r for r in proxy.sandbox.request_log if r.path.endswith("liveness_session")]
    assert "unhandled_error" not in proxy.log_text()


def test_record_is_durable_when_the_answer_arrives(proxy: ProxyHarness, client: httpx.Client) -> None:
    # Read through a separate engine (another connection) right after each answer: the row must be
    # committed already, not queued.
    for index in range(5):
        client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-Request-ID": f"d{index}"})
        assert proxy.audit_rows()[-1]["request_id"] == f"d{index}"


def test_invalid_session_ids_are_audited_without_storing_the_bad_id(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    client.get(f"{SESSIONS}/bad%20id/result", headers=proxy.auth())
    last = proxy.audit_rows()[-1]
    assert (last["action"], last["status"], last["session_id"]) == ("result.read", 400, None)
