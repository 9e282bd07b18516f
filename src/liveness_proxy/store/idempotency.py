"""Idempotency records of session creates: per (subject, Idempotency-Key), the fingerprint of the
request and, once its Cynopsis call went out, the answer to replay.

A record is first *in flight*: it holds a lease (owner, until) instead of an answer. `begin` claims
a key atomically fleet-wide (the primary key decides between replicas); a second request meanwhile
learns the key is in flight. A lease that lapses (its process crashed) may be taken over, so a key
is never locked for good. `complete` stores the answer, fenced by the lease owner; `abandon` drops
an in-flight record whose request was refused before its call went out, so a retry starts afresh.
Records end `ttl_seconds` after their answer; each claim sweeps a bounded number of ended ones.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.tables import idempotency_keys

_SWEEP_ROWS = 64
# A claim that races with takeovers retries this often before it calls the key in flight.
_CLAIM_ROUNDS = 3


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


class IdempotencyRecords:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"

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
        owner = secrets.token_hex(16)
        claim = {
            "fingerprint": fingerprint,
            "lease_owner": owner,
            "lease_until": now + lease_seconds,
            "status": None,
            "content_type": None,
            "location": None,
            "body": None,
            "created_at": now,
            "expires_at": now + lease_seconds + ttl_seconds,
        }
        this_key = and_(
            idempotency_keys.c.subject_hash == subject_hash, idempotency_keys.c.idempotency_key == key
        )
        for _ in range(_CLAIM_ROUNDS):
            if await self._insert(subject_hash, key, claim, now=now):
                return Claimed(owner)
            async with self._engine.connect() as connection:
                row = (await connection.execute(select(idempotency_keys).where(this_key))).first()
            if row is None:
                continue  # swept or abandoned since: claim again
            ended = row.expires_at <= now or (row.status is None and row.lease_until <= now)
            if ended:
                # A lapsed lease (its process died) or an ended record: take it over, fenced on what
                # was read, so of two requests taking over at once only one wins.
                async with self._engine.begin() as connection:
                    taken = await connection.execute(
                        update(idempotency_keys)
                        .where(
                            this_key,
                            idempotency_keys.c.fingerprint == row.fingerprint,
                            idempotency_keys.c.created_at == row.created_at,
                            _same_or_null(idempotency_keys.c.lease_owner, row.lease_owner),
                        )
                        .values(claim)
                    )
                if taken.rowcount == 1:
                    return Claimed(owner)
                continue
            if row.fingerprint != fingerprint:
                return Reused()
            if row.status is None:
                return InFlight(float(row.lease_until))
            return Replay(
                StoredAnswer(
                    status=int(row.status),
                    content_type=str(row.content_type),
                    body=str(row.body).encode(),
                    location=row.location,
                )
            )
        return InFlight(now + 1.0)

    async def complete(
        self, subject_hash: str, key: str, owner: str, answer: StoredAnswer, *, now: float, ttl_seconds: float
    ) -> bool:
        """Stores the answer; False when the lease was lost meanwhile (another request took the
        key over after it lapsed): that request's answer stands."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(idempotency_keys)
                .where(
                    idempotency_keys.c.subject_hash == subject_hash,
                    idempotency_keys.c.idempotency_key == key,
                    idempotency_keys.c.lease_owner == owner,
                )
                .values(
                    status=answer.status,
                    content_type=answer.content_type,
                    location=answer.location,
                    body=answer.body.decode(),
                    lease_owner=None,
                    lease_until=None,
                    expires_at=now + ttl_seconds,
                )
            )
        return bool(result.rowcount == 1)

    async def abandon(self, subject_hash: str, key: str, owner: str) -> None:
        async with self._engine.begin() as connection:
            await connection.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.subject_hash == subject_hash,
                    idempotency_keys.c.idempotency_key == key,
                    idempotency_keys.c.lease_owner == owner,
                    idempotency_keys.c.status.is_(None),
                )
            )

    async def _insert(self, subject_hash: str, key: str, claim: dict[str, Any], *, now: float) -> bool:
        dialect_insert = postgresql_insert if self._postgres else sqlite_insert
        statement = (
            dialect_insert(idempotency_keys)
            .values(subject_hash=subject_hash, idempotency_key=key, **claim)
            .on_conflict_do_nothing(
                index_elements=[idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key]
            )
            .returning(idempotency_keys.c.lease_owner)
        )
        expired: Any = (
            select(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key)
            .where(idempotency_keys.c.expires_at < now)
            .limit(_SWEEP_ROWS)
        )
        if self._postgres:
            expired = expired.with_for_update(skip_locked=True)
        async with self._engine.begin() as connection:
            await connection.execute(
                delete(idempotency_keys).where(
                    # Row values: both engines compare (a, b) IN (SELECT a, b ...).
                    tuple_(idempotency_keys.c.subject_hash, idempotency_keys.c.idempotency_key).in_(expired)
                )
            )
            inserted = (await connection.execute(statement)).first()
        return inserted is not None


def _same_or_null(column: Any, value: Any) -> Any:
    return column.is_(None) if value is None else column == value
