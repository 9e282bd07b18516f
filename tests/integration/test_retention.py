"""Retention on both engines, on a manual clock: what is older than each cutoff goes, what is newer
stays, the audit chain still verifies with its plain values erased, two sweeps at once count each row
once, and the background job runs on one replica at a time, an interval apart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.background import BackgroundWorker
from liveness_proxy.background.retention import RetentionSweeper, SweepSchedule
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.settings import async_database_url
from liveness_proxy.store import AuditLog, AuditRecord, JobQueue, create_engine, upgrade_database
from liveness_proxy.store.audit_chain import RETENTION_APPLIED
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.retention import (
    DAY_SECONDS,
    SWEEP_REF,
    Retention,
    RetentionPolicy,
    RetentionResult,
    schedule_sweep,
)
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import (
    audit_records,
    erasure_notices,
    idempotency_keys,
    jobs,
    liveness_sessions,
    session_token_bindings,
    webhook_events,
)
from metric_samples import value
from services import scratch_postgres
from support import TEST_AUDIT_KEYS, TEST_KEYS, failed_authentication_record

NOW = 2_000_000_000.0  # 2033-05-18: far from the real time, so a real clock anywhere would show


class ManualClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


async def add_session(
    engine: AsyncEngine,
    session_id: str,
    *,
    created_at: float,
    subject: str = "alice",
    events: int = 1,
    delivery_state: str = "done",
    event_at: float | None = None,
) -> None:
    """A binding with its verdict, its finalizer follow-up (done) and `events` webhook events, each
    with its delivery job."""
    async with engine.begin() as connection:
        await connection.execute(
            insert(liveness_sessions).values(
                session_id=session_id,
                subject=subject,
                credential_id="key:1",
                created_at=created_at,
                request_id="r-" + session_id,
                verdict_status="PASSED",
                verdict_confidence=0.99,
                verdict_at=created_at + 60,
                reference="ref-" + subject,
                finalizer_state="final",
            )
        )
        await connection.execute(
            insert(jobs).values(
                {
                    **enqueue_values(
                        "finalize", session_id, due_at=created_at, now=created_at, trace_parent=None
                    ),
                    "state": "done",
                }
            )
        )
        for index in range(events):
            event_id = f"evt-{session_id}-{index}"
            at = created_at + 60 if event_at is None else event_at
            await connection.execute(
                insert(webhook_events).values(
                    event_id=event_id,
                    type="liveness.session.completed",
                    session_id=session_id,
                    body=orjson.dumps({"subject": subject, "reference": "ref-" + subject}).decode(),
                    created_at=at,
                )
            )
            await connection.execute(
                insert(jobs).values(
                    {
                        **enqueue_values("deliver", event_id, due_at=at, now=at, trace_parent=None),
                        "state": delivery_state,
                    }
                )
            )


async def all_of(engine: AsyncEngine, column: Any) -> set[Any]:
    async with engine.connect() as connection:
        return set((await connection.execute(select(column))).scalars())


async def retention_events(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(audit_records.c.detail, audit_records.c.request_id)
                .where(audit_records.c.action == RETENTION_APPLIED)
                .order_by(audit_records.c.seq)
            )
        ).all()
    return [{"request_id": row.request_id, **orjson.loads(row.detail)} for row in rows]


async def write_audit(
    engine: AsyncEngine, registry: SubjectRegistry, records: list[tuple[float, str]]
) -> None:
    """One request record per (time, subject), with the subject's real commitment, as the proxy writes."""
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index, (occurred_at, subject) in enumerate(records):
        secret = await registry.resolve(subject)
        await log.append(
            AuditRecord(
                occurred_at=occurred_at,
                request_id=f"req-{index}",
                subject=subject,
                credential_id="key:1",
                action="result.read",
                session_id=f"s-{index}",
                status=200,
                upstream_status=200,
                latency_ms=1.0,
                problem=None,
                subject_commitment=secret.commitment,
            )
        )
    await log.close()


async def write_failed_authentication(engine: AsyncEngine, occurred_at: float, address: str) -> None:
    """An aggregate record whose personal value (the client address) sits beside its commitment."""
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    await log.append(failed_authentication_record(address, occurred_at=occurred_at, request_id="fail-1"))
    await log.close()


def retention(engine: AsyncEngine, clock: ManualClock, *, batch_size: int = 2, **policy: int) -> Retention:
    return Retention(
        engine, TEST_AUDIT_KEYS, policy=RetentionPolicy(**policy), wall_clock=clock, batch_size=batch_size
    )


# -- sessions, verdicts, webhook events -------------------------------------------------------------


async def test_sessions_older_than_the_cutoff_go_with_their_events_and_jobs_and_newer_ones_stay(
    engine: AsyncEngine,
) -> None:
    clock = ManualClock()
    old, recent = NOW - 40 * DAY_SECONDS, NOW - 5 * DAY_SECONDS
    for index in range(5):  # more than two batches of two
        await add_session(engine, f"old-{index}", created_at=old + index)
    # An old session whose verdict (and event) came late, inside the period: its payload names the
    # subject, so it goes with its session. And one whose delivery is still queued.
    await add_session(engine, "old-late", created_at=old, event_at=recent)
    await add_session(engine, "old-queued", created_at=old, delivery_state="queued")
    await add_session(engine, "recent", created_at=recent, events=2)
    await add_session(engine, "edge", created_at=NOW - 30 * DAY_SECONDS + 1)  # just inside
    # An old event whose session was erased already (its payload too): it goes on its own.
    async with engine.begin() as connection:
        await connection.execute(
            insert(webhook_events).values(
                event_id="evt-orphan",
                type="liveness.session.completed",
                session_id="gone",
                body=None,
                created_at=old,
                erased_at=old + 1,
            )
        )
        await connection.execute(
            insert(jobs).values(
                {
                    **enqueue_values("deliver", "evt-orphan", due_at=old, now=old, trace_parent=None),
                    "state": "cancelled",
                }
            )
        )
        # Work of other kinds is not the sweep's.
        await connection.execute(
            insert(jobs).values(enqueue_values("erase", "c" * 64, due_at=old, now=old, trace_parent=None))
        )

    result = await retention(engine, clock, retention_days=30).run()

    assert result.complete
    assert result.counts.sessions == 7
    assert result.counts.webhook_events == 8  # seven sessions' events and the orphan
    assert result.counts.jobs == 7 + 7 + 1  # their follow-ups, their deliveries, the orphan's delivery
    assert await all_of(engine, liveness_sessions.c.session_id) == {"recent", "edge"}
    assert await all_of(engine, webhook_events.c.event_id) == {"evt-recent-0", "evt-recent-1", "evt-edge-0"}
    assert await all_of(engine, jobs.c.ref) == {
        "recent",
        "edge",
        "evt-recent-0",
        "evt-recent-1",
        "evt-edge-0",
        "c" * 64,
    }
    assert result.cutoffs.sessions == NOW - 30 * DAY_SECONDS
    assert result.cutoffs.audit_plaintext is None

    [event] = await retention_events(engine)
    assert event["removed"] == result.counts.as_dict()
    assert event["sessions_before"] == NOW - 30 * DAY_SECONDS
    assert event["audit_plaintext_before"] is None
    assert event["complete"] is True
    assert "alice" not in orjson.dumps(event).decode()
    # Every process empties its binding caches when it sees the notice left with the event.
    async with engine.connect() as connection:
        notices = (await connection.execute(select(erasure_notices.c.created_at))).scalars().all()
    assert notices == [NOW]
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok

    again = await retention(engine, clock, retention_days=30).run()
    assert again.counts.total == 0
    assert len(await retention_events(engine)) == 1  # nothing removed, nothing chained


async def test_with_both_settings_at_zero_sessions_and_plain_values_are_kept(engine: AsyncEngine) -> None:
    clock = ManualClock()
    await add_session(engine, "ancient", created_at=NOW - 3650 * DAY_SECONDS)
    registry = SubjectRegistry(engine, TEST_KEYS.subjects)
    await write_audit(engine, registry, [(NOW - 3650 * DAY_SECONDS, "alice")])

    result = await retention(engine, clock).run()

    assert result.counts.total == 0
    assert result.cutoffs.sessions is None
    assert result.cutoffs.audit_plaintext is None
    assert await all_of(engine, liveness_sessions.c.session_id) == {"ancient"}
    assert await all_of(engine, audit_records.c.subject) == {"alice"}
    assert await retention_events(engine) == []


# -- plain values of audit records ---------------------------------------------------------------------


async def test_plain_audit_values_older_than_the_cutoff_are_erased_and_the_chain_still_verifies(
    engine: AsyncEngine,
) -> None:
    clock = ManualClock()
    registry = SubjectRegistry(engine, TEST_KEYS.subjects)
    await write_audit(
        engine,
        registry,
        [
            (NOW - 100 * DAY_SECONDS, "alice"),
            (NOW - 95 * DAY_SECONDS, "bob"),
            (NOW - 91 * DAY_SECONDS, "alice"),
            (NOW - 60 * DAY_SECONDS, "carol"),
            (NOW - 20 * DAY_SECONDS, "alice"),
            (NOW - DAY_SECONDS, "bob"),
        ],
    )
    await write_failed_authentication(engine, NOW - 92 * DAY_SECONDS, "203.0.113.9")
    await write_failed_authentication(engine, NOW - 10 * DAY_SECONDS, "198.51.100.7")
    sweep = retention(engine, clock, audit_plaintext_days=90)

    first = await sweep.run()

    assert first.counts.audit_plaintext == 4  # three request records and one aggregate
    assert first.counts.sessions == 0
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(audit_records)
                .where(audit_records.c.action != RETENTION_APPLIED)
                .order_by(audit_records.c.seq)
            )
        ).all()
    old = [row for row in rows if row.occurred_at < NOW - 90 * DAY_SECONDS]
    new = [row for row in rows if row.occurred_at >= NOW - 90 * DAY_SECONDS]
    assert len(old) == 4
    assert len(new) == 4
    assert all(row.subject is None and row.personal is None and row.erased_at == NOW for row in old)
    assert all(row.subject_commitment or row.personal_commitment for row in old)  # the commitments stay
    assert all(row.erased_at is None and (row.subject or row.personal) for row in new)
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(
        subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
    )
    assert verdict.ok, verdict.problem
    [event] = await retention_events(engine)
    assert event["audit_plaintext_before"] == NOW - 90 * DAY_SECONDS
    assert event["removed"]["audit_plaintext"] == 4
    assert "203.0.113.9" not in orjson.dumps(event).decode()

    # 75 days later the next run starts where the last complete one left off, and erases what aged.
    clock.now += 75 * DAY_SECONDS
    second = await sweep.run()
    assert second.counts.audit_plaintext == 2  # carol's and alice's at -20 days; not the aggregate at -10
    assert await all_of(engine, audit_records.c.subject) == {None, "bob"}
    assert len(await all_of(engine, audit_records.c.personal)) == 2  # None, and the newer address
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(
        subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
    )
    assert verdict.ok, verdict.problem
    assert [event["audit_plaintext_before"] for event in await retention_events(engine)] == [
        NOW - 90 * DAY_SECONDS,
        NOW - 15 * DAY_SECONDS,
    ]


async def test_an_erased_plain_value_put_back_wrong_is_still_detected(engine: AsyncEngine) -> None:
    clock = ManualClock()
    registry = SubjectRegistry(engine, TEST_KEYS.subjects)
    await write_audit(
        engine, registry, [(NOW - 100 * DAY_SECONDS, "alice"), (NOW - 100 * DAY_SECONDS, "bob")]
    )
    await retention(engine, clock, audit_plaintext_days=90).run()
    async with engine.begin() as connection:
        await connection.execute(
            update(audit_records).where(audit_records.c.seq == 2).values(subject="mallory")
        )
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(
        subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
    )
    assert not verdict.ok
    assert verdict.problem is not None
    assert verdict.problem.seq == 2


# -- what has no setting of its own ----------------------------------------------------------------------


async def test_expired_idempotency_records_and_token_bindings_and_day_old_notices_go(
    engine: AsyncEngine,
) -> None:
    clock = ManualClock()
    async with engine.begin() as connection:
        await connection.execute(
            insert(idempotency_keys),
            [
                {
                    "subject_hash": f"{index:064x}",
                    "idempotency_key": "k",
                    "fingerprint": "f" * 64,
                    "status": 201,
                    "content_type": "application/json",
                    "body": "{}",
                    "created_at": NOW - 3600,
                    "expires_at": NOW - 1 if index < 5 else NOW + 60,
                }
                for index in range(8)
            ],
        )
        await connection.execute(
            insert(session_token_bindings),
            [
                {
                    "token_hash": f"{index:064x}",
                    "subject_hash": "s" * 64,
                    "expires_at": NOW - 1 if index < 3 else NOW + 1,
                }
                for index in range(6)
            ],
        )
        await connection.execute(
            insert(erasure_notices),
            [
                {"subject_commitment": None, "created_at": at}
                for at in (NOW - 3 * DAY_SECONDS, NOW - 2 * DAY_SECONDS, NOW - 60)
            ],
        )

    result = await retention(engine, clock).run()

    assert (
        result.counts.idempotency_records,
        result.counts.session_tokens,
        result.counts.erasure_notices,
    ) == (5, 3, 2)
    assert len(await all_of(engine, idempotency_keys.c.subject_hash)) == 3
    assert len(await all_of(engine, session_token_bindings.c.token_hash)) == 3
    assert await all_of(engine, erasure_notices.c.created_at) == {NOW - 60}
    assert [event["removed"]["erasure_notices"] for event in await retention_events(engine)] == [2]


async def test_the_newest_erasure_notice_stays_however_old(engine: AsyncEngine) -> None:
    # Processes compare the highest notice id with the one they saw: were the table emptied, SQLite
    # would hand out the same ids again and a new erasure could go unnoticed.
    clock = ManualClock()
    async with engine.begin() as connection:
        await connection.execute(
            insert(erasure_notices), [{"subject_commitment": None, "created_at": NOW - 9 * DAY_SECONDS}] * 3
        )
        newest = (await connection.execute(select(func.max(erasure_notices.c.id)))).scalar_one()
    result = await retention(engine, clock).run()
    assert result.counts.erasure_notices == 2
    assert await all_of(engine, erasure_notices.c.id) == {newest}


# -- concurrency and bounds ------------------------------------------------------------------------------


async def test_two_sweeps_at_once_on_two_engines_count_each_row_once(database_url: str) -> None:
    first, second = create_engine(database_url), create_engine(database_url)
    try:
        await upgrade_database(first, keys=TEST_KEYS)
        clock = ManualClock()
        for index in range(60):
            await add_session(first, f"s-{index:03}", created_at=NOW - 40 * DAY_SECONDS + index)
        registry = SubjectRegistry(first, TEST_KEYS.subjects)
        await write_audit(
            first, registry, [(NOW - 100 * DAY_SECONDS + index, f"user-{index % 7}") for index in range(80)]
        )
        policy = {"retention_days": 30, "audit_plaintext_days": 90}

        results = await asyncio.wait_for(
            asyncio.gather(
                retention(first, clock, batch_size=7, **policy).run(),
                retention(second, clock, batch_size=7, **policy).run(),
            ),
            timeout=60,
        )

        def total(kind: str) -> int:
            return sum(result.counts.as_dict()[kind] for result in results)

        assert (total("sessions"), total("webhook_events"), total("jobs"), total("audit_plaintext")) == (
            60,
            60,
            120,
            80,
        )
        assert await all_of(first, liveness_sessions.c.session_id) == set()
        assert await all_of(first, audit_records.c.subject) == {None}
        events = await retention_events(first)
        assert sum(event["removed"]["sessions"] for event in events) == 60
        verdict = await AuditLog(first, TEST_AUDIT_KEYS).verify(
            subjects=SubjectRegistry(first, TEST_KEYS.subjects)
        )
        assert verdict.ok, verdict.problem
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_run_out_of_time_stops_between_batches_and_the_next_one_finishes(engine: AsyncEngine) -> None:
    clock = ManualClock()
    for index in range(9):
        await add_session(engine, f"s-{index}", created_at=NOW - 40 * DAY_SECONDS + index)
    ticks = iter(range(1000))  # each look at the time budget is a second later
    sweep = Retention(
        engine,
        TEST_AUDIT_KEYS,
        policy=RetentionPolicy(retention_days=30),
        wall_clock=clock,
        batch_size=2,
        clock=lambda: float(next(ticks)),
    )

    cut = await sweep.run(time_budget=1.5)

    assert not cut.complete
    assert cut.counts.sessions == 4  # two batches: the budget was spent after the second
    assert [event["complete"] for event in await retention_events(engine)] == [False]
    rest = await sweep.run()
    assert rest.complete
    assert rest.counts.sessions == 5
    assert await all_of(engine, liveness_sessions.c.session_id) == set()


# -- the background job ----------------------------------------------------------------------------------


@dataclass
class Overlap:
    running: int = 0
    most_at_once: int = 0


class ObservedRetention(Retention):
    """The real sweep, slowed down and watched: how often it ran, and how many ran at once across
    the replicas that share `overlap`."""

    def __init__(self, *args: Any, overlap: Overlap, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlap = overlap
        self.runs = 0
        self.running = False

    async def run(
        self, *, request_id: str | None = None, time_budget: float | None = None
    ) -> RetentionResult:
        self.running = True
        self.overlap.running += 1
        self.overlap.most_at_once = max(self.overlap.most_at_once, self.overlap.running)
        try:
            await asyncio.sleep(0.2)  # long enough for the other worker's passes to try to claim it
            return await super().run(request_id=request_id, time_budget=time_budget)
        finally:
            self.overlap.running -= 1
            self.running = False
            self.runs += 1


async def _sweep_job(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        return dict((await connection.execute(select(jobs).where(jobs.c.kind == "retention"))).one()._mapping)


async def _until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_one_of_two_workers_sweeps_and_the_job_is_queued_again_an_interval_later(
    database_url: str,
) -> None:
    engines = [create_engine(database_url), create_engine(database_url)]
    await upgrade_database(engines[0], keys=TEST_KEYS)
    clock = ManualClock()
    for index in range(3):
        await add_session(engines[0], f"s-{index}", created_at=NOW - 40 * DAY_SECONDS)
    overlap = Overlap()
    sweeps: list[ObservedRetention] = []
    workers: list[BackgroundWorker] = []
    metrics = [ProxyMetrics(include_process_metrics=False) for _ in engines]
    for engine, registry in zip(engines, metrics, strict=True):
        sweep = ObservedRetention(
            engine,
            TEST_AUDIT_KEYS,
            policy=RetentionPolicy(retention_days=30),
            wall_clock=clock,
            overlap=overlap,
        )
        sweeps.append(sweep)
        queue = JobQueue(engine)
        workers.append(
            BackgroundWorker(
                queue,
                [
                    RetentionSweeper(
                        engine=engine,
                        queue=queue,
                        retention=sweep,
                        schedule=SweepSchedule(interval_seconds=3600, time_budget_seconds=30),
                        wall_clock=clock,
                        metrics=registry,
                        logger=structlog.get_logger(),
                    )
                ],
                lease_seconds=60,
                interval_seconds=0.02,
                wall_clock=clock,
                logger=structlog.get_logger(),
            )
        )
    try:
        for worker in workers:
            worker.start()

        async def ran(count: int) -> bool:
            return sum(sweep.runs for sweep in sweeps) >= count and overlap.running == 0

        await _until(lambda: ran(1))
        await asyncio.sleep(0.3)  # the other worker keeps looking: the job is not due again yet
        assert sum(sweep.runs for sweep in sweeps) == 1
        job = await _sweep_job(engines[0])
        assert (job["state"], job["due_at"], job["attempts"], job["lease_owner"]) == (
            "queued",
            NOW + 3600,
            0,
            None,
        )
        assert job["ref"] == SWEEP_REF
        assert await all_of(engines[0], liveness_sessions.c.session_id) == set()
        ran_it = next(index for index, sweep in enumerate(sweeps) if sweep.runs)
        assert value(metrics[ran_it], "liveness_proxy_retention_removed_total", kind="sessions") == 3
        assert value(metrics[ran_it], "liveness_proxy_retention_last_run_timestamp_seconds") == NOW
        assert value(metrics[1 - ran_it], "liveness_proxy_retention_last_run_timestamp_seconds") == 0

        clock.now += 3600  # due again: one more run, on either replica, never on both
        await _until(lambda: ran(2))
        await asyncio.sleep(0.3)
        assert sum(sweep.runs for sweep in sweeps) == 2
        assert overlap.most_at_once == 1
        job = await _sweep_job(engines[0])
        assert (job["state"], job["due_at"], job["attempts"]) == ("queued", NOW + 7200, 0)
    finally:
        for worker in workers:
            await worker.close()
        for engine in engines:
            await engine.dispose()


async def test_the_sweep_job_is_made_once_by_many_replicas_and_brought_back_when_dead(
    database_url: str,
) -> None:
    engines = [create_engine(database_url) for _ in range(4)]
    try:
        await upgrade_database(engines[0], keys=TEST_KEYS)
        await asyncio.gather(*(schedule_sweep(engine, now=NOW, interval_seconds=3600) for engine in engines))
        job = await _sweep_job(engines[0])
        assert (job["state"], job["due_at"]) == ("queued", NOW)

        async with engines[0].begin() as connection:
            await connection.execute(
                update(jobs)
                .where(jobs.c.kind == "retention")
                .values(state="dead", attempts=50, last_error="boom")
            )
        await schedule_sweep(engines[1], now=NOW + 10, interval_seconds=3600)
        job = await _sweep_job(engines[0])
        assert (job["state"], job["due_at"], job["attempts"]) == ("queued", NOW + 10, 0)

        # A shorter interval than the one the job was last settled with brings it forward.
        async with engines[0].begin() as connection:
            await connection.execute(
                update(jobs).where(jobs.c.kind == "retention").values(due_at=NOW + 86400)
            )
        await schedule_sweep(engines[2], now=NOW + 20, interval_seconds=60)
        assert (await _sweep_job(engines[0]))["due_at"] == NOW + 80
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with scratch_postgres() as url:
        yield async_database_url(url)


async def test_on_postgresql_a_session_whose_rows_another_transaction_holds_waits_for_the_next_run(
    postgres_url: str,
) -> None:
    # The sweep never waits for a row lock (so it can be in no deadlock): here a delivery being
    # recorded holds its job row. Without SKIP LOCKED the run would block until the timeout.
    engine = create_engine(postgres_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        clock = ManualClock()
        await add_session(engine, "held", created_at=NOW - 40 * DAY_SECONDS)
        await add_session(engine, "free", created_at=NOW - 40 * DAY_SECONDS + 1)
        sweep = retention(engine, clock, retention_days=30)
        async with engine.connect() as holder:
            # Its transaction stays open until the rollback.
            await holder.execute(select(jobs.c.id).where(jobs.c.ref == "evt-held-0").with_for_update())
            first = await asyncio.wait_for(sweep.run(), timeout=10)
            await holder.rollback()
        assert first.counts.sessions == 1
        assert await all_of(engine, liveness_sessions.c.session_id) == {"held"}
        assert await all_of(engine, webhook_events.c.event_id) == {"evt-held-0"}
        second = await asyncio.wait_for(sweep.run(), timeout=10)
        assert (second.counts.sessions, second.counts.webhook_events, second.counts.jobs) == (1, 1, 2)
        assert await all_of(engine, jobs.c.id) == set()
    finally:
        await engine.dispose()
