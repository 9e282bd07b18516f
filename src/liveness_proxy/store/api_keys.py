"""API keys in the database: the keyed hash of each secret (never the secret), and what is known
about the key: its subject and scopes, when it expires or was revoked, when it was last used, and
the key it replaced."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import and_, bindparam, case, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.tables import api_keys

KeyState = Literal["active", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class StoredApiKey:
    key_id: str
    name: str
    subject: str
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: float
    revoked_at: float | None
    expires_at: float | None = None  # None: never
    last_used_at: float | None = None  # approximate: see auth/key_usage.py
    successor_of: str | None = None  # the key this one replaced (`keys rotate`)

    def state(self, now: float) -> KeyState:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class KeyNotRotatable(Exception):
    """`rotate` of a key that is unknown, revoked or expired; the message says which."""


class ApiKeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, key: StoredApiKey) -> None:
        async with self._engine.begin() as connection:
            await connection.execute(insert(api_keys).values(_row(key)))

    async def get(self, key_id: str) -> StoredApiKey | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(api_keys).where(api_keys.c.key_id == key_id))).first()
        return None if row is None else _stored_key(row._mapping)

    async def ids(self) -> list[str]:
        """Every key id, revoked and expired ones included (rows are never deleted)."""
        async with self._engine.connect() as connection:
            return list((await connection.execute(select(api_keys.c.key_id))).scalars())

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

    async def rotate(self, successor: StoredApiKey, *, old_expires_at: float, now: float) -> float:
        """Adds `successor` (whose `successor_of` names the old key) and makes the old key expire
        at `old_expires_at`, or earlier if it already would: in one transaction. Returns the old
        key's expiry. KeyNotRotatable when the old key is unknown, revoked or expired at `now`."""
        old_key_id = successor.successor_of
        if old_key_id is None:
            raise ValueError("a successor names the key it replaces")
        expires = api_keys.c.expires_at
        async with self._engine.begin() as connection:
            # The condition is checked by the UPDATE itself, so a revocation that commits between
            # a read and this write cannot be missed.
            changed = await connection.execute(
                update(api_keys)
                .where(
                    api_keys.c.key_id == old_key_id,
                    api_keys.c.revoked_at.is_(None),
                    or_(expires.is_(None), expires > now),
                )
                .values(
                    expires_at=case(
                        (and_(expires.is_not(None), expires < old_expires_at), expires),
                        else_=old_expires_at,
                    )
                )
                .returning(expires)
            )
            new_expiry = changed.scalar_one_or_none()
            if new_expiry is None:
                old = (
                    await connection.execute(select(api_keys).where(api_keys.c.key_id == old_key_id))
                ).first()
                raise KeyNotRotatable(_why_not_rotatable(old_key_id, old, now))
            await connection.execute(insert(api_keys).values(_row(successor)))
        return float(new_expiry)

    async def record_use(self, uses: Mapping[str, float]) -> None:
        """Records when each key was last used (key id -> epoch seconds), in one statement; a time
        older than the one stored (another process wrote a later use) changes nothing."""
        if not uses:
            return
        last_used = api_keys.c.last_used_at
        statement = (
            update(api_keys)
            .where(
                api_keys.c.key_id == bindparam("used_key_id"),
                or_(last_used.is_(None), last_used < bindparam("used_at")),
            )
            .values(last_used_at=bindparam("used_at"))
        )
        async with self._engine.begin() as connection:
            await connection.execute(
                statement, [{"used_key_id": key_id, "used_at": at} for key_id, at in uses.items()]
            )


def _why_not_rotatable(key_id: str, row: Any, now: float) -> str:
    if row is None:
        return f"no key with id {key_id!r}"
    state = _stored_key(row._mapping).state(now)
    if state == "revoked":
        return f"key {key_id} is revoked: create a new key instead"
    return f"key {key_id} has expired: create a new key instead"


def _row(key: StoredApiKey) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "name": key.name,
        "subject": key.subject,
        "scopes": " ".join(key.scopes),
        "secret_hash": key.secret_hash,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "successor_of": key.successor_of,
    }


def _stored_key(row: Any) -> StoredApiKey:
    return StoredApiKey(
        key_id=row["key_id"],
        name=row["name"],
        subject=row["subject"],
        scopes=tuple(row["scopes"].split()),
        secret_hash=row["secret_hash"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        successor_of=row["successor_of"],
    )
