"""Repositories: the only code that writes SQL. Each takes the engine it works on."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.tables import api_keys, liveness_sessions


class SessionAlreadyBound(Exception):
    """The upstream returned a session id that is already bound: never overwrite an owner."""


@dataclass(frozen=True, slots=True)
class SessionVerdict:
    """The terminal outcome of a session, as the proxy read it from Cynopsis."""

    status: str
    confidence: float | None
    recorded_at: float


@dataclass(frozen=True, slots=True)
class SessionOwner:
    session_id: str
    subject: str
    credential_id: str
    created_at: float
    request_id: str = ""
    verdict: SessionVerdict | None = None


@dataclass(frozen=True, slots=True)
class StoredApiKey:
    key_id: str
    name: str
    subject: str
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: float
    revoked_at: float | None


@dataclass(slots=True)
class _PendingBinding:
    owner: SessionOwner
    request_id: str
    done: asyncio.Future[None]


class SessionOwnership:
    """Which subject created which upstream session, and the verdict read for it. A small positive
    cache sits in front of reads: the owner never changes once written, so a cached owner can never
    be stale (the verdict may be newer in the store: the admin route reads it `fresh`).

    Bindings are written by group commit, like the audit log: `bind` queues the binding and returns
    once the transaction holding it has committed; one writer task takes whatever is queued (at most
    `batch_max`) into one multi-row INSERT. One commit per created session capped session creation
    at the database's commit rate (profiled: most of a create's cost); a commit now serves a batch."""

    def __init__(self, engine: AsyncEngine, *, cache_size: int = 10_000, batch_max: int = 256) -> None:
        self._engine = engine
        self._cache: dict[str, SessionOwner] = {}
        self._cache_size = cache_size
        self._batch_max = batch_max
        self._pending: deque[_PendingBinding] = deque()
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def bind(self, owner: SessionOwner, request_id: str) -> None:
        """Writes the binding. Durable on return; SessionAlreadyBound if the id is taken. Cancelling
        the caller does not withdraw a queued binding."""
        if self._closed:
            raise RuntimeError("the session store is closed")
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer.done():
            self._wakeup = asyncio.Event()
            self._writer = loop.create_task(self._write_queued(self._wakeup), name="binding-writer")
        assert self._wakeup is not None
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append(_PendingBinding(owner, request_id, done))
        self._wakeup.set()
        await done
        self._remember(owner)

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        self._closed = True
        writer = self._writer
        if writer is None or writer.done():
            return
        assert self._wakeup is not None
        self._wakeup.set()
        await writer

    async def _write_queued(self, wakeup: asyncio.Event) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                size = min(self._batch_max, len(self._pending))
                await self._commit_batch([self._pending.popleft() for _ in range(size)])
        except asyncio.CancelledError:
            for pending in self._pending:
                if not pending.done.done():
                    pending.done.set_exception(RuntimeError("the binding writer was cancelled"))
            self._pending.clear()
            raise

    async def _commit_batch(self, batch: list[_PendingBinding]) -> None:
        # The first claim on an id within the batch goes to the database; later ones lose at once.
        unique: dict[str, _PendingBinding] = {}
        for pending in batch:
            if pending.owner.session_id in unique:
                _settle(pending, SessionAlreadyBound(pending.owner.session_id))
            else:
                unique[pending.owner.session_id] = pending
        try:
            inserted = await self._insert(list(unique.values()))
        except Exception as exc:
            for pending in unique.values():
                _settle(pending, exc)
            return
        except BaseException:
            for pending in unique.values():
                _settle(pending, RuntimeError("the binding writer was cancelled; binding may not be written"))
            raise
        for session_id, pending in unique.items():
            _settle(pending, None if session_id in inserted else SessionAlreadyBound(session_id))

    async def _insert(self, batch: list[_PendingBinding]) -> set[str]:
        """Inserts the bindings whose id is free, in one transaction; returns the ids inserted."""
        rows = [
            {
                "session_id": pending.owner.session_id,
                "subject": pending.owner.subject,
                "credential_id": pending.owner.credential_id,
                "created_at": pending.owner.created_at,
                "request_id": pending.request_id,
            }
            for pending in batch
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
            return {str(row[0]) for row in result}

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
        verdict = None
        if row.verdict_status is not None:
            verdict = SessionVerdict(row.verdict_status, row.verdict_confidence, row.verdict_at)
        owner = SessionOwner(
            row.session_id, row.subject, row.credential_id, row.created_at, row.request_id, verdict
        )
        self._remember(owner)
        return owner

    async def record_verdict(self, owner: SessionOwner, verdict: SessionVerdict) -> SessionOwner:
        """Stores the first terminal verdict with the binding; it is never overwritten (a later,
        different answer upstream does not rewrite history). A session whose verdict this process
        already knows costs no write, however often its result is read."""
        if owner.verdict is not None:
            return owner
        async with self._engine.begin() as connection:
            await connection.execute(
                update(liveness_sessions)
                .where(
                    liveness_sessions.c.session_id == owner.session_id,
                    liveness_sessions.c.verdict_status.is_(None),
                )
                .values(
                    verdict_status=verdict.status,
                    verdict_confidence=verdict.confidence,
                    verdict_at=verdict.recorded_at,
                )
            )
        # Read back: another process may have stored its verdict first.
        stored = await self.owner_of(owner.session_id, fresh=True)
        return stored or owner

    def _remember(self, owner: SessionOwner) -> None:
        if owner.session_id not in self._cache and len(self._cache) >= self._cache_size:
            # Drop the oldest entry (dicts keep insertion order): bounded memory, no LRU bookkeeping.
            self._cache.pop(next(iter(self._cache)))
        self._cache[owner.session_id] = owner


class ApiKeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, key: StoredApiKey) -> None:
        async with self._engine.begin() as connection:
            await connection.execute(
                insert(api_keys).values(
                    key_id=key.key_id,
                    name=key.name,
                    subject=key.subject,
                    scopes=" ".join(key.scopes),
                    secret_hash=key.secret_hash,
                    created_at=key.created_at,
                    revoked_at=key.revoked_at,
                )
            )

    async def get(self, key_id: str) -> StoredApiKey | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(api_keys).where(api_keys.c.key_id == key_id))).first()
        return None if row is None else _stored_key(row._mapping)

    async def list(self) -> list[StoredApiKey]:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(api_keys).order_by(api_keys.c.created_at))).all()
        return [_stored_key(row._mapping) for row in rows]

    async def revoke(self, key_id: str, *, revoked_at: float) -> bool:
        """Marks the key revoked; False when no such active key exists."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=revoked_at)
            )
        return bool(result.rowcount)


def _settle(pending: _PendingBinding, error: BaseException | None) -> None:
    if pending.done.done():  # its caller was cancelled
        return
    if error is None:
        pending.done.set_result(None)
    else:
        pending.done.set_exception(error)


def _stored_key(row: Any) -> StoredApiKey:
    return StoredApiKey(
        key_id=row["key_id"],
        name=row["name"],
        subject=row["subject"],
        scopes=tuple(row["scopes"].split()),
        secret_hash=row["secret_hash"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
