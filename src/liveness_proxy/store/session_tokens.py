"""Where the proxy remembers the session tokens it handed out: the database, or Redis when the
deployment has one. Only keyed hashes are stored (of the token, and of the subject that obtained
it); `auth/session_tokens.py` computes them and decides what a refusal means.

Three operations, each atomic fleet-wide:
- `remember(token, subject, expires_at, now)`: the token was handed to that subject (False when it
  was bound already: the upstream issued it twice);
- `take(token, subject, now)`: the token's one use. It succeeds once, for that subject, before
  expiry, and deletes the binding; it returns the expiry so that the use can be undone;
- `put_back(...)`: undoes a `take` whose create call never went out (a limit refused it).

Any failure to reach the store raises (a database error, or `StoreUnavailable` for Redis): the
check fails closed, never a per-process guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from liveness_proxy.errors import StoreUnavailable
from liveness_proxy.store.tables import session_token_bindings
from liveness_proxy.store.write_batch import BatchedWrites

# Expired rows deleted with each binding written: bindings are written as fast as they expire, so a
# small bounded sweep each time keeps the table at the size of the tokens still valid.
_SWEEP_ROWS = 256


class SessionTokenLedger(Protocol):
    @property
    def kind(self) -> str: ...

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> bool: ...

    async def take(self, token_hash: str, subject_hash: str, now: float) -> float | None: ...

    async def put_back(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None: ...


@dataclass(slots=True)
class _Remember:
    token_hash: str
    subject_hash: str
    expires_at: float
    sweep_before: float | None  # also delete (a bounded number of) bindings that expired before this
    inserted: bool = False  # the outcome

    @property
    def sort_key(self) -> str:
        return "t" + self.token_hash

    @classmethod
    async def apply_all(cls, connection: AsyncConnection, operations: Sequence[_Remember]) -> None:
        postgres = connection.dialect.name == "postgresql"
        sweeps = [operation.sweep_before for operation in operations if operation.sweep_before is not None]
        if sweeps:
            expired: Any = (
                select(session_token_bindings.c.token_hash)
                .where(session_token_bindings.c.expires_at < min(sweeps))
                .limit(_SWEEP_ROWS)
            )
            if postgres:
                # Replicas sweeping at once skip each other's rows instead of queueing on them.
                expired = expired.with_for_update(skip_locked=True)
            await connection.execute(
                delete(session_token_bindings).where(session_token_bindings.c.token_hash.in_(expired))
            )
        dialect_insert = postgresql_insert if postgres else sqlite_insert
        # A token the upstream handed out twice keeps its first binding (the second is reported, and
        # refused): within a batch too, the first in order wins.
        first: dict[str, _Remember] = {}
        for operation in operations:
            first.setdefault(operation.token_hash, operation)
        result = await connection.execute(
            dialect_insert(session_token_bindings)
            .values(
                [
                    {
                        "token_hash": op.token_hash,
                        "subject_hash": op.subject_hash,
                        "expires_at": op.expires_at,
                    }
                    for op in first.values()
                ]
            )
            .on_conflict_do_nothing(index_elements=[session_token_bindings.c.token_hash])
            .returning(session_token_bindings.c.token_hash)
        )
        inserted = {str(row[0]) for row in result}
        for token_hash, operation in first.items():
            operation.inserted = token_hash in inserted


@dataclass(slots=True)
class _Take:
    token_hash: str
    subject_hash: str
    now: float
    expires_at: float | None = None  # the outcome: set when the take succeeds

    @property
    def sort_key(self) -> str:
        return "t" + self.token_hash

    @classmethod
    async def apply_all(cls, connection: AsyncConnection, operations: Sequence[_Take]) -> None:
        # One conditional DELETE for the batch: a binding goes only with its own subject and before
        # its expiry, so a foreign subject's attempt leaves it to its owner, and of two requests
        # (or replicas) using one token only one gets it back from RETURNING.
        now = max(operation.now for operation in operations)
        result = await connection.execute(
            delete(session_token_bindings)
            .where(
                tuple_(session_token_bindings.c.token_hash, session_token_bindings.c.subject_hash).in_(
                    [(operation.token_hash, operation.subject_hash) for operation in operations]
                ),
                session_token_bindings.c.expires_at > now,
            )
            .returning(session_token_bindings.c.token_hash, session_token_bindings.c.expires_at)
        )
        taken = {str(row[0]): float(row[1]) for row in result}
        for operation in operations:
            # A token named twice in one batch is taken once: by the first in order.
            operation.expires_at = taken.pop(operation.token_hash, None)


class DatabaseSessionTokens:
    """Bindings in the `session_token_bindings` table, written through the shared `BatchedWrites`
    (one transaction serves every request queued meanwhile)."""

    kind = "database"

    def __init__(self, writes: BatchedWrites) -> None:
        self._writes = writes

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> bool:
        remember = _Remember(token_hash, subject_hash, expires_at, sweep_before=now)
        await self._writes.run(remember)
        return remember.inserted

    async def take(self, token_hash: str, subject_hash: str, now: float) -> float | None:
        take = _Take(token_hash, subject_hash, now)
        await self._writes.run(take)
        return take.expires_at

    async def put_back(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        await self._writes.run(_Remember(token_hash, subject_hash, expires_at, sweep_before=None))


# Compare-and-delete: the binding goes only if the subject matches and it has not expired by the
# proxy's clock (ARGV[2]), like the database's conditional DELETE; returns its expiry, or nil. The
# value is "<subject hash> <expires_at>"; Redis's own TTL only clears it away afterwards.
_TAKE_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local space = string.find(value, ' ', 1, true)
if not space or string.sub(value, 1, space - 1) ~= ARGV[1] then return false end
local expires_at = string.sub(value, space + 1)
if tonumber(expires_at) <= tonumber(ARGV[2]) then return false end
redis.call('DEL', KEYS[1])
return expires_at
"""

_REDIS_FAILURES = (redis.exceptions.RedisError, ConnectionError, TimeoutError, OSError)


class RedisSessionTokens:
    """Bindings as Redis keys that expire with their token. The expiry is also in the value and
    judged by the proxy's clock when the token is taken, as in the database: Redis's TTL (its own
    clock) only clears the key away."""

    kind = "redis"

    def __init__(self, client: aioredis.Redis, *, key_prefix: str) -> None:
        self._client = client
        self._prefix = f"{key_prefix}session-token:"
        self._take_script = client.register_script(_TAKE_SCRIPT)

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> bool:
        return await self._set(token_hash, subject_hash, expires_at, now)

    async def take(self, token_hash: str, subject_hash: str, now: float) -> float | None:
        try:
            expires_at = await self._take_script(
                keys=[self._prefix + token_hash], args=[subject_hash, repr(now)]
            )
        except _REDIS_FAILURES:
            raise _unavailable() from None
        # nil: no such binding, another subject's, or expired.
        return None if expires_at is None else float(expires_at)

    async def put_back(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        await self._set(token_hash, subject_hash, expires_at, now)  # nothing can have taken its place

    async def _set(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> bool:
        """False when the key existed already (SET NX did not set it)."""
        milliseconds = int((expires_at - now) * 1000)
        if milliseconds <= 0:
            return True  # already expired: nothing to remember (a take would refuse it anyway)
        try:
            stored = await self._client.set(
                self._prefix + token_hash, f"{subject_hash} {expires_at!r}", px=milliseconds, nx=True
            )
        except _REDIS_FAILURES:
            raise _unavailable() from None
        return bool(stored)


def _unavailable() -> StoreUnavailable:
    return StoreUnavailable("The proxy's shared store (Redis) cannot be reached; retry shortly.")
