"""Retention: what the proxy holds about people, removed once it is older than the operator allows.

What goes (the wiring turns the settings into a `RetentionPolicy`):
- `retention_days` (LIVENESS_PROXY_RETENTION_DAYS, 0 keeps): sessions created before the cutoff, with
  their verdicts, their webhook events (the payloads hold the subject and the reference) and every
  job of theirs (the finalizer follow-up, ref = session id; each event's delivery, ref = event id),
  whatever the job's state: a delivery still queued after that long (an endpoint disabled for
  weeks) goes too, because its payload is past its time. Then webhook events older than the cutoff
  whose session is gone already (an erased session leaves its events, payload emptied).
- `audit_plaintext_days` (LIVENESS_PROXY_AUDIT_PLAINTEXT_RETENTION_DAYS, 0 keeps): the plain values
  (`subject`, `personal`) of audit records that occurred before the cutoff are erased and
  `erased_at` set. Their commitments and every hash stay, so the chain still verifies; records are
  never deleted here (that is `audit purge`).
- always: idempotency records and session-token bindings past their own expiry (their writers sweep
  only a bounded number as they write, so a deployment that goes quiet would keep the rest), and
  erasure notices older than a day (processes poll them every few seconds; the newest one always
  stays, so the highest id, which is what they compare, never goes back).

One `retention.applied` event is chained when anything was removed: the counts, the cutoffs, never a
name. When sessions went, the same transaction leaves an erasure notice, so every process empties
the caches that may still hold their bindings.

Concurrency. Each transaction handles at most `batch_size` driving rows (sessions, events, audit
records, expired rows) and the few rows that hang off them. On PostgreSQL every row a transaction
deletes or updates is first locked with `FOR UPDATE SKIP LOCKED`: the sweep never waits for a row
lock, so it cannot be part of a deadlock, and two sweeps at once (a replica and a cron run) take
disjoint rows and count each row once. (Its one chain event waits its turn for the chain head, in a
transaction of its own that holds nothing else but a new notice, like any audit write.) A session
whose event or job another transaction holds is left for the next run. On SQLite each batch begins
`IMMEDIATE`, so its reads and writes see one state, and the single writer lock orders the rest.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import RETENTION_APPLIED, AuditKeys, system_event
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.tables import (
    audit_records,
    erasure_notices,
    idempotency_keys,
    jobs,
    liveness_sessions,
    session_token_bindings,
    webhook_events,
)
from liveness_proxy.store.tally import Tally

DEFAULT_BATCH = 500
DAY_SECONDS = 86_400.0
# Erasure notices only need to outlive every process's next poll (a few seconds): a day is ample.
NOTICE_SECONDS = DAY_SECONDS
# The one periodic job that runs the sweep (store/jobs.py): kind `retention`, this ref.
SWEEP_REF = "sweep"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Days after which each kind of data goes; 0 keeps it."""

    retention_days: int = 0
    audit_plaintext_days: int = 0

    def __post_init__(self) -> None:
        if self.retention_days < 0 or self.audit_plaintext_days < 0:
            raise ValueError("retention days cannot be negative")


@dataclass(slots=True)
class RetentionCounts(Tally):
    """What one run removed. The field names are the `kind` label values of
    `liveness_proxy_retention_removed_total`."""

    sessions: int = 0
    webhook_events: int = 0
    jobs: int = 0
    audit_plaintext: int = 0  # audit records whose plain values were erased (the records stay)
    idempotency_records: int = 0
    session_tokens: int = 0
    erasure_notices: int = 0


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Epoch seconds: what is older than each was removed. None: that kind is kept."""

    sessions: float | None
    audit_plaintext: float | None
    erasure_notices: float
    expired: float  # idempotency records and session-token bindings that expired before this

    def as_dict(self) -> dict[str, float | None]:
        return {
            "sessions_before": self.sessions,
            "audit_plaintext_before": self.audit_plaintext,
            "erasure_notices_before": self.erasure_notices,
            "expired_before": self.expired,
        }


@dataclass(frozen=True, slots=True)
class RetentionResult:
    counts: RetentionCounts
    cutoffs: Cutoffs
    # False when the time budget ran out first: the rest is left for the next run.
    complete: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": self.counts.as_dict(),
            "cutoffs": self.cutoffs.as_dict(),
            "complete": self.complete,
        }


class Retention:
    def __init__(
        self,
        engine: AsyncEngine,
        keys: AuditKeys,
        *,
        policy: RetentionPolicy,
        wall_clock: Callable[[], float],
        batch_size: int = DEFAULT_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`wall_clock` dates the cutoffs and what is written; `clock` measures the time budget."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._engine = engine
        self._chain = ChainWriter.build(keys)
        self._policy = policy
        self._wall_clock = wall_clock
        self._batch = batch_size
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def policy(self) -> RetentionPolicy:
        return self._policy

    def cutoffs(self, now: float) -> Cutoffs:
        policy = self._policy
        return Cutoffs(
            sessions=now - policy.retention_days * DAY_SECONDS if policy.retention_days else None,
            audit_plaintext=(
                now - policy.audit_plaintext_days * DAY_SECONDS if policy.audit_plaintext_days else None
            ),
            erasure_notices=now - NOTICE_SECONDS,
            expired=now,
        )

    async def run(
        self, *, request_id: str | None = None, time_budget: float | None = None
    ) -> RetentionResult:
        """One sweep. `time_budget` (seconds): stop between batches once it is spent (the result then
        says `complete=False`); a run cut short, by that or by a crash, is finished by the next."""
        now = self._wall_clock()
        cutoffs = self.cutoffs(now)
        counts = RetentionCounts()
        deadline = None if time_budget is None else self._clock() + time_budget
        steps: list[Callable[[], Awaitable[bool]]] = [
            lambda: self._notices_batch(cutoffs.erasure_notices, counts),
            lambda: self._idempotency_batch(cutoffs.expired, counts),
            lambda: self._session_tokens_batch(cutoffs.expired, counts),
        ]
        if cutoffs.sessions is not None:
            sessions_before = cutoffs.sessions
            steps.append(lambda: self._sessions_batch(sessions_before, counts))
            steps.append(lambda: self._events_batch(sessions_before, counts))
        if cutoffs.audit_plaintext is not None:
            plaintext = _PlaintextCursor(cutoffs.audit_plaintext, floor=await self._plaintext_floor())
            steps.append(lambda: self._plaintext_batch(plaintext, now, counts))
        complete = True
        for step in steps:
            if not await self._repeat(step, deadline):
                complete = False
                break
        if counts.total:
            await self._record(
                counts, cutoffs, complete, now, request_id or "retention-" + secrets.token_hex(12)
            )
        return RetentionResult(counts, cutoffs, complete)

    async def _repeat(self, batch: Callable[[], Awaitable[bool]], deadline: float | None) -> bool:
        """Runs `batch` until it says there is no more; False when the deadline came first."""
        while await batch():
            if deadline is not None and self._clock() >= deadline:
                return False
        return True

    # -- batches: each returns whether another one may find more ---------------------------------------

    async def _sessions_batch(self, cutoff: float, counts: RetentionCounts) -> bool:
        sessions, events = liveness_sessions.c, webhook_events.c
        async with self._transaction() as connection:
            found = await self._strings(
                connection,
                self._locked(
                    select(sessions.session_id)
                    .where(sessions.created_at < cutoff)
                    .order_by(sessions.created_at)
                    .limit(self._batch)
                ),
            )
            if not found:
                return False
            # What hangs off them, read without a lock, then locked without waiting: a session any of
            # whose rows another transaction holds (a delivery being recorded) waits for the next run.
            event_session = {
                str(row.event_id): str(row.session_id)
                for row in await connection.execute(
                    select(events.event_id, events.session_id).where(events.session_id.in_(found))
                )
            }
            job_rows = (
                await connection.execute(
                    select(jobs.c.id, jobs.c.kind, jobs.c.ref).where(
                        or_(
                            (jobs.c.kind == "finalize") & jobs.c.ref.in_(found),
                            (jobs.c.kind == "deliver") & jobs.c.ref.in_(list(event_session)),
                        )
                    )
                )
            ).all()
            job_session = {
                int(row.id): str(row.ref) if row.kind == "finalize" else event_session[str(row.ref)]
                for row in job_rows
            }
            busy = await self._busy(connection, event_session, job_session)
            gone = [session_id for session_id in found if session_id not in busy]
            if gone:
                going = set(gone)
                counts.jobs += await self._delete_in(
                    connection, jobs, jobs.c.id, [job for job, owner in job_session.items() if owner in going]
                )
                counts.webhook_events += await self._delete_in(
                    connection,
                    webhook_events,
                    events.event_id,
                    [event for event, owner in event_session.items() if owner in going],
                )
                counts.sessions += await self._delete_in(
                    connection, liveness_sessions, sessions.session_id, gone
                )
        return len(found) == self._batch and bool(gone)

    async def _events_batch(self, cutoff: float, counts: RetentionCounts) -> bool:
        """Events older than the cutoff that outlived their session (an erasure deletes the session
        and keeps its events, payload emptied). The events of a session that is still there go with
        it, in the batch above, never on their own: a concurrent sweep's session batch may be
        deciding on them right now."""
        events, sessions = webhook_events.c, liveness_sessions.c
        orphaned = ~select(sessions.session_id).where(sessions.session_id == events.session_id).exists()
        async with self._transaction() as connection:
            found = await self._strings(
                connection,
                self._locked(
                    select(events.event_id).where(events.created_at < cutoff, orphaned).limit(self._batch)
                ),
            )
            if not found:
                return False
            job_rows = (
                await connection.execute(
                    select(jobs.c.id, jobs.c.ref).where(jobs.c.kind == "deliver", jobs.c.ref.in_(found))
                )
            ).all()
            job_event = {int(row.id): str(row.ref) for row in job_rows}
            busy = await self._busy(connection, {}, job_event)
            gone = [event_id for event_id in found if event_id not in busy]
            if gone:
                going = set(gone)
                counts.jobs += await self._delete_in(
                    connection, jobs, jobs.c.id, [job for job, event in job_event.items() if event in going]
                )
                counts.webhook_events += await self._delete_in(
                    connection, webhook_events, events.event_id, gone
                )
        return len(found) == self._batch and bool(gone)

    async def _plaintext_batch(self, cursor: _PlaintextCursor, now: float, counts: RetentionCounts) -> bool:
        records = audit_records.c
        conditions = [records.occurred_at < cursor.cutoff, _has_plain()]
        if cursor.floor is not None:
            conditions.append(records.occurred_at >= cursor.floor)
        async with self._transaction() as connection:
            rows = (
                await connection.execute(
                    self._locked(
                        select(records.id, records.occurred_at)
                        .where(*conditions)
                        .order_by(records.occurred_at)
                        .limit(self._batch)
                    )
                )
            ).all()
            if not rows:
                return False
            result = await connection.execute(
                update(audit_records)
                .where(records.id.in_([int(row.id) for row in rows]), _has_plain())
                .values(subject=None, personal=None, erased_at=now)
            )
            counts.audit_plaintext += result.rowcount or 0
        # The next batch starts where this one ended: what lies below is erased, and scanning it
        # again would make a run quadratic in the records it erases.
        cursor.floor = max(float(row.occurred_at) for row in rows)
        return len(rows) == self._batch

    async def _idempotency_batch(self, now: float, counts: RetentionCounts) -> bool:
        keys = idempotency_keys.c
        expired = self._locked(
            select(keys.subject_hash, keys.idempotency_key).where(keys.expires_at < now).limit(self._batch)
        )
        async with self._transaction() as connection:
            result = await connection.execute(
                delete(idempotency_keys).where(tuple_(keys.subject_hash, keys.idempotency_key).in_(expired))
            )
        deleted = result.rowcount or 0
        counts.idempotency_records += deleted
        return deleted == self._batch

    async def _session_tokens_batch(self, now: float, counts: RetentionCounts) -> bool:
        bindings = session_token_bindings.c
        expired = self._locked(
            select(bindings.token_hash).where(bindings.expires_at < now).limit(self._batch)
        )
        async with self._transaction() as connection:
            result = await connection.execute(
                delete(session_token_bindings).where(bindings.token_hash.in_(expired.scalar_subquery()))
            )
        deleted = result.rowcount or 0
        counts.session_tokens += deleted
        return deleted == self._batch

    async def _notices_batch(self, cutoff: float, counts: RetentionCounts) -> bool:
        notices = erasure_notices.c
        newest = select(func.max(notices.id)).scalar_subquery()
        old = self._locked(
            select(notices.id).where(notices.created_at < cutoff, notices.id < newest).limit(self._batch)
        )
        async with self._transaction() as connection:
            result = await connection.execute(
                delete(erasure_notices).where(notices.id.in_(old.scalar_subquery()))
            )
        deleted = result.rowcount or 0
        counts.erasure_notices += deleted
        return deleted == self._batch

    # -- the event ---------------------------------------------------------------------------------------

    async def _record(
        self, counts: RetentionCounts, cutoffs: Cutoffs, complete: bool, now: float, request_id: str
    ) -> None:
        detail = {"removed": counts.as_dict(), **cutoffs.as_dict(), "complete": complete}
        async with self._transaction() as connection:
            if counts.sessions:
                # Every process empties its caches of bindings (which hold subjects) when it sees this.
                await connection.execute(
                    erasure_notices.insert().values(subject_commitment=None, created_at=now)
                )
            await self._chain.append(
                connection,
                [system_event(RETENTION_APPLIED, request_id=request_id, occurred_at=now, facts=detail)],
            )
        if not self._postgres:
            # secure_delete zeroed the pages in the database; the write-ahead log still holds them as
            # they were: copy the new ones back and empty it (best effort, like an erasure).
            async with self._engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _plaintext_floor(self) -> float | None:
        """Where the last complete run left the plain values: everything older was erased then (a
        record is written at most seconds after it occurred, and the cutoff is days back). Only an
        optimisation: None scans from the first record."""
        records = audit_records.c
        async with self._engine.connect() as connection:
            detail = (
                await connection.execute(
                    select(records.detail)
                    .where(records.action == RETENTION_APPLIED)
                    .order_by(records.seq.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        if detail is None:
            return None
        try:
            parsed = orjson.loads(detail)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(parsed, dict) or parsed.get("complete") is not True:
            return None
        before = parsed.get("audit_plaintext_before")
        return float(before) if isinstance(before, int | float) else None

    # -- helpers -----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as connection:
            if not self._postgres:
                # pysqlite begins a transaction only at the first write: the batch's reads would
                # otherwise not see the state its writes change.
                await connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection

    def _locked(self, query: Any) -> Any:
        return query.with_for_update(skip_locked=True) if self._postgres else query

    async def _busy(
        self, connection: AsyncConnection, event_owner: dict[str, str], job_owner: dict[int, str]
    ) -> set[str]:
        """The owners (sessions, or events) of the events and jobs given that another transaction
        holds: each row is locked here without waiting, and one that cannot be is busy."""
        if not self._postgres:
            return set()  # the write lock this transaction holds is the only one
        busy: set[str] = set()
        if event_owner:
            locked = set(
                await self._strings(
                    connection,
                    self._locked(
                        select(webhook_events.c.event_id).where(
                            webhook_events.c.event_id.in_(list(event_owner))
                        )
                    ),
                )
            )
            busy |= {owner for event, owner in event_owner.items() if event not in locked}
        if job_owner:
            locked_jobs = {
                int(value)
                for value in (
                    await connection.execute(
                        self._locked(select(jobs.c.id).where(jobs.c.id.in_(list(job_owner))))
                    )
                ).scalars()
            }
            busy |= {owner for job, owner in job_owner.items() if job not in locked_jobs}
        return busy

    @staticmethod
    async def _strings(connection: AsyncConnection, query: Any) -> list[str]:
        return [str(value) for value in (await connection.execute(query)).scalars()]

    @staticmethod
    async def _delete_in(connection: AsyncConnection, table: Any, column: Any, values: list[Any]) -> int:
        if not values:
            return 0
        result = await connection.execute(delete(table).where(column.in_(values)))
        return result.rowcount or 0


@dataclass(slots=True)
class _PlaintextCursor:
    cutoff: float
    floor: float | None


def _has_plain() -> Any:
    return or_(audit_records.c.subject.is_not(None), audit_records.c.personal.is_not(None))


async def schedule_sweep(engine: AsyncEngine, *, now: float, interval_seconds: float) -> None:
    """Makes sure the one `retention` job exists and runs within `interval_seconds`: inserted if
    absent (the unique (kind, ref) makes this safe with many replicas starting at once), brought
    back to the queue if a run of failures ended it as dead, and brought forward if the interval
    was shortened since it was last settled."""
    dialect_insert = postgresql_insert if engine.dialect.name == "postgresql" else sqlite_insert
    this_job = (jobs.c.kind == "retention", jobs.c.ref == SWEEP_REF)
    async with engine.begin() as connection:
        await connection.execute(
            dialect_insert(jobs)
            # A periodic sweep is nobody's request: each run starts a trace of its own.
            .values(enqueue_values("retention", SWEEP_REF, due_at=now, now=now, trace_parent=None))
            .on_conflict_do_nothing(index_elements=[jobs.c.kind, jobs.c.ref])
        )
        await connection.execute(
            update(jobs)
            .where(*this_job, jobs.c.state != "queued")
            .values(
                state="queued", due_at=now, attempts=0, lease_owner=None, lease_until=None, updated_at=now
            )
        )
        await connection.execute(
            update(jobs)
            .where(*this_job, jobs.c.state == "queued", jobs.c.due_at > now + interval_seconds)
            .values(due_at=now + interval_seconds, updated_at=now)
        )
