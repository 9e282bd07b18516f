"""Repositories: the only code that writes SQL. Each takes the engine it works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.tables import jobs, liveness_sessions
from liveness_proxy.tracing import current_traceparent


class SessionAlreadyBound(Exception):
    """The upstream returned a session id that is already bound: never overwrite an owner."""


@dataclass(frozen=True, slots=True)
class SessionVerdict:
    """The terminal outcome of a session, as the proxy read it from Cynopsis."""

    status: str
    confidence: float | None
    recorded_at: float
    request_id: str | None = None  # the caller's request that read it, or the finalizer's poll


@dataclass(frozen=True, slots=True)
class SessionOwner:
    session_id: str
    subject: str
    credential_id: str
    created_at: float
    request_id: str = ""
    verdict: SessionVerdict | None = None
    reference: str | None = None
    finalizer_state: str | None = None  # following, final, unresolved; None: not followed
    # The subject's commitment (store/subjects.py): what the chain records instead of the subject.
    subject_commitment: str | None = None
    # The stored copy of the terminal answer (api/final_results.py), when one was written.
    final_result: str | None = None


@dataclass(frozen=True, slots=True)
class _Binding:
    owner: SessionOwner
    request_id: str
    # The binding request's span, read when it is submitted: the writer task's is not the caller's.
    trace_parent: str | None


class BindingStoreClosed(RuntimeError):
    """`bind` after `close()`, or a binding whose writer was cancelled before it was written."""


class SessionOwnership:
    """Which subject created which upstream session, and the verdict read for it. A small positive
    cache sits in front of reads: the owner never changes once written, so a cached owner can never
    be stale (the verdict may be newer in the store: the admin route reads it `fresh`).

    Bindings are written by group commit (`group_commit.py`), like the audit log: one multi-row
    INSERT per batch. One commit per created session capped session creation at the database's
    commit rate (profiled: most of a create's cost); a commit now serves a batch."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        first_followup_seconds: float | None = None,
        cache_size: int = 10_000,
        batch_max: int = 256,
    ) -> None:
        """`first_followup_seconds`: when the finalizer is on, each binding schedules its first
        follow-up that long after creation, in the binding's own transaction."""
        self._engine = engine
        self._first_followup_seconds = first_followup_seconds
        self._cache: dict[str, SessionOwner] = {}
        self._cache_size = cache_size
        self._committer: GroupCommitter[_Binding] = GroupCommitter(
            self._write_bindings,
            batch_max=batch_max,
            name="binding writer",
            closed_error=BindingStoreClosed,
        )

    async def bind(self, owner: SessionOwner, request_id: str) -> None:
        """Writes the binding. Durable on return; SessionAlreadyBound if the id is taken. Cancelling
        the caller does not withdraw a queued binding."""
        if owner.subject_commitment is None:
            # Refused here, not later: the verdict's chain event could never be written for it.
            raise ValueError("a session binding needs its subject's commitment (store/subjects.py)")
        await self._committer.submit(_Binding(owner, request_id, current_traceparent()))
        self._remember(owner)

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        await self._committer.close()

    async def _write_bindings(self, batch: list[_Binding]) -> list[BaseException | None]:
        # The first claim on an id within the batch goes to the database; later ones lose at once.
        first_claim: dict[str, int] = {}
        for index, binding in enumerate(batch):
            first_claim.setdefault(binding.owner.session_id, index)
        inserted = await self._insert([batch[index] for index in first_claim.values()])
        outcomes: list[BaseException | None] = []
        for index, binding in enumerate(batch):
            session_id = binding.owner.session_id
            won = first_claim[session_id] == index and session_id in inserted
            outcomes.append(None if won else SessionAlreadyBound(session_id))
        return outcomes

    async def _insert(self, batch: list[_Binding]) -> set[str]:
        """Inserts the bindings whose id is free, in one transaction; returns the ids inserted."""
        rows = [
            {
                "session_id": binding.owner.session_id,
                "subject": binding.owner.subject,
                "credential_id": binding.owner.credential_id,
                "created_at": binding.owner.created_at,
                "request_id": binding.request_id,
                "reference": binding.owner.reference,
                "finalizer_state": None if self._first_followup_seconds is None else "following",
                "subject_commitment": binding.owner.subject_commitment,
            }
            for binding in batch
        ]
        dialect_insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        statement = (
            dialect_insert(liveness_sessions)
            .values(rows)
            .on_conflict_do_nothing(index_elements=[liveness_sessions.c.session_id])
            .returning(liveness_sessions.c.session_id)
        )
        async with self._engine.begin() as connection:
            result = await connection.execute(statement)
            inserted = {str(row[0]) for row in result}
            delay = self._first_followup_seconds
            if delay is not None and inserted:
                # The follow-up commits with the binding: no session is ever bound but not followed.
                await connection.execute(
                    insert(jobs),
                    [
                        enqueue_values(
                            "finalize",
                            binding.owner.session_id,
                            due_at=binding.owner.created_at + delay,
                            now=binding.owner.created_at,
                            trace_parent=binding.trace_parent,
                        )
                        for binding in batch
                        if binding.owner.session_id in inserted
                    ],
                )
            return inserted

    async def owner_of(self, session_id: str, *, fresh: bool = False) -> SessionOwner | None:
        """The binding of `session_id`; `fresh` skips the cache (to see a verdict another replica
        recorded)."""
        if not fresh:
            cached = self._cache.get(session_id)
            if cached is not None:
                return cached
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    select(liveness_sessions).where(liveness_sessions.c.session_id == session_id)
                )
            ).first()
        if row is None:
            return None  # not cached: the session may be bound by another process a moment later
        owner = owner_from_row(row)
        self._remember(owner)
        return owner

    def remember(self, owner: SessionOwner) -> None:
        """Caches what this process just wrote (the verdict ledger's winner)."""
        self._remember(owner)

    def forget(self, session_id: str) -> None:
        """Drops the cached binding (its verdict or state changed)."""
        self._cache.pop(session_id, None)

    def forget_all(self) -> None:
        """After an erasure anywhere in the fleet: cached bindings hold plain subjects."""
        self._cache.clear()

    def _remember(self, owner: SessionOwner) -> None:
        if owner.session_id not in self._cache and len(self._cache) >= self._cache_size:
            # Drop the oldest entry (dicts keep insertion order): bounded memory, no LRU bookkeeping.
            self._cache.pop(next(iter(self._cache)))
        self._cache[owner.session_id] = owner


def owner_from_row(row: Any) -> SessionOwner:
    verdict = None
    if row.verdict_status is not None:
        verdict = SessionVerdict(
            row.verdict_status, row.verdict_confidence, row.verdict_at, row.verdict_request_id
        )
    return SessionOwner(
        session_id=row.session_id,
        subject=row.subject,
        credential_id=row.credential_id,
        created_at=row.created_at,
        request_id=row.request_id,
        verdict=verdict,
        reference=row.reference,
        finalizer_state=row.finalizer_state,
        subject_commitment=row.subject_commitment,
        final_result=row.final_result,
    )
