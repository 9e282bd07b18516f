"""Where the upstream access token is shared between processes: Redis, or the database.

Every process of a deployment (uvicorn workers on one machine, replicas across machines) reads the
token from one shared store, and at most one of them at a time holds the *lease* that allows it to
ask the token endpoint for a new one. `TokenManager` runs that protocol; the stores here only give
it atomic primitives:

- `load()` / `save()`: the current token, sealed with AES-256-GCM (`TokenCipher`) so that whoever
  can read Redis or the database still cannot use the token without the key.
- `acquire_lease()` / `renew_lease()` / `release_lease()`: a lease with a time to live, owned by a
  random id; renewal and release only act while the caller still owns it (compare-and-set), so a
  process whose lease expired cannot cut short the next holder's.
- `backoff_remaining()` / `start_backoff()`: after a failed token request, a short pause shared by
  the whole fleet, so N replicas do not each hammer a failing token endpoint.

Expiry times are wall-clock epochs (they cross machines); keep the replicas' clocks in sync (NTP).
Any failure to reach the store raises `SharedStateUnavailable`; the caller then falls back to a
token of its own process and reports itself degraded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.tables import TOKEN_ROW_ID, upstream_token

_SEALED_PREFIX = "v1."
_NONCE_BYTES = 12
_T = TypeVar("_T")


class SharedStateUnavailable(Exception):
    """The shared store (Redis or the database) did not answer; the message names no secret."""


@dataclass(frozen=True, slots=True)
class SharedToken:
    """A token as every process sees it: expiry and refresh times are wall-clock epochs."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float


class TokenCipher:
    """Seals a `SharedToken` with AES-256-GCM. The key is derived (HKDF-SHA256) from a configured
    secret, and the token URL and client id are bound in as associated data: a token sealed for one
    upstream account never opens for another that shares the same Redis."""

    def __init__(self, secret: bytes, *, context: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"liveness-proxy token cache v1", info=b"aes-256-gcm"
        ).derive(secret)
        self._aead = AESGCM(key)
        self._context = context.encode()
        # Names the upstream account in store keys without revealing it.
        self.account = hashlib.sha256(self._context).hexdigest()[:16]

    def seal(self, token: SharedToken) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        plain = orjson.dumps({"v": token.value, "e": token.expires_at, "r": token.refresh_at})
        sealed = nonce + self._aead.encrypt(nonce, plain, self._context)
        return _SEALED_PREFIX + base64.urlsafe_b64encode(sealed).decode()

    def open(self, sealed: str | bytes) -> SharedToken | None:
        """The token, or None for anything that does not open (another key, tampering, garbage):
        the caller then fetches a new one and overwrites it."""
        try:
            text = sealed.decode() if isinstance(sealed, bytes) else sealed
            if not text.startswith(_SEALED_PREFIX):
                return None
            raw = base64.urlsafe_b64decode(text.removeprefix(_SEALED_PREFIX))
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._context)
            payload = orjson.loads(plain)
            return SharedToken(str(payload["v"]), float(payload["e"]), float(payload["r"]))
        except (InvalidTag, binascii.Error, ValueError, KeyError, TypeError):
            return None


class TokenStore(Protocol):
    """See the module docstring. Every method raises `SharedStateUnavailable` when the store is
    unreachable."""

    @property
    def kind(self) -> str: ...

    async def load(self) -> SharedToken | None: ...

    async def save(self, token: SharedToken) -> None: ...

    async def acquire_lease(self, owner: str, ttl_seconds: float) -> bool: ...

    async def renew_lease(self, owner: str, ttl_seconds: float) -> bool: ...

    async def release_lease(self, owner: str) -> None: ...

    async def backoff_remaining(self) -> float: ...

    async def start_backoff(self, seconds: float) -> None: ...


# Compare-and-set on the lease: only the owner renews or releases it.
_RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisTokenStore:
    """The token, lease and backoff as three Redis keys with Redis-side expiry (`PX`): a crashed
    lease holder's lease lapses by itself, and no key outlives its use."""

    kind = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str,
        cipher: TokenCipher,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        # Per upstream account: two deployments for different Cynopsis accounts that share a Redis
        # and a prefix neither overwrite each other's token nor share a lease or a backoff.
        base = f"{key_prefix}upstream-token:{cipher.account}"
        self._token_key = base
        self._lease_key = f"{base}:lease"
        self._backoff_key = f"{base}:backoff"
        self._cipher = cipher
        self._wall_clock = wall_clock
        self._renew = client.register_script(_RENEW_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)

    async def load(self) -> SharedToken | None:
        sealed = await _redis_call(self._redis.get(self._token_key))
        if sealed is None:
            return None
        return self._cipher.open(sealed)

    async def save(self, token: SharedToken) -> None:
        ttl_ms = int((token.expires_at - self._wall_clock()) * 1000)
        if ttl_ms <= 0:
            return
        await _redis_call(self._redis.set(self._token_key, self._cipher.seal(token), px=ttl_ms))

    async def acquire_lease(self, owner: str, ttl_seconds: float) -> bool:
        acquired = await _redis_call(
            self._redis.set(self._lease_key, owner, nx=True, px=_milliseconds(ttl_seconds))
        )
        return bool(acquired)

    async def renew_lease(self, owner: str, ttl_seconds: float) -> bool:
        renewed = await _redis_call(
            self._renew(keys=[self._lease_key], args=[owner, _milliseconds(ttl_seconds)])
        )
        return bool(renewed)

    async def release_lease(self, owner: str) -> None:
        await _redis_call(self._release(keys=[self._lease_key], args=[owner]))

    async def backoff_remaining(self) -> float:
        until = await _redis_call(self._redis.get(self._backoff_key))
        if until is None:
            return 0.0
        try:
            return max(0.0, float(until) - self._wall_clock())
        except ValueError:
            return 0.0

    async def start_backoff(self, seconds: float) -> None:
        # The end is stored by our clock (the one token expiry is dated by); Redis's own expiry only
        # removes the key afterwards.
        until = self._wall_clock() + seconds
        await _redis_call(self._redis.set(self._backoff_key, repr(until), px=_milliseconds(seconds) + 1000))


class DatabaseTokenStore:
    """The same primitives on one row of the `upstream_token` table, for deployments without Redis
    (`serve --workers N` on SQLite, or replicas sharing PostgreSQL). Each primitive is one
    conditional UPDATE, atomic on both engines."""

    kind = "database"

    def __init__(
        self, engine: AsyncEngine, *, cipher: TokenCipher, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._engine = engine
        self._cipher = cipher
        self._wall_clock = wall_clock

    def _lease_clock(self) -> Any:
        """Lease times: PostgreSQL's own clock, so that replicas whose clocks disagree still agree
        on when a lease lapses; on SQLite every process is on one machine and one clock."""
        if self._engine.dialect.name == "postgresql":
            return func.extract("epoch", func.clock_timestamp())
        return time.time()

    async def load(self) -> SharedToken | None:
        row = await self._read()
        if row is None or row.sealed is None:
            return None
        return self._cipher.open(row.sealed)

    async def save(self, token: SharedToken) -> None:
        await self._update(
            update(upstream_token)
            .where(upstream_token.c.id == TOKEN_ROW_ID)
            .values(sealed=self._cipher.seal(token), expires_at=token.expires_at)
        )

    async def acquire_lease(self, owner: str, ttl_seconds: float) -> bool:
        now = self._lease_clock()
        lease = upstream_token.c
        return await self._update(
            update(upstream_token)
            .where(
                lease.id == TOKEN_ROW_ID,
                (lease.lease_owner.is_(None)) | (lease.lease_until <= now) | (lease.lease_owner == owner),
            )
            .values(lease_owner=owner, lease_until=now + ttl_seconds)
        )

    async def renew_lease(self, owner: str, ttl_seconds: float) -> bool:
        return await self._update(
            update(upstream_token)
            .where(upstream_token.c.id == TOKEN_ROW_ID, upstream_token.c.lease_owner == owner)
            .values(lease_until=self._lease_clock() + ttl_seconds)
        )

    async def release_lease(self, owner: str) -> None:
        await self._update(
            update(upstream_token)
            .where(upstream_token.c.id == TOKEN_ROW_ID, upstream_token.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )

    async def backoff_remaining(self) -> float:
        row = await self._read()
        if row is None or row.backoff_until is None:
            return 0.0
        return max(0.0, float(row.backoff_until) - self._wall_clock())

    async def start_backoff(self, seconds: float) -> None:
        await self._update(
            update(upstream_token)
            .where(upstream_token.c.id == TOKEN_ROW_ID)
            .values(backoff_until=self._wall_clock() + seconds)
        )

    async def _read(self) -> Any:
        try:
            async with self._engine.connect() as connection:
                result = await connection.execute(
                    select(upstream_token).where(upstream_token.c.id == TOKEN_ROW_ID)
                )
                return result.first()
        except (SQLAlchemyError, OSError) as exc:
            raise SharedStateUnavailable(f"database unavailable ({type(exc).__name__})") from None

    async def _update(self, statement: Any) -> bool:
        try:
            async with self._engine.begin() as connection:
                result = await connection.execute(statement)
                return bool(result.rowcount)
        except (SQLAlchemyError, OSError) as exc:
            raise SharedStateUnavailable(f"database unavailable ({type(exc).__name__})") from None


async def _redis_call(pending: Awaitable[_T]) -> _T:
    try:
        return await pending
    except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
        raise SharedStateUnavailable(f"redis unavailable ({type(exc).__name__})") from None


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))
