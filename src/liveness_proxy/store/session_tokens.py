"""Where the proxy remembers the session tokens it handed out: the database, or Redis when the
deployment has one. Only keyed hashes are stored (of the token, and of the subject that obtained
it); `auth/session_tokens.py` computes them and decides what a refusal means.

Three operations, each atomic fleet-wide:
- `remember(token, subject, expires_at, now)`: the token was handed to that subject;
- `take(token, subject, now)`: the token's one use. It succeeds once, for that subject, before
  expiry, and deletes the binding; it returns the expiry so that the use can be undone;
- `put_back(...)`: undoes a `take` whose create call never went out (a limit refused it).

Any failure to reach the store raises (a database error, or `StoreUnavailable` for Redis): the
check fails closed, never a per-process guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.errors import StoreUnavailable
from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.tables import session_token_bindings

# Expired rows deleted by each remembering batch: bindings are written as fast as they expire, so a
# small bounded sweep per batch keeps the table at the size of the tokens still valid.
_SWEEP_ROWS = 256


class SessionTokenLedger(Protocol):
    @property
    def kind(self) -> str: ...

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None: ...

    async def take(self, token_hash: str, subject_hash: str, now: float) -> float | None: ...

    async def put_back(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None: ...

    async def close(self) -> None: ...


class SessionTokenStoreClosed(Exception):
    pass


@dataclass(slots=True)
class _Take:
    token_hash: str
    subject_hash: str
    now: float
    expires_at: float | None = None  # set by the writer when the take succeeds


class DatabaseSessionTokens:
    """Bindings in the `session_token_bindings` table. Remembering and taking are group-committed
    (one transaction serves every request queued meanwhile), like session bindings: a commit per
    token would cap token issue and session creation at the database's commit rate."""

    kind = "database"

    def __init__(self, engine: AsyncEngine, *, batch_max: int = 256) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._remembering: GroupCommitter[tuple[str, str, float, float]] = GroupCommitter(
            self._write_remembered,
            batch_max=batch_max,
            name="session-token writer",
            closed_error=SessionTokenStoreClosed,
        )
        self._taking: GroupCommitter[_Take] = GroupCommitter(
            self._write_taken,
            batch_max=batch_max,
            name="session-token taker",
            closed_error=SessionTokenStoreClosed,
        )

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        await self._remembering.submit((token_hash, subject_hash, expires_at, now))

    async def take(self, token_hash: str, subject_hash: str, now: float) -> float | None:
        item = _Take(token_hash, subject_hash, now)
        await self._taking.submit(item)
        return item.expires_at

    async def put_back(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        await self._insert([(token_hash, subject_hash, expires_at)], sweep_before=None)

    async def close(self) -> None:
        await self._remembering.close()
        await self._taking.close()

    async def _write_remembered(
        self, batch: list[tuple[str, str, float, float]]
    ) -> list[BaseException | None]:
        rows = [(token_hash, subject_hash, expires_at) for token_hash, subject_hash, expires_at, _ in batch]
        await self._insert(rows, sweep_before=min(now for *_, now in batch))
        return [None] * len(batch)

    async def _insert(self, rows: list[tuple[str, str, float]], *, sweep_before: float | None) -> None:
        dialect_insert = postgresql_insert if self._postgres else sqlite_insert
        # A token the upstream handed out twice keeps its first binding: the second holder gets
        # `session-token-invalid`, never the first holder's token.
        statement = dialect_insert(session_token_bindings).on_conflict_do_nothing(
            index_elements=[session_token_bindings.c.token_hash]
        )
        values = [
            {"token_hash": token_hash, "subject_hash": subject_hash, "expires_at": expires_at}
            for token_hash, subject_hash, expires_at in rows
        ]
        async with self._engine.begin() as connection:
            if sweep_before is not None:
                expired: Any = (
                    select(session_token_bindings.c.token_hash)
                    .where(session_token_bindings.c.expires_at < sweep_before)
                    .limit(_SWEEP_ROWS)
                )
                if self._postgres:
                    # Replicas sweeping at once skip each other's rows instead of queueing on them.
                    expired = expired.with_for_update(skip_locked=True)
                await connection.execute(
                    delete(session_token_bindings).where(session_token_bindings.c.token_hash.in_(expired))
                )
            await connection.execute(statement, values)

    async def _write_taken(self, batch: list[_Take]) -> list[BaseException | None]:
        async with self._engine.begin() as connection:
            for item in batch:
                # One conditional DELETE per token: atomic on its own, so two requests (or
                # replicas) using one token cannot both succeed, and a foreign subject's attempt
                # leaves the binding in place for its owner.
                result = await connection.execute(
                    delete(session_token_bindings)
                    .where(
                        session_token_bindings.c.token_hash == item.token_hash,
                        session_token_bindings.c.subject_hash == item.subject_hash,
                        session_token_bindings.c.expires_at > item.now,
                    )
                    .returning(session_token_bindings.c.expires_at)
                )
                row = result.first()
                item.expires_at = None if row is None else float(row[0])
        return [None] * len(batch)


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

    async def remember(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        await self._set(token_hash, subject_hash, expires_at, now)

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
        await self._set(token_hash, subject_hash, expires_at, now)

    async def close(self) -> None:
        return None

    async def _set(self, token_hash: str, subject_hash: str, expires_at: float, now: float) -> None:
        milliseconds = int((expires_at - now) * 1000)
        if milliseconds <= 0:
            return  # already expired: nothing to remember
        try:
            await self._client.set(
                self._prefix + token_hash, f"{subject_hash} {expires_at!r}", px=milliseconds, nx=True
            )
        except _REDIS_FAILURES:
            raise _unavailable() from None


def _unavailable() -> StoreUnavailable:
    return StoreUnavailable("The proxy's shared store (Redis) cannot be reached; retry shortly.")
