"""The verdict ledger on both engines: the first terminal verdict wins across writers, and only the
winner writes the chain event, the webhook event and its delivery job, in the verdict's
transaction; the finalizer's follow-up is scheduled with the binding and ended by the verdict."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from sqlalchemy import select

from liveness_proxy.delivery import VerdictEvents
from liveness_proxy.store import (
    AuditLog,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
    VerdictLedger,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.tables import audit_records, jobs, liveness_sessions, webhook_events
from support import TEST_AUDIT_KEYS, TEST_KEYS

# Any 64 hex digits: these tests are about verdicts, not subjects (see store/subjects.py).
COMMITMENT = "c" * 64


async def _rows(engine: Any, table: Any) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        return [dict(row._mapping) for row in (await connection.execute(select(table))).all()]


async def test_racing_writers_record_one_verdict_one_event_one_webhook(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        owner = SessionOwner(
            "s-1", "alice", "key:1", 100.0, "r-1", reference="loan-7", subject_commitment=COMMITMENT
        )
        await ownership.bind(owner, "r-1")
        follow_ups = await _rows(engine, jobs)

        # Eight writers, each with its own cache as on eight replicas, read different answers.
        async def record(index: int) -> SessionOwner:
            ledger = VerdictLedger(
                engine,
                SessionOwnership(engine),
                TEST_AUDIT_KEYS,
                events=VerdictEvents(pass_threshold=90.0),
                wall_clock=lambda: 200.0,
            )
            status = "SUCCEEDED" if index % 2 == 0 else "FAILED"
            verdict = SessionVerdict(status, float(index), 200.0 + index, f"req-{index}")
            return await ledger.record(owner, verdict, read_by="request" if index else "finalizer")

        results = await asyncio.gather(*(record(index) for index in range(8)))
        await ownership.close()
        chain = [row for row in await _rows(engine, audit_records) if row["action"] == "verdict.record"]
        events = await _rows(engine, webhook_events)
        job_rows = await _rows(engine, jobs)
        verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    finally:
        await engine.dispose()

    assert [(row["kind"], row["ref"], row["state"], row["due_at"]) for row in follow_ups] == [
        ("finalize", "s-1", "queued", 103.0)
    ]
    stored = {result.verdict for result in results}
    assert len(stored) == 1, "every writer sees the one verdict that stands"
    winner = stored.pop()
    assert winner is not None
    assert len(chain) == 1
    detail = orjson.loads(chain[0]["detail"])
    assert detail["status"] == winner.status
    assert detail["confidence"] == winner.confidence
    assert chain[0]["request_id"] == winner.request_id
    assert chain[0]["subject"] == "alice"
    assert len(events) == 1
    assert detail["event_id"] == events[0]["event_id"]
    body = orjson.loads(events[0]["body"])
    assert body["type"] == "liveness.session.completed"
    assert body["data"]["status"] == winner.status
    assert body["data"]["reference"] == "loan-7"
    assert body["data"]["passed"] is False  # confidence below 90
    states = sorted((row["kind"], row["state"]) for row in job_rows)
    assert states == [("deliver", "queued"), ("finalize", "done")]
    assert verdict.problem is None


async def test_unresolved_is_announced_and_a_later_verdict_still_follows(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        owner = SessionOwner("s-2", "bob", "key:2", 100.0, "r-2", subject_commitment=COMMITMENT)
        await ownership.bind(owner, "r-2")
        ledger = VerdictLedger(
            engine,
            ownership,
            TEST_AUDIT_KEYS,
            events=VerdictEvents(pass_threshold=None),
            wall_clock=lambda: 900.0,
        )
        assert await ledger.mark_unresolved(owner, request_id="fin-1")
        assert not await ledger.mark_unresolved(owner, request_id="fin-2"), "announced once"
        await ledger.record(owner, SessionVerdict("EXPIRED", None, 950.0, "req-9"), read_by="request")
        await ownership.close()
        sessions = await _rows(engine, liveness_sessions)
        events = [orjson.loads(row["body"]) for row in await _rows(engine, webhook_events)]
        actions = [row["action"] for row in await _rows(engine, audit_records)]
        verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    finally:
        await engine.dispose()
    assert sessions[0]["finalizer_state"] == "final"
    assert sessions[0]["verdict_status"] == "EXPIRED"
    assert sorted(event["type"] for event in events) == [
        "liveness.session.expired",
        "liveness.session.unresolved",
    ]
    unresolved = next(event for event in events if event["type"] == "liveness.session.unresolved")
    assert unresolved["data"]["status"] is None
    assert unresolved["data"]["completed_at"] is None
    assert actions == ["session.unresolved", "verdict.record"]
    assert verdict.problem is None


async def test_without_a_webhook_endpoint_no_event_is_written(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine)
        owner = SessionOwner("s-3", "carol", "key:3", 100.0, "r-3", subject_commitment=COMMITMENT)
        await ownership.bind(owner, "r-3")
        ledger = VerdictLedger(engine, ownership, TEST_AUDIT_KEYS, events=None, wall_clock=lambda: 900.0)
        await ledger.record(owner, SessionVerdict("SUCCEEDED", 99.0, 101.0, "req-1"), read_by="request")
        await ownership.close()
        events = await _rows(engine, webhook_events)
        job_rows = await _rows(engine, jobs)
        chain = await _rows(engine, audit_records)
    finally:
        await engine.dispose()
    assert events == []
    assert job_rows == []  # not followed (finalizer off): no follow-up either
    assert [row["action"] for row in chain] == ["verdict.record"]


async def test_within_one_group_commit_the_first_verdict_of_a_session_wins(database_url: str) -> None:
    """One ledger, many verdicts at once: they share a transaction (group commit), in which the
    first claim on a session wins and the others read it back; other sessions are unaffected."""
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        owners = [
            SessionOwner(f"s-{index}", "dora", "key:4", 100.0, f"r-{index}", subject_commitment=COMMITMENT)
            for index in range(3)
        ]
        for owner in owners:
            await ownership.bind(owner, owner.request_id)
        ledger = VerdictLedger(
            engine,
            SessionOwnership(engine),
            TEST_AUDIT_KEYS,
            events=VerdictEvents(pass_threshold=None),
            wall_clock=lambda: 200.0,
        )
        contested = owners[0]
        results = await asyncio.gather(
            *(
                ledger.record(
                    contested, SessionVerdict("FAILED", float(index), 200.0, f"q-{index}"), read_by="request"
                )
                for index in range(6)
            ),
            *(
                ledger.record(owner, SessionVerdict("SUCCEEDED", 99.0, 200.0, "q-x"), read_by="finalizer")
                for owner in owners[1:]
            ),
        )
        await ledger.close()
        await ownership.close()
        chain = [row for row in await _rows(engine, audit_records) if row["action"] == "verdict.record"]
        events = await _rows(engine, webhook_events)
        followups = {
            row["ref"]: row["state"] for row in await _rows(engine, jobs) if row["kind"] == "finalize"
        }
    finally:
        await engine.dispose()
    assert {result.verdict for result in results[:6]} == {SessionVerdict("FAILED", 0.0, 200.0, "q-0")}
    assert [result.verdict.status for result in results[6:] if result.verdict] == ["SUCCEEDED", "SUCCEEDED"]
    assert sorted(row["session_id"] for row in chain) == ["s-0", "s-1", "s-2"]
    assert sorted(row["session_id"] for row in events) == ["s-0", "s-1", "s-2"]
    assert followups == {"s-0": "done", "s-1": "done", "s-2": "done"}


async def test_two_writers_recording_the_same_sessions_in_opposite_orders_do_not_deadlock(
    database_url: str,
) -> None:
    """A caller's reads on one replica and finalizer polls on another, over the same sessions in
    opposite orders: batches lock the sessions in one order, so no transaction is aborted."""
    engine = create_engine(database_url, pool_size=10)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        owners = [
            SessionOwner(
                f"s-{index:03d}", "erin", "key:5", 100.0, f"r-{index}", subject_commitment=COMMITMENT
            )
            for index in range(60)
        ]
        await asyncio.gather(*(ownership.bind(owner, owner.request_id) for owner in owners))
        await ownership.close()
        replica_a, replica_b = (
            VerdictLedger(
                engine,
                SessionOwnership(engine),
                TEST_AUDIT_KEYS,
                events=VerdictEvents(pass_threshold=None),
                wall_clock=lambda: 200.0,
            )
            for _ in range(2)
        )
        outcomes = await asyncio.gather(
            *(
                replica_a.record(owner, SessionVerdict("SUCCEEDED", 95.0, 200.0, "a"), read_by="request")
                for owner in owners
            ),
            *(
                replica_b.record(owner, SessionVerdict("FAILED", 5.0, 200.0, "b"), read_by="finalizer")
                for owner in reversed(owners)
            ),
            return_exceptions=True,
        )
        await replica_a.close()
        await replica_b.close()
        chain = [row for row in await _rows(engine, audit_records) if row["action"] == "verdict.record"]
    finally:
        await engine.dispose()
    assert [outcome for outcome in outcomes if isinstance(outcome, BaseException)] == []
    assert len(chain) == 60, "one verdict event per session"


async def test_the_first_delivery_waits_the_first_entry_of_the_retry_schedule(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        done, given_up = (
            SessionOwner(f"s-{name}", "gus", "key:6", 100.0, f"r-{name}", subject_commitment=COMMITMENT)
            for name in ("v", "u")
        )
        for owner in (done, given_up):
            await ownership.bind(owner, owner.request_id)
        ledger = VerdictLedger(
            engine,
            ownership,
            TEST_AUDIT_KEYS,
            events=VerdictEvents(pass_threshold=None),
            wall_clock=lambda: 900.0,
            first_delivery_delay=30.0,
        )
        await ledger.record(done, SessionVerdict("SUCCEEDED", 99.0, 900.0, "q-1"), read_by="request")
        await ledger.mark_unresolved(given_up, request_id="fin-1")
        await ledger.close()
        await ownership.close()
        deliveries = [row["due_at"] for row in await _rows(engine, jobs) if row["kind"] == "deliver"]
    finally:
        await engine.dispose()
    assert deliveries == [930.0, 930.0]
