"""Biometric minimisation of results through the proxy, the derived `passed` on the admin route, and
the server-side verdict record in the database."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from liveness_proxy.store import (
    SessionAlreadyBound,
    SessionOwner,
    SessionOwnership,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.tables import liveness_sessions, metadata
from support import TEST_KEYS, ProxyHarness

# Any 64 hex digits: these tests are about verdicts, not subjects (see store/subjects.py).
COMMITMENT = "c" * 64

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]


def test_results_carry_no_images_by_default(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.complete_session(session_id, live=True, confidence=98.25)
    body = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()).json()
    assert body["status"] == "SUCCEEDED"
    assert body["confidence"] == 98.25
    assert set(body["redacted_fields"]) == {"reference_image", "audit_images"}
    assert "passed" not in body  # no threshold configured


def test_threshold_adds_passed_and_the_admin_route_shows_the_verdict(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_PASS_THRESHOLD": 90}) as proxy, proxy.client() as client:
        live = proxy.create_session(client)
        spoof = proxy.create_session(client)
        pending = proxy.create_session(client)
        before = client.get(f"/v1/liveness/sessions/{live}", headers=proxy.auth(proxy.keys.admin)).json()
        proxy.sandbox.complete_session(live, live=True, confidence=95.0)
        proxy.sandbox.complete_session(spoof, live=False, confidence=12.0)
        results = {
            session_id: client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()).json()
            for session_id in (live, spoof, pending)
        }
        records = {
            session_id: client.get(
                f"/v1/liveness/sessions/{session_id}", headers=proxy.auth(proxy.keys.admin)
            )
            for session_id in (live, spoof, pending)
        }
        owner_asks = client.get(f"/v1/liveness/sessions/{live}", headers=proxy.auth())
        unknown = client.get("/v1/liveness/sessions/no-such-session", headers=proxy.auth(proxy.keys.admin))
        audit = proxy.audit_rows()
    assert before["verdict"] is None
    assert results[live]["passed"] is True
    assert results[spoof]["passed"] is False
    assert results[pending]["passed"] is None
    live_record = records[live].json()
    assert live_record["subject"] == "alice"
    assert live_record["session_id"] == live
    assert live_record["verdict"]["status"] == "SUCCEEDED"
    assert live_record["verdict"]["confidence"] == 95.0
    assert live_record["verdict"]["passed"] is True
    assert live_record["created_at"].endswith("+00:00")
    assert records[spoof].json()["verdict"]["status"] == "FAILED"
    assert records[pending].json()["verdict"] is None
    assert owner_asks.status_code == 403
    assert owner_asks.json()["type"] == "urn:liveness-proxy:problem:forbidden"
    assert unknown.status_code == 404
    assert [row["status"] for row in audit if row["action"] == "session.read"] == [
        200,
        200,
        200,
        200,
        403,
        404,
    ]


def test_the_verdict_is_stored_with_the_binding(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.complete_session(session_id, live=True, confidence=77.0)
    client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())

    async def read() -> Any:
        async with proxy.database() as engine, engine.connect() as connection:
            query = select(liveness_sessions).where(liveness_sessions.c.session_id == session_id)
            return (await connection.execute(query)).one()

    row = asyncio.run(read())
    assert row.verdict_status == "SUCCEEDED"
    assert row.verdict_confidence == 77.0
    assert row.verdict_at > 0


def test_no_image_bytes_reach_the_database(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.complete_session(session_id, live=True)
    for key in (proxy.keys.alice, proxy.keys.admin):
        client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth(key))
    url = proxy.settings.liveness_proxy_database_url.get_secret_value()
    if url.startswith("sqlite"):
        # The raw files, WAL included: free pages and old row versions too.
        database = Path(url.removeprefix("sqlite:///"))
        stored = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
    else:

        async def dump() -> bytes:
            async with proxy.database() as engine, engine.connect() as connection:
                rows = [
                    str(row).encode()
                    for table in metadata.sorted_tables
                    for row in (await connection.execute(select(table))).all()
                ]
            return b"\n".join(rows)

        stored = asyncio.run(dump())
    assert session_id.encode() in stored  # the scan does see the data it is looking through
    assert base64.b64encode(b"\x89PNG\r\n\x1a\n")[:10] not in stored


async def test_batched_bindings_never_give_one_session_two_owners(database_url: str) -> None:
    """Bindings are group-committed: within one batch and against rows already stored, the first
    claim on a session id wins and every other claim gets SessionAlreadyBound; the rest of the batch
    is written all the same."""
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine)

        def owner(session_id: str, subject: str) -> SessionOwner:
            return SessionOwner(
                session_id, subject, "key:1", 1.0, f"r-{subject}", subject_commitment=COMMITMENT
            )

        await ownership.bind(owner("taken", "first"), "r-first")
        claims = [ownership.bind(owner("contested", f"s{index}"), f"r-s{index}") for index in range(5)]
        claims.append(ownership.bind(owner("taken", "late"), "r-late"))
        claims += [ownership.bind(owner(f"own-{index}", f"o{index}"), f"r-o{index}") for index in range(40)]
        outcomes = await asyncio.gather(*claims, return_exceptions=True)
        await ownership.close()
        stored = await SessionOwnership(engine).owner_of("contested")
        taken = await SessionOwnership(engine).owner_of("taken")
        own = [await SessionOwnership(engine).owner_of(f"own-{index}") for index in range(40)]
    finally:
        await engine.dispose()
    contested = outcomes[:5]
    assert sum(outcome is None for outcome in contested) == 1
    assert sum(isinstance(outcome, SessionAlreadyBound) for outcome in contested) == 4
    assert stored is not None
    assert stored.subject == f"s{contested.index(None)}"
    assert isinstance(outcomes[5], SessionAlreadyBound)
    assert taken is not None
    assert taken.subject == "first"
    assert outcomes[6:] == [None] * 40
    assert [owned.subject if owned else None for owned in own] == [f"o{index}" for index in range(40)]
