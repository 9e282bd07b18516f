"""Durable background work: rows in `jobs`, claimed with a lease, retried on a schedule.

One mechanism serves every kind of work (finalizer follow-ups, webhook deliveries): a row is
written in the same transaction as the fact it follows from (`enqueue_values` gives its columns to
the writer of that fact), so a crash can never leave the fact without its follow-up.

Claiming
--------
`claim` takes due, queued rows whose lease is free or lapsed and stamps them with this process's
lease (`lease_owner`, `lease_until`) and one more attempt, in one statement. On PostgreSQL the
candidate rows are locked `FOR UPDATE SKIP LOCKED`, so replicas claiming at the same moment take
different rows without waiting for each other. SQLite has one writer at a time, so the same
statement there is already exclusive.

A worker that dies mid-job (SIGKILL, lost machine) simply stops renewing nothing: once its lease has
lapsed, another process claims the row again. That is why work must be idempotent or tolerate being
done twice (a finalizer poll is a read; a webhook is delivered at least once, deduplicated by the
receiver on `webhook-id`).

Every later write of a claimed row is fenced by the lease owner: a process whose lease lapsed and
was taken over cannot overwrite the new owner's outcome.

Trace context
-------------
A job keeps the W3C `traceparent` of the span that was current when its fact was written
(`trace_parent`; NULL with tracing off or outside any span), and the worker runs it in a child of
that span: a finalizer poll joins the trace of the request that created the session, a webhook
delivery the trace of whatever recorded the verdict. The writer passes the value in explicitly,
because a group commit writes in a task of its own whose current span is not the caller's (the
value is read when the caller submits: `current_traceparent()`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.tables import jobs

# `erase`: an erasure's follow-up (ref = the commitment); `retention`: the one periodic sweep.
JobKind = Literal["finalize", "deliver", "erase", "retention"]
# `cancelled`: a delivery whose event an erasure removed.
JobState = Literal["queued", "done", "dead", "cancelled"]
_MAX_ERROR_CHARS = 255


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    kind: str
    ref: str
    attempts: int  # including this one
    due_at: float
    created_at: float  # for a follow-up: when its session was created (the schedule counts from it)
    trace_parent: str | None = None  # the span that caused the job (see "Trace context")


def enqueue_values(
    kind: JobKind, ref: str, *, due_at: float, now: float, trace_parent: str | None
) -> dict[str, Any]:
    """The columns of a new queued job, for an INSERT in the caller's transaction. `trace_parent`:
    the caller's `current_traceparent()`, read in the caller's own task (None: the job starts a
    trace of its own when it runs). Required, so that no writer forgets it or reads it in a task
    whose current span belongs to someone else."""
    return {
        "kind": kind,
        "ref": ref,
        "state": "queued",
        "due_at": due_at,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "trace_parent": trace_parent,
    }


class JobQueue:
    """Claims and settles jobs on one engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._skip_locked = engine.dialect.name == "postgresql"

    async def claim(
        self,
        kind: JobKind,
        *,
        owner: str,
        limit: int,
        lease_seconds: float,
        now: float,
        running: Collection[int] = (),
    ) -> list[ClaimedJob]:
        """Up to `limit` due jobs of `kind`, leased to `owner` until now + lease_seconds. `running`:
        the ids this process still runs, never claimed again by it even if their lease lapsed."""
        if limit <= 0:
            return []
        claimable = [
            jobs.c.state == "queued",
            jobs.c.kind == kind,
            jobs.c.due_at <= now,
            or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now),
        ]
        if running:
            claimable.append(jobs.c.id.not_in(list(running)))
        # A read first: most passes find nothing due, and on SQLite even an UPDATE that changes
        # nothing takes the database's write lock, which the audit writer is waiting for.
        async with self._engine.connect() as connection:
            if (await connection.execute(select(jobs.c.id).where(*claimable).limit(1))).first() is None:
                return []
        candidates = select(jobs.c.id).where(*claimable).order_by(jobs.c.due_at).limit(limit)
        if self._skip_locked:
            candidates = candidates.with_for_update(skip_locked=True)
        statement = (
            update(jobs)
            .where(jobs.c.id.in_(candidates.scalar_subquery()))
            .values(
                lease_owner=owner,
                lease_until=now + lease_seconds,
                attempts=jobs.c.attempts + 1,
                updated_at=now,
            )
            .returning(
                jobs.c.id,
                jobs.c.kind,
                jobs.c.ref,
                jobs.c.attempts,
                jobs.c.due_at,
                jobs.c.created_at,
                jobs.c.trace_parent,
            )
        )
        async with self._engine.begin() as connection:
            rows = (await connection.execute(statement)).all()
        return sorted(
            (
                ClaimedJob(
                    row.id, row.kind, row.ref, row.attempts, row.due_at, row.created_at, row.trace_parent
                )
                for row in rows
            ),
            key=lambda job: job.due_at,
        )

    async def settle(
        self,
        connection: AsyncConnection,
        job: ClaimedJob,
        *,
        owner: str,
        state: JobState,
        now: float,
        due_at: float | None = None,
        error: str | None = None,
        count_attempt: bool = True,
        reset_attempts: bool = False,
    ) -> bool:
        """Ends this claim in the caller's transaction: `done`, `dead`, or `queued` again at `due_at`
        (a retry). `count_attempt=False` gives the attempt back (the work was put back, not tried).
        `reset_attempts`: a periodic job's run ended well, so its next run starts afresh (attempts 0,
        the last error cleared); otherwise runs would add up to the worker's dead-letter limit.
        False when this claim is no longer the job's current one (its lease lapsed and the job was
        claimed again, by another process or by this one): the newer claim's outcome stands. The
        claim is identified by its owner and its attempt number, which every claim increments."""
        values: dict[str, Any] = {"state": state, "lease_owner": None, "lease_until": None, "updated_at": now}
        if due_at is not None:
            values["due_at"] = due_at
        if error is not None or state != "queued":
            values["last_error"] = None if error is None else error[:_MAX_ERROR_CHARS]
        if not count_attempt:
            values["attempts"] = jobs.c.attempts - 1
        if reset_attempts:
            values["attempts"] = 0
            values["last_error"] = None if error is None else error[:_MAX_ERROR_CHARS]
        result = await connection.execute(
            update(jobs)
            .where(
                jobs.c.id == job.id,
                jobs.c.lease_owner == owner,
                jobs.c.attempts == job.attempts,
                jobs.c.state == "queued",
            )
            .values(**values)
        )
        return bool(result.rowcount)

    async def release(self, job: ClaimedJob, *, owner: str, now: float) -> None:
        """Ends this claim's lease now (a shutdown cut it short), so that any process may claim the
        job again without waiting for it; the attempt stays counted (it may have happened). The
        owner stays: a result this claim already handed to a group commit is still written if it
        commits before another process claims the job (a delivered webhook stays delivered)."""
        async with self._engine.begin() as connection:
            await connection.execute(
                update(jobs)
                .where(
                    jobs.c.id == job.id,
                    jobs.c.lease_owner == owner,
                    jobs.c.attempts == job.attempts,
                    jobs.c.state == "queued",
                )
                .values(lease_until=now, updated_at=now)
            )

    def begin(self) -> Any:
        """A transaction on the queue's engine (for a settle that commits with other writes)."""
        return self._engine.begin()

    async def requeue(self, kind: JobKind, ref: str, *, now: float) -> bool:
        """Puts a job back in the queue, due now, with its attempts reset (an operator's resend of a
        dead letter, or of one already delivered). False when there is no such job, or when a
        process holds its lease right now (it is being run: a second run beside it would race).
        The job keeps its trace context: a resend is one more attempt at the same work, found in
        the trace of the attempts before it."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(jobs)
                .where(
                    jobs.c.kind == kind,
                    jobs.c.ref == ref,
                    or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now),
                )
                .values(
                    state="queued",
                    due_at=now,
                    attempts=0,
                    lease_owner=None,
                    lease_until=None,
                    last_error=None,
                    updated_at=now,
                )
            )
        return bool(result.rowcount)

    async def counts(self) -> dict[tuple[str, str], int]:
        """How many jobs are queued or dead, per (kind, state): the backlog gauges. Done jobs are not
        counted: they only grow, and the index on state keeps this count to the live ones."""
        async with self._engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(jobs.c.kind, jobs.c.state, func.count())
                    .where(jobs.c.state.in_(["queued", "dead"]))
                    .group_by(jobs.c.kind, jobs.c.state)
                )
            ).all()
        return {(str(kind), str(state)): int(count) for kind, state, count in rows}
