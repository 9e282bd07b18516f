"""Idempotency records of session creates: per (subject, Idempotency-Key), the fingerprint of the
request and, once its Cynopsis call went out, the answer to replay.

A record is first *in flight*: it holds a lease (owner, until) instead of an answer. `begin` claims
a key atomically fleet-wide (the primary key decides between replicas, and the row is locked while
the claim decides); a second request meanwhile
learns the key is in flight. A lease that lapses (its process crashed) may be taken over, so a key
is never locked for good. `complete` stores the answer, fenced by the lease owner; `abandon` drops
an in-flight record whose request was refused before its call went out, so a retry starts afresh.
Records end `ttl_seconds` after their answer; each claim sweeps a bounded number of ended ones.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from liveness_proxy.store.tables import idempotency_keys
from liveness_proxy.store.write_batch import BatchedWrites

_SWEEP_ROWS = 64


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    status: int
    content_type: str
    body: bytes
    location: str | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    owner: str


@dataclass(frozen=True, slots=True)
class Replay:
    answer: StoredAnswer


@dataclass(frozen=True, slots=True)
class InFlight:
    lease_until: float


@dataclass(frozen=True, slots=True)
class Reused:
    """The key is taken by a request with another fingerprint."""


Begun = Claimed | Replay | InFlight | Reused


@dataclass(slots=True)
class _Begin:
    subject_hash: str
    key: str
    fingerprint: str
    now: float
    lease_seconds: float
    ttl_seconds: float
    owner: str = field(default_factory=lambda: secrets.token_hex(16))
    outcome: Begun | None = None

    @property
    def sort_key(self) -> str:
        return "i" + self.subject_hash + self.key

    async def apply(self, connection: AsyncConnection) -> None:
        postgres = connection.dialect.name == "postgresql"
        claim = {
            "fingerprint": self.fingerprint,
            "lease_owner": self.owner,
            "lease_until": self.now + self.lease_seconds,
            "status": None,
            "content_type": None,
            "location": None,
            "body": None,
            "created_at": self.now,
            "expires_at": self.now + self.lease_seconds + self.ttl_seconds,
        }
        expired: Any = (
            select(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key)
            .where(idempotency_keys.c.expires_at < self.now)
            .limit(_SWEEP_ROWS)
        )
        if postgres:
            expired = expired.with_for_update(skip_locked=True)
        await connection.execute(
            delete(idempotency_keys).where(
                # Row values: both engines compare (a, b) IN (SELECT a, b ...).
                tuple_(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key).in_(expired)
            )
        )
        dialect_insert = postgresql_insert if postgres else sqlite_insert
        inserted = (
            await connection.execute(
                dialect_insert(idempotency_keys)
                .values(subject_hash=self.subject_hash, idempotency_key=self.key, **claim)
                .on_conflict_do_nothing(
                    index_elements=[idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key]
                )
                .returning(idempotency_keys.c.lease_owner)
            )
        ).first()
        if inserted is not None:
            self.outcome = Claimed(self.owner)
            return
        this_key = and_(
            idempotency_keys.c.subject_hash == self.subject_hash,
            idempotency_keys.c.idempotency_key == self.key,
        )
        # Locked until this batch commits (SQLite: the write lock is already this transaction's),
        # so what is decided below cannot race another replica's decision on the same key.
        query: Any = select(idempotency_keys).where(this_key)
        if postgres:
            query = query.with_for_update()
        row = (await connection.execute(query)).first()
        if row is None:  # cannot happen while the row is locked; refuse rather than guess
            self.outcome = InFlight(self.now + 1.0)
            return
        if row.expires_at <= self.now or (row.status is None and row.lease_until <= self.now):
            # An ended record, or a lapsed lease (its process died): a fresh claim.
            await connection.execute(update(idempotency_keys).where(this_key).values(claim))
            self.outcome = Claimed(self.owner)
        elif row.fingerprint != self.fingerprint:
            self.outcome = Reused()
        elif row.status is None:
            self.outcome = InFlight(float(row.lease_until))
        else:
            self.outcome = Replay(
                StoredAnswer(
                    status=int(row.status),
                    content_type=str(row.content_type),
                    body=str(row.body).encode(),
                    location=row.location,
                )
            )


@dataclass(slots=True)
class _Settle:
    """Stores the answer (`answer` given) or drops the in-flight record (`answer` None), fenced by
    the lease owner."""

    subject_hash: str
    key: str
    owner: str
    fingerprint: str
    answer: StoredAnswer | None
    now: float
    ttl_seconds: float
    settled: bool = False

    @property
    def sort_key(self) -> str:
        return "i" + self.subject_hash + self.key

    async def apply(self, connection: AsyncConnection) -> None:
        owned = and_(
            idempotency_keys.c.subject_hash == self.subject_hash,
            idempotency_keys.c.idempotency_key == self.key,
            idempotency_keys.c.lease_owner == self.owner,
        )
        answer = self.answer
        if answer is None:
            result = await connection.execute(
                delete(idempotency_keys).where(owned, idempotency_keys.c.status.is_(None))
            )
        else:
            result = await connection.execute(
                update(idempotency_keys)
                .where(owned)
                .values(
                    status=answer.status,
                    content_type=answer.content_type,
                    location=answer.location,
                    body=answer.body.decode(),
                    lease_owner=None,
                    lease_until=None,
                    expires_at=self.now + self.ttl_seconds,
                )
            )
        self.settled = result.rowcount == 1
        if answer is not None and not self.settled:
            # The lease lapsed and the request that took the key over was refused and dropped it:
            # this answer is still the one to replay (a row another request holds is left alone).
            dialect_insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
            restored = await connection.execute(
                dialect_insert(idempotency_keys)
                .values(
                    subject_hash=self.subject_hash,
                    idempotency_key=self.key,
                    fingerprint=self.fingerprint,
                    status=answer.status,
                    content_type=answer.content_type,
                    location=answer.location,
                    body=answer.body.decode(),
                    created_at=self.now,
                    expires_at=self.now + self.ttl_seconds,
                )
                .on_conflict_do_nothing(
                    index_elements=[idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key]
                )
                .returning(idempotency_keys.c.subject_hash)
            )
            self.settled = restored.first() is not None


class IdempotencyRecords:
    """The records, written through the shared `BatchedWrites` (one transaction per batch)."""

    def __init__(self, writes: BatchedWrites) -> None:
        self._writes = writes

    async def begin(
        self,
        subject_hash: str,
        key: str,
        fingerprint: str,
        *,
        now: float,
        lease_seconds: float,
        ttl_seconds: float,
    ) -> Begun:
        begin = _Begin(subject_hash, key, fingerprint, now, lease_seconds, ttl_seconds)
        await self._writes.run(begin)
        if begin.outcome is None:  # apply() always sets it; a batch that failed raised instead
            raise RuntimeError("an idempotency claim was committed without an outcome")
        return begin.outcome

    async def complete(
        self,
        subject_hash: str,
        key: str,
        owner: str,
        fingerprint: str,
        answer: StoredAnswer,
        *,
        now: float,
        ttl_seconds: float,
    ) -> bool:
        """Stores the answer; False when the lease was lost meanwhile and another request holds
        the key now: that request's answer stands."""
        settle = _Settle(subject_hash, key, owner, fingerprint, answer, now, ttl_seconds)
        await self._writes.run(settle)
        return settle.settled

    async def abandon(self, subject_hash: str, key: str, owner: str) -> None:
        await self._writes.run(_Settle(subject_hash, key, owner, "", None, 0.0, 0.0))
