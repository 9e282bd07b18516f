"""The audit log: one record per liveness request, accepted or rejected, committed before the answer."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from liveness_proxy.sandbox import Fault
from liveness_proxy.store import AuditLog, create_engine
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


def audit_rows(proxy: ProxyHarness) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        engine = create_engine(proxy.settings.database_url, pool_size=1)
        try:
            return [row async for row in AuditLog(engine).iterate()]
        finally:
            await engine.dispose()

    return asyncio.run(read())


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

    rows = audit_rows(proxy)
    summary = [
        (r["request_id"], r["action"], r["subject"], r["status"], r["upstream_status"], r["problem"])
        for r in rows
    ]
    assert summary == [
        ("r1", "session_token.create", "alice", 200, 200, None),
        ("r2", "session.create", "alice", 201, 200, None),
        ("r3", "result.read", "alice", 200, 200, None),
        ("r4", "result.read", "bob", 404, None, "not-found"),
        ("r5", "session_token.create", None, 401, None, "unauthenticated"),
    ]
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
    last = audit_rows(proxy)[-1]
    assert (last["status"], last["upstream_status"], last["problem"]) == (502, 503, "upstream-unavailable")


def test_record_is_durable_when_the_answer_arrives(proxy: ProxyHarness, client: httpx.Client) -> None:
    # Read through a separate engine (another connection) right after each answer: the row must be
    # committed already, not queued.
    for index in range(5):
        client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-Request-ID": f"d{index}"})
        assert audit_rows(proxy)[-1]["request_id"] == f"d{index}"


def test_invalid_session_ids_are_audited_without_storing_the_bad_id(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    client.get(f"{SESSIONS}/bad%20id/result", headers=proxy.auth())
    last = audit_rows(proxy)[-1]
    assert (last["action"], last["status"], last["session_id"]) == ("result.read", 400, None)
