"""Migration 0010 (final results) on SQLite and PostgreSQL: sessions written by the 0009-era code
survive the upgrade with no stored answer (their next read goes upstream and stores one); the
downgrade drops the column and keeps the sessions and their verdicts; the schema matches tables.py
after each upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from integration.test_migration_0009 import downgrade, schema_drift
from liveness_proxy.store import SessionOwnership, create_engine, current_revision, upgrade_database
from support import TEST_KEYS

COPY = '{"policy":"0123456789abcdef0123456789abcdef","result":{"status":"SUCCEEDED"}}'


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A database at 0009 holding a pending session and a final one, as the 0009-era code wrote them."""
    made = create_engine(database_url, pool_size=2)
    await upgrade_database(made, "0009", keys=TEST_KEYS)
    async with made.begin() as connection:
        for session_id, verdict in (("pending-1", None), ("final-1", "SUCCEEDED")):
            await connection.execute(
                text(
                    "INSERT INTO liveness_sessions (session_id, subject, credential_id, created_at, "
                    "request_id, verdict_status, verdict_confidence, verdict_at, subject_commitment) "
                    "VALUES (:id, 'alice', 'key:k1', 1, 'req', :verdict, :confidence, :at, 'c')"
                ),
                {
                    "id": session_id,
                    "verdict": verdict,
                    "confidence": 98.2 if verdict else None,
                    "at": 2.0 if verdict else None,
                },
            )
    yield made
    await made.dispose()


async def session_columns(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: {str(column["name"]) for column in inspect(sync).get_columns("liveness_sessions")}
        )


async def sessions(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT * FROM liveness_sessions ORDER BY session_id"))).all()
    return {row.session_id: dict(row._mapping) for row in rows}


async def test_the_upgrade_adds_no_stored_answer_to_existing_sessions(engine: AsyncEngine) -> None:
    before = await sessions(engine)
    await upgrade_database(engine, "0010", keys=TEST_KEYS)
    assert await current_revision(engine) == "0010"
    after = await sessions(engine)
    assert {session_id: row.pop("final_result") for session_id, row in after.items()} == {
        "final-1": None,
        "pending-1": None,
    }
    assert after == before
    await upgrade_database(engine, keys=TEST_KEYS)
    assert await schema_drift(engine) == []
    owner = await SessionOwnership(engine).owner_of("final-1")
    assert owner is not None
    assert owner.verdict is not None
    assert (owner.verdict.status, owner.final_result) == ("SUCCEEDED", None)


async def test_the_downgrade_drops_the_stored_answers_and_keeps_the_sessions(engine: AsyncEngine) -> None:
    await upgrade_database(engine, "0010", keys=TEST_KEYS)
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE liveness_sessions SET final_result = :copy WHERE session_id = 'final-1'"),
            {"copy": COPY},
        )
    owner = await SessionOwnership(engine).owner_of("final-1")
    assert owner is not None
    assert owner.final_result == COPY
    kept = await sessions(engine)

    await downgrade(engine, "0009")

    assert await current_revision(engine) == "0009"
    assert "final_result" not in await session_columns(engine)
    for row in kept.values():
        del row["final_result"]
    assert await sessions(engine) == kept

    await upgrade_database(engine, keys=TEST_KEYS)  # and up again: the column returns, empty
    assert {row["final_result"] for row in (await sessions(engine)).values()} == {None}
    assert await schema_drift(engine) == []
