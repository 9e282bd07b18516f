"""Migration 0009 (jobs keep their trace context) on SQLite and PostgreSQL: jobs written by the
0008-era code survive the upgrade with no trace context and run as before; the downgrade drops the
column and keeps the jobs; the schema matches tables.py after each upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store import JobQueue, create_engine, current_revision, upgrade_database
from liveness_proxy.store.database import alembic_config
from liveness_proxy.store.tables import metadata
from support import TEST_KEYS

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A database at 0008 holding two queued jobs, written as the 0008-era code wrote them."""
    made = create_engine(database_url, pool_size=2)
    await upgrade_database(made, "0008", keys=TEST_KEYS)
    async with made.begin() as connection:
        for ref in ("evt-1", "evt-2"):
            await connection.execute(
                text(
                    "INSERT INTO jobs (kind, ref, state, due_at, attempts, created_at, updated_at) "
                    "VALUES ('deliver', :ref, 'queued', 0, 0, 0, 0)"
                ),
                {"ref": ref},
            )
    yield made
    await made.dispose()


async def job_columns(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: {str(column["name"]) for column in inspect(sync).get_columns("jobs")}
        )


async def jobs_by_ref(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT * FROM jobs ORDER BY ref"))).all()
    return {row.ref: dict(row._mapping) for row in rows}


async def schema_drift(engine: AsyncEngine) -> list[Any]:
    def compare(sync: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(compare)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def test_the_upgrade_adds_an_empty_trace_context_and_old_jobs_still_run(engine: AsyncEngine) -> None:
    before = await jobs_by_ref(engine)
    await upgrade_database(engine, "0009", keys=TEST_KEYS)
    assert await current_revision(engine) == "0009"
    after = await jobs_by_ref(engine)
    assert {ref: row.pop("trace_parent") for ref, row in after.items()} == {"evt-1": None, "evt-2": None}
    assert after == before
    await upgrade_database(engine, keys=TEST_KEYS)
    assert await schema_drift(engine) == []
    claimed = await JobQueue(engine).claim("deliver", owner="p", limit=5, lease_seconds=30, now=1.0)
    assert [(job.ref, job.trace_parent) for job in claimed] == [("evt-1", None), ("evt-2", None)]


async def test_the_downgrade_drops_the_column_and_keeps_the_jobs(engine: AsyncEngine) -> None:
    await upgrade_database(engine, "0009", keys=TEST_KEYS)
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE jobs SET trace_parent = :value WHERE ref = 'evt-1'"), {"value": TRACEPARENT}
        )
    [traced] = await JobQueue(engine).claim("deliver", owner="p", limit=1, lease_seconds=30, now=1.0)
    assert (traced.ref, traced.trace_parent) == ("evt-1", TRACEPARENT)
    kept = await jobs_by_ref(engine)

    await downgrade(engine, "0008")

    assert await current_revision(engine) == "0008"
    assert "trace_parent" not in await job_columns(engine)
    for row in kept.values():
        del row["trace_parent"]
    assert await jobs_by_ref(engine) == kept
    # The unique (kind, ref) survived the table's rebuild on SQLite: a duplicate is still refused.
    with pytest.raises(IntegrityError):
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO jobs (kind, ref, state, due_at, attempts, created_at, updated_at) "
                    "VALUES ('deliver', 'evt-1', 'queued', 0, 0, 0, 0)"
                )
            )

    await upgrade_database(engine, keys=TEST_KEYS)  # and up again: the column returns, empty
    assert {row["trace_parent"] for row in (await jobs_by_ref(engine)).values()} == {None}
    assert await schema_drift(engine) == []
