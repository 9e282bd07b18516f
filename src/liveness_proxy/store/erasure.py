"""Erasure: forget a subject (or one session) everywhere the proxy keeps it, the audit chain intact.

`erase_subject(subject)` removes, in this order:
1. the subject's API keys: revoked, their subject replaced by the subject's commitment and their
   name by "(erased)", first, so the subject stops creating data while the rest runs;
2. its sessions (bindings and verdicts), their finalizer follow-ups, and their webhook events'
   payloads (an undelivered event is cancelled: its delivery job ends as `cancelled`);
3. the plain values of its audit records (their commitments stay, and the chain with them);
4. its idempotency records and session-token bindings (in the database or Redis), and every Redis
   key named after its commitment (the limit counters);
5. last, in one transaction: its secret, an `erasure_notices` row (every process empties its subject
   caches when it sees one: `ErasureNotices`), the chained `subject.erased` event (the commitment,
   the counts and the time, never the name), and a follow-up job that runs steps 2-4 again by
   commitment ten minutes later (longer than any request may take), for a record that a replica
   still holding the secret in its cache wrote meanwhile.

Steps 2-4 run in transactions of at most `batch_size` rows, so that PostgreSQL never holds their
locks for long; the secret goes last, so that an erasure cut short by a crash is finished by running
it again (until then the secret still links the commitments). A repeat finds nothing, answers
zeros and writes no event. On SQLite, `secure_delete` zeroes what is deleted and a final checkpoint
truncates the write-ahead log, which held the pages as they were.

`erase_session(session_id)` does steps 2-3 for one session and chains `session.erased`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import (
    SESSION_ERASED,
    SUBJECT_ERASED,
    AuditKeys,
    system_event,
)
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import (
    api_keys,
    audit_records,
    erasure_notices,
    idempotency_keys,
    jobs,
    liveness_sessions,
    session_token_bindings,
    subject_secrets,
    webhook_events,
)
from liveness_proxy.store.tally import Tally
from liveness_proxy.tracing import current_traceparent

DEFAULT_BATCH = 500
# When the follow-up runs: well after every process has seen the notice (a second, at the worker's
# interval) and any request that resolved the secret before it has ended.
FOLLOW_UP_SECONDS = 600.0  # the longest a request may take (body and upstream timeouts), and more
ERASED_NAME = "(erased)"


@dataclass(slots=True)
class ErasureCounts(Tally):
    sessions: int = 0
    audit_records: int = 0
    webhook_events_cancelled: int = 0
    webhook_payloads_erased: int = 0
    idempotency_records: int = 0
    session_tokens: int = 0
    api_keys_revoked: int = 0
    redis_keys: int = 0
    subject_secrets: int = 0


@dataclass(frozen=True, slots=True)
class ErasureResult:
    """What an erasure removed (or, with `dry_run`, would remove). `commitment`: the subject's, as
    the `subject.erased` event records it; None when the subject had no secret."""

    counts: ErasureCounts
    commitment: str | None
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return {"commitment": self.commitment, "dry_run": self.dry_run, "erased": self.counts.as_dict()}


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Where the proxy keeps per-subject state in Redis (limit counters, session-token bindings)."""

    client: aioredis.Redis
    prefix: str


class Erasure:
    def __init__(
        self,
        engine: AsyncEngine,
        subjects: SubjectRegistry,
        keys: AuditKeys,
        *,
        binding_hash: Callable[[str], str],
        wall_clock: Callable[[], float],
        redis: RedisKeys | None = None,
        on_erased: Callable[[], None] | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        """`binding_hash`: the keyed hash idempotency records and session-token bindings are stored
        under, of a commitment (`auth.session_tokens.KeyedHash.subject`). `on_erased`: empties this
        process's caches at once (other processes follow the notice)."""
        self._engine = engine
        self._subjects = subjects
        self._chain = ChainWriter.build(keys)
        self._binding_hash = binding_hash
        self._wall_clock = wall_clock
        self._redis = redis
        self._on_erased = on_erased
        self._batch = batch_size

    # -- a subject ------------------------------------------------------------------------------------

    async def erase_subject(self, subject: str, *, request_id: str, dry_run: bool = False) -> ErasureResult:
        found = await self._subjects.find(subject)
        commitment = None if found is None else found.commitment
        if dry_run:
            return ErasureResult(await self._count(subject, commitment), commitment, dry_run=True)
        now = self._wall_clock()
        counts = ErasureCounts()
        counts.api_keys_revoked = await self._revoke_keys(subject, commitment, now)
        counts.add(await self._erase_sessions(subject=subject, commitment=commitment, now=now))
        if commitment is not None:
            counts.add(await self._erase_by_commitment(commitment, now))
        # By name too: a record a replica wrote under an older secret of this subject (a stale cache
        # across an earlier erasure) carries another commitment. No index: a scan, once per erasure.
        while True:
            async with self._engine.begin() as connection:
                erased = await self._erase_audit_rows(connection, audit_records.c.subject == subject, now)
            counts.audit_records += erased
            if erased < self._batch:
                break
        if found is None and counts.total == 0:
            return ErasureResult(counts, None, dry_run=False)
        async with self._engine.begin() as connection:
            # The secret last: until it is gone, a run cut short can be repeated (see the docstring).
            if found is not None:
                deleted = await connection.execute(
                    delete(subject_secrets).where(subject_secrets.c.lookup == found.lookup)
                )
                counts.subject_secrets = deleted.rowcount or 0
            if commitment is not None:
                await connection.execute(
                    jobs.insert().values(
                        enqueue_values(
                            "erase",
                            commitment,
                            due_at=now + FOLLOW_UP_SECONDS,
                            now=now,
                            # The erasure's own task: the follow-up joins the admin's request trace.
                            trace_parent=current_traceparent(),
                        )
                    )
                )
            await self._announce(connection, SUBJECT_ERASED, request_id, commitment, None, counts, now)
        await self._after(counts)
        return ErasureResult(counts, commitment, dry_run=False)

    async def follow_up(self, commitment: str, *, request_id: str) -> ErasureCounts:
        """The job an erasure leaves behind (see the module docstring); chains a second
        `subject.erased` event only when it found something."""
        now = self._wall_clock()
        counts = await self._erase_sessions(subject=None, commitment=commitment, now=now)
        counts.add(await self._erase_by_commitment(commitment, now))
        if counts.total:
            async with self._engine.begin() as connection:
                await self._announce(connection, SUBJECT_ERASED, request_id, commitment, None, counts, now)
            await self._after(counts)
        return counts

    # -- a session ------------------------------------------------------------------------------------

    async def erase_session(
        self, session_id: str, *, request_id: str, dry_run: bool = False
    ) -> ErasureResult:
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    select(liveness_sessions.c.subject_commitment).where(
                        liveness_sessions.c.session_id == session_id
                    )
                )
            ).first()
        commitment = None if row is None else row.subject_commitment
        now = self._wall_clock()
        if dry_run:
            counts = ErasureCounts()
            async with self._engine.connect() as connection:
                await self._count_sessions(connection, [session_id] if row is not None else [], counts)
                counts.audit_records = await self._scalar(
                    connection,
                    select(func.count())
                    .select_from(audit_records)
                    .where(audit_records.c.session_id == session_id, _has_plain()),
                )
            return ErasureResult(counts, commitment, dry_run=True)
        counts = ErasureCounts()
        if row is not None:
            async with self._engine.begin() as connection:
                await self._erase_session_rows(connection, [session_id], counts, now)
        while True:  # bounded transactions, as for a subject
            async with self._engine.begin() as connection:
                erased = await self._erase_audit_rows(
                    connection, audit_records.c.session_id == session_id, now
                )
            counts.audit_records += erased
            if erased < self._batch:
                break
        if counts.total:
            async with self._engine.begin() as connection:
                await self._announce(
                    connection, SESSION_ERASED, request_id, commitment, session_id, counts, now
                )
            await self._after(counts)
        return ErasureResult(counts, commitment, dry_run=False)

    # -- steps ----------------------------------------------------------------------------------------

    async def _revoke_keys(self, subject: str, commitment: str | None, now: float) -> int:
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(api_keys)
                .where(api_keys.c.subject == subject)
                .values(
                    revoked_at=func.coalesce(api_keys.c.revoked_at, now),
                    subject=commitment or ERASED_NAME,
                    name=ERASED_NAME,
                )
            )
        return result.rowcount or 0

    async def _erase_sessions(
        self, *, subject: str | None, commitment: str | None, now: float
    ) -> ErasureCounts:
        counts = ErasureCounts()
        matches = []
        if subject is not None:
            matches.append(liveness_sessions.c.subject == subject)
        if commitment is not None:
            matches.append(liveness_sessions.c.subject_commitment == commitment)
        if not matches:
            return counts
        while True:
            async with self._engine.begin() as connection:
                ids = [
                    str(session_id)
                    for session_id in (
                        await connection.execute(
                            select(liveness_sessions.c.session_id).where(or_(*matches)).limit(self._batch)
                        )
                    ).scalars()
                ]
                if ids:
                    await self._erase_session_rows(connection, ids, counts, now)
            if len(ids) < self._batch:
                return counts

    async def _erase_session_rows(
        self, connection: AsyncConnection, ids: list[str], counts: ErasureCounts, now: float
    ) -> None:
        if connection.dialect.name == "postgresql":
            # The sessions' rows first, in the order the verdict ledger takes them: a verdict being
            # recorded now either commits its event before this reads the events, or finds the row
            # gone and writes nothing (and the two cannot deadlock over the follow-up jobs).
            await connection.execute(
                select(liveness_sessions.c.session_id)
                .where(liveness_sessions.c.session_id.in_(ids))
                .order_by(liveness_sessions.c.session_id)
                .with_for_update()
            )
        events = webhook_events.c
        pending = [
            str(event_id)
            for event_id in (
                await connection.execute(
                    select(events.event_id).where(
                        events.session_id.in_(ids), events.delivered_at.is_(None), events.body.is_not(None)
                    )
                )
            ).scalars()
        ]
        if pending:
            await connection.execute(
                update(jobs)
                .where(
                    jobs.c.kind == "deliver", jobs.c.ref.in_(pending), jobs.c.state.in_(["queued", "dead"])
                )
                .values(
                    state="cancelled", lease_owner=None, lease_until=None, last_error="erased", updated_at=now
                )
            )
        erased = await connection.execute(
            update(webhook_events)
            .where(events.session_id.in_(ids), events.body.is_not(None))
            .values(body=None, erased_at=now)
        )
        counts.webhook_events_cancelled += len(pending)
        counts.webhook_payloads_erased += (erased.rowcount or 0) - len(pending)
        await connection.execute(delete(jobs).where(jobs.c.kind == "finalize", jobs.c.ref.in_(ids)))
        # An idempotent create's stored answer names its session (and would replay it): by location.
        replays = await connection.execute(
            delete(idempotency_keys).where(
                or_(
                    *(
                        idempotency_keys.c.location.like(f"%/sessions/{session_id}/result")
                        for session_id in ids
                    )
                )
            )
        )
        counts.idempotency_records += replays.rowcount or 0
        deleted = await connection.execute(
            delete(liveness_sessions).where(liveness_sessions.c.session_id.in_(ids))
        )
        counts.sessions += deleted.rowcount or 0

    async def _erase_by_commitment(self, commitment: str, now: float) -> ErasureCounts:
        counts = ErasureCounts()
        while True:
            async with self._engine.begin() as connection:
                erased = await self._erase_audit_rows(
                    connection, audit_records.c.subject_commitment == commitment, now
                )
            counts.audit_records += erased
            if erased < self._batch:
                break
        binding_hash = self._binding_hash(commitment)
        async with self._engine.begin() as connection:
            deleted = await connection.execute(
                delete(idempotency_keys).where(idempotency_keys.c.subject_hash == binding_hash)
            )
            counts.idempotency_records = deleted.rowcount or 0
            deleted = await connection.execute(
                delete(session_token_bindings).where(session_token_bindings.c.subject_hash == binding_hash)
            )
            counts.session_tokens = deleted.rowcount or 0
        if self._redis is not None:
            redis_keys, tokens = await _erase_redis(self._redis, commitment, binding_hash)
            counts.redis_keys += redis_keys
            counts.session_tokens += tokens
        return counts

    async def _erase_audit_rows(self, connection: AsyncConnection, match: Any, now: float) -> int:
        ids = select(audit_records.c.id).where(match, _has_plain()).limit(self._batch).scalar_subquery()
        result = await connection.execute(
            update(audit_records)
            .where(audit_records.c.id.in_(ids))
            .values(subject=None, personal=None, erased_at=now)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount or 0

    async def _count(self, subject: str, commitment: str | None) -> ErasureCounts:
        counts = ErasureCounts()
        async with self._engine.connect() as connection:
            counts.api_keys_revoked = await self._scalar(
                connection, select(func.count()).select_from(api_keys).where(api_keys.c.subject == subject)
            )
            matches = [liveness_sessions.c.subject == subject]
            if commitment is not None:
                matches.append(liveness_sessions.c.subject_commitment == commitment)
            ids = [
                str(value)
                for value in (
                    await connection.execute(select(liveness_sessions.c.session_id).where(or_(*matches)))
                ).scalars()
            ]
            await self._count_sessions(connection, ids, counts)
            if commitment is not None:
                counts.subject_secrets = 1
                counts.audit_records = await self._scalar(
                    connection,
                    select(func.count())
                    .select_from(audit_records)
                    .where(audit_records.c.subject_commitment == commitment, _has_plain()),
                )
                binding_hash = self._binding_hash(commitment)
                counts.idempotency_records = await self._scalar(
                    connection,
                    select(func.count())
                    .select_from(idempotency_keys)
                    .where(idempotency_keys.c.subject_hash == binding_hash),
                )
                counts.session_tokens = await self._scalar(
                    connection,
                    select(func.count())
                    .select_from(session_token_bindings)
                    .where(session_token_bindings.c.subject_hash == binding_hash),
                )
        if commitment is not None and self._redis is not None:
            # Counted as `_erase_by_commitment` erases them: the bindings are session tokens.
            named, bindings = await _redis_matches(self._redis, commitment, self._binding_hash(commitment))
            counts.redis_keys = len(named)
            counts.session_tokens += len(bindings)
        return counts

    async def _count_sessions(
        self, connection: AsyncConnection, ids: list[str], counts: ErasureCounts
    ) -> None:
        counts.sessions = len(ids)
        events = webhook_events.c
        for start in range(0, len(ids), self._batch):
            chunk = ids[start : start + self._batch]
            counts.webhook_events_cancelled += await self._scalar(
                connection,
                select(func.count())
                .select_from(webhook_events)
                .where(events.session_id.in_(chunk), events.delivered_at.is_(None), events.body.is_not(None)),
            )
            counts.webhook_payloads_erased += await self._scalar(
                connection,
                select(func.count())
                .select_from(webhook_events)
                .where(
                    events.session_id.in_(chunk), events.delivered_at.is_not(None), events.body.is_not(None)
                ),
            )

    @staticmethod
    async def _scalar(connection: AsyncConnection, query: Any) -> int:
        return int((await connection.execute(query)).scalar_one())

    async def _announce(
        self,
        connection: AsyncConnection,
        action: str,
        request_id: str,
        commitment: str | None,
        session_id: str | None,
        counts: ErasureCounts,
        now: float,
    ) -> None:
        """In the erasure's last transaction: its notice (every process then empties its subject
        caches) and its chain event. A session's notice names no commitment: the subject stays."""
        notice_for = None if session_id is not None else commitment
        await connection.execute(
            erasure_notices.insert().values(subject_commitment=notice_for, created_at=now)
        )
        event = system_event(
            action,
            request_id=request_id,
            occurred_at=now,
            facts=counts.as_dict(),
            session_id=session_id,
            subject_commitment=commitment,
        )
        await self._chain.append(connection, [event])

    async def _after(self, counts: ErasureCounts) -> None:
        if self._on_erased is not None:
            self._on_erased()
        if self._engine.dialect.name == "sqlite":
            # The WAL still holds the pages as they were before: copy the new ones back and empty it.
            # Best effort: a reader holding an old snapshot keeps the WAL until it ends.
            async with self._engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def _has_plain() -> Any:
    return or_(audit_records.c.subject.is_not(None), audit_records.c.personal.is_not(None))


async def _redis_matches(redis: RedisKeys, commitment: str, binding_hash: str) -> tuple[list[Any], list[Any]]:
    """The keys named after the commitment (limit counters) and the session-token bindings whose
    value names its binding hash."""
    client = redis.client
    named = [
        key async for key in client.scan_iter(match=f"{_glob_escape(redis.prefix)}*{commitment}*", count=1000)
    ]
    bindings = []
    async for key in client.scan_iter(match=f"{_glob_escape(redis.prefix)}session-token:*", count=1000):
        value = await client.get(key)
        if value is not None and (value.decode() if isinstance(value, bytes) else str(value)).startswith(
            binding_hash + " "
        ):
            bindings.append(key)
    return named, bindings


async def _erase_redis(redis: RedisKeys, commitment: str, binding_hash: str) -> tuple[int, int]:
    """Deletes `_redis_matches`; returns how many of each (keys, bindings)."""
    named, bindings = await _redis_matches(redis, commitment, binding_hash)
    if named or bindings:
        await redis.client.delete(*named, *bindings)
    return len(named), len(bindings)


def _glob_escape(prefix: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in prefix)


class ErasureNotices:
    """Empties this process's subject caches when an erasure anywhere in the fleet left a notice.

    It compares the set of notice ids, not the highest: on PostgreSQL ids are taken when a
    transaction inserts, not when it commits, so a later id can become visible before an earlier
    one. Notices are few (one per erasure, kept a day), so the set is small."""

    def __init__(self, engine: AsyncEngine, forget: Callable[[], None]) -> None:
        self._engine = engine
        self._forget = forget
        self._seen: set[int] | None = None

    async def poll(self) -> None:
        async with self._engine.connect() as connection:
            ids = set((await connection.execute(select(erasure_notices.c.id))).scalars())
        if self._seen is not None and not ids <= self._seen:
            self._forget()
        self._seen = ids
