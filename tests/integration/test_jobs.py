"""The job queue on both engines: concurrent claimers take disjoint rows, a lapsed lease is claimed
again, and a settle by a process that lost its lease changes nothing."""

from __future__ import annotations

import asyncio

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store import JobQueue, create_engine, upgrade_database
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.tables import jobs
from support import TEST_KEYS


async def _queue_with(
    database_url: str, count: int, *, due_at: float = 100.0
) -> tuple[JobQueue, AsyncEngine]:
    engine = create_engine(database_url)
    await upgrade_database(engine, keys=TEST_KEYS)
    async with engine.begin() as connection:
        await connection.execute(
            insert(jobs),
            [
                enqueue_values("deliver", f"e-{index}", due_at=due_at, now=0.0, trace_parent=None)
                for index in range(count)
            ],
        )
    return JobQueue(engine), engine


async def test_concurrent_claimers_take_disjoint_rows(database_url: str) -> None:
    queue, engine = await _queue_with(database_url, 60)
    try:
        claims = await asyncio.gather(
            *(
                JobQueue(engine).claim("deliver", owner=f"p{index}", limit=10, lease_seconds=30, now=200.0)
                for index in range(8)
            )
        )
        nothing_due = await queue.claim("deliver", owner="late", limit=10, lease_seconds=30, now=50.0)
        other_kind = await queue.claim("finalize", owner="late", limit=10, lease_seconds=30, now=200.0)
    finally:
        await engine.dispose()
    refs = [job.ref for claim in claims for job in claim]
    assert len(refs) == len(set(refs)) == 60, "every row claimed once, none twice"
    assert all(job.attempts == 1 for claim in claims for job in claim)
    assert nothing_due == []
    assert other_kind == []


async def test_a_lapsed_lease_is_claimed_again_and_the_old_owner_cannot_settle(database_url: str) -> None:
    queue, engine = await _queue_with(database_url, 1)
    try:
        [first] = await queue.claim("deliver", owner="dead", limit=5, lease_seconds=30, now=200.0)
        assert await queue.claim("deliver", owner="other", limit=5, lease_seconds=30, now=229.0) == []
        [again] = await queue.claim("deliver", owner="other", limit=5, lease_seconds=30, now=231.0)
        async with queue.begin() as connection:
            stale = await queue.settle(connection, first, owner="dead", state="done", now=232.0)
        async with queue.begin() as connection:
            retried = await queue.settle(
                connection, again, owner="other", state="queued", now=233.0, due_at=300.0
            )
        assert await queue.claim("deliver", owner="third", limit=5, lease_seconds=30, now=299.0) == []
        [third] = await queue.claim("deliver", owner="third", limit=5, lease_seconds=30, now=300.0)
        counts = await queue.counts()
    finally:
        await engine.dispose()
    assert (first.ref, again.ref, third.ref) == ("e-0", "e-0", "e-0")
    assert (first.attempts, again.attempts, third.attempts) == (1, 2, 3)
    assert stale is False, "a process whose lease was taken over must not overwrite the outcome"
    assert retried is True
    assert counts == {("deliver", "queued"): 1}
