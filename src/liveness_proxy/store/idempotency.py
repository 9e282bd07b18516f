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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, bindparam, delete, select, tuple_, update
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

    @classmethod
    async def apply_all(cls, connection: AsyncConnection, operations: Sequence[_Begin]) -> None:
        # Ended records go first, a bounded number per batch: claims come as fast as records end.
        expired: Any = (
            select(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key)
            .where(idempotency_keys.c.expires_at < min(operation.now for operation in operations))
            .limit(_SWEEP_ROWS)
        )
        if connection.dialect.name == "postgresql":
            expired = expired.with_for_update(skip_locked=True)
        await connection.execute(
            delete(idempotency_keys).where(
                # Row values: both engines compare (a, b) IN (SELECT a, b ...).
                tuple_(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key).in_(expired)
            )
        )
        # The usual case, a key never seen: every claim of the batch in one INSERT. The first claim
        # of a key in the batch is tried there; the others (and every key already taken) are
        # decided one by one below, each reading what the one before may have written.
        first: dict[tuple[str, str], _Begin] = {}
        for operation in operations:
            first.setdefault((operation.subject_hash, operation.key), operation)
        dialect_insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
        result = await connection.execute(
            dialect_insert(idempotency_keys)
            .values([operation.row() for operation in first.values()])
            .on_conflict_do_nothing(
                index_elements=[idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key]
            )
            .returning(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key)
        )
        claimed = {(str(row[0]), str(row[1])) for row in result}
        for pair in claimed:
            operation = first[pair]
            operation.outcome = Claimed(operation.owner)
        for operation in operations:
            if operation.outcome is None:
                await operation.apply(connection)

    def row(self) -> dict[str, Any]:
        return {"subject_hash": self.subject_hash, "idempotency_key": self.key, **self.claim()}

    def claim(self) -> dict[str, Any]:
        return {
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

    async def apply(self, connection: AsyncConnection) -> None:
        """A key the batch's INSERT did not claim: taken already (by an earlier request, or an
        earlier claim of this batch)."""
        postgres = connection.dialect.name == "postgresql"
        claim = self.claim()
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

    @classmethod
    async def apply_all(cls, connection: AsyncConnection, operations: Sequence[_Settle]) -> None:
        answered = [operation for operation in operations if operation.answer is not None]
        unique = len({(operation.subject_hash, operation.key) for operation in answered}) == len(answered)
        # SQLite reports the rows an executemany matched in total (asyncpg does not: PostgreSQL goes
        # one by one, where a statement costs less than SQLite's trip through its thread).
        if len(answered) > 1 and unique and connection.dialect.name == "sqlite":
            # The usual case: every answer's lease still held. One executemany; only if some row
            # was not matched does each answer go its own way (below) to learn which.
            # No .values(): the SET clause is every column the parameters name (`answered_row`).
            result = await connection.execute(
                update(idempotency_keys).where(
                    idempotency_keys.c.subject_hash == bindparam("b_subject_hash"),
                    idempotency_keys.c.idempotency_key == bindparam("b_key"),
                    idempotency_keys.c.lease_owner == bindparam("b_owner"),
                ),
                [
                    {
                        "b_subject_hash": operation.subject_hash,
                        "b_key": operation.key,
                        "b_owner": operation.owner,
                        **operation.answered_row(),
                    }
                    for operation in answered
                ],
            )
            if result.rowcount == len(answered):
                for operation in answered:
                    operation.settled = True
        for operation in operations:
            if not operation.settled:
                await operation.apply(connection)

    def answered_row(self) -> dict[str, Any]:
        """The columns of a record once its answer is stored: the answer, no lease, the TTL."""
        answer = self.answer
        if answer is None:
            raise ValueError("only an answer is stored")
        return {
            "status": answer.status,
            "content_type": answer.content_type,
            "location": answer.location,
            "body": answer.body.decode(),
            "lease_owner": None,
            "lease_until": None,
            "expires_at": self.now + self.ttl_seconds,
        }

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
                update(idempotency_keys).where(owned).values(self.answered_row())
            )
        self.settled = result.rowcount == 1
        if answer is not None and not self.settled:
            stored = (
                await connection.execute(
                    select(idempotency_keys.c.lease_owner, idempotency_keys.c.body).where(
                        idempotency_keys.c.subject_hash == self.subject_hash,
                        idempotency_keys.c.idempotency_key == self.key,
                    )
                )
            ).first()
            if stored is not None and stored.lease_owner is None and stored.body == answer.body.decode():
                # Stored already (by the batch's executemany, whose total count fell short because
                # of another answer): settled, not lost.
                self.settled = True
                return
            # The lease lapsed and the request that took the key over was refused and dropped it:
            # this answer is still the one to replay (a row another request holds is left alone).
            dialect_insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
            restored = await connection.execute(
                dialect_insert(idempotency_keys)
                .values(
                    subject_hash=self.subject_hash,
                    idempotency_key=self.key,
                    fingerprint=self.fingerprint,
                    created_at=self.now,
                    **self.answered_row(),
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
