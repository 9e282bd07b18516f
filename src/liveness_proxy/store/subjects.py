"""Per-subject secrets and the commitments keyed with them.

A *commitment* stands for a personal value wherever the value itself must not be kept for good: in
the audit chain, the Redis keys, the access log. It is `HMAC-SHA256(secret, name NUL value)` in hex,
where `secret` is 32 random bytes that belong to one subject alone. While the secret exists, whoever
holds it (the proxy, `audit verify`) can check a plain value against its commitment; once an erasure
deletes it, nobody can link the commitments to a name or test guesses against them, key holders
included. A subject who comes back later gets a new secret, and new commitments.

Storage (`subject_secrets`): each row is found by a keyed hash of the subject (`lookup`, HMAC under a
key derived from the API-key pepper, like every keyed hash of ours) and holds the secret wrapped
with AES-GCM under the *subject key* (`LIVENESS_PROXY_SUBJECT_KEY`, several lines during a rotation:
the last one wraps, every one unwraps), with the lookup as associated data so a wrapped secret
cannot be moved to another row. A database reader without the subject key learns neither names nor
secrets. Without a subject key, one derived from the pepper wraps; it always unwraps, so setting a
subject key later loses nothing, and `subjects rewrap` then moves the older secrets to it (until it
has, those open with the pepper alone).

`SubjectRegistry` is the runtime side: a per-process cache in front of the table (a subject's secret
never changes while it exists, so a cached one is only wrong after an erasure, which empties every
process's cache: store/erasure.py), and the creation of a secret on a subject's first request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.tables import subject_secrets

SECRET_BYTES = 32
# The key id of the wrapping key derived from the pepper: it wraps when no subject key is set, and
# always unwraps.
PEPPER_KEY_ID = "pepper"
MAX_KEY_ID_LENGTH = 32


class SubjectKeyError(ValueError):
    """A wrapped secret that no configured subject key opens (wrong key, or a tampered row)."""


def commit(secret: bytes, name: str, value: str) -> str:
    """The commitment to `value` (a personal value called `name`) under `secret`."""
    return hmac.new(secret, _utf8(name) + b"\x00" + _utf8(value), hashlib.sha256).hexdigest()


def _utf8(value: str) -> bytes:
    # surrogatepass: a host's authentication (library mode) may hand over any str; hashing it must
    # not raise (the audit record then refuses it, as it refuses every value it cannot store).
    return value.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class WrappingKey:
    key_id: str
    key: bytes  # 32 bytes: AES-256-GCM


class SubjectKeys:
    """The keys of `subject_secrets`: the lookup key (from the pepper) and the wrapping keys."""

    def __init__(self, *, pepper: bytes, wrapping_keys: Sequence[WrappingKey]) -> None:
        if not wrapping_keys:
            raise ValueError("at least one wrapping key is required")
        self._lookup_key = hmac.new(pepper, b"liveness-proxy subject lookup v1", hashlib.sha256).digest()
        self._wrapping = {key.key_id: key for key in wrapping_keys}
        self._current = wrapping_keys[-1]

    @classmethod
    def from_settings_values(cls, *, pepper: str, subject_key: str) -> SubjectKeys:
        """`subject_key`: the setting's value (lines of `key_id:secret` or bare secrets; empty:
        derive one wrapping key from the pepper, key id `pepper`)."""
        return cls(pepper=pepper.encode(), wrapping_keys=parse_subject_keys(subject_key, pepper=pepper))

    @property
    def current_key_id(self) -> str:
        return self._current.key_id

    def lookup(self, subject: str) -> str:
        return hmac.new(self._lookup_key, b"subject\x00" + _utf8(subject), hashlib.sha256).hexdigest()

    def wrap(self, lookup: str, secret: bytes) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self._current.key).encrypt(nonce, secret, lookup.encode())
        return f"{self._current.key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def unwrap(self, lookup: str, wrapped: str) -> bytes:
        key_id, _, sealed_text = wrapped.partition(".")
        key = self._wrapping.get(key_id)
        if key is None:
            raise SubjectKeyError(f"subject secret wrapped with key {key_id!r}, which is not configured")
        try:
            sealed = base64.urlsafe_b64decode(sealed_text)
            return AESGCM(key.key).decrypt(sealed[:12], sealed[12:], lookup.encode())
        except (InvalidTag, ValueError):
            raise SubjectKeyError(
                "a subject secret does not open with its key: altered, or a wrong key"
            ) from None


MAX_KEY_ID_LENGTH = 32  # the id prefixes every wrapped secret, in a column of 128 characters


def parse_subject_keys(value: str, *, pepper: str) -> list[WrappingKey]:
    """Lines of `key_id:secret` (or a bare secret, whose id is derived from it), blank lines and `#`
    comments ignored; each secret is stretched to an AES-256 key. The key derived from the pepper
    (id `pepper`) comes first and always unwraps, and wraps when no line is given: the secrets made
    before a subject key was set stay readable once it is (`subjects rewrap` then moves them).

    Errors name the line, never its key id: a bare secret that happens to hold a colon would be
    read as `key_id:secret`, and its first part must not end up in a log."""
    keys = [WrappingKey(PEPPER_KEY_ID, _stretch(b"subject key from pepper\x00" + pepper.encode()))]
    lines: dict[str, int] = {}
    for number, raw in enumerate(value.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, separator, secret = line.partition(":")
        if not separator:
            secret = line
            key_id = hashlib.sha256(b"subject key id\x00" + line.encode()).hexdigest()[:8]
        key_id, secret = key_id.strip(), secret.strip()
        # At most MAX_KEY_ID_LENGTH: `wrapped` (128 characters) holds the id, a dot and 80 more.
        if (
            not key_id
            or len(key_id) > MAX_KEY_ID_LENGTH
            or not key_id.isascii()
            or not key_id.replace("-", "").replace("_", "").isalnum()
        ):
            raise ValueError(f"line {number}: a key id is 1-{MAX_KEY_ID_LENGTH} letters, digits, '-' or '_'")
        if len(secret) < 32:
            raise ValueError(f"line {number}: the secret needs at least 32 characters")
        if key_id == PEPPER_KEY_ID:
            raise ValueError(f"line {number}: the key id {PEPPER_KEY_ID!r} is reserved")
        if key_id in lines:
            raise ValueError(f"line {number}: the same key id as line {lines[key_id]}")
        lines[key_id] = number
        keys.append(WrappingKey(key_id, _stretch(secret.encode())))
    return keys


def _stretch(secret: bytes) -> bytes:
    return hmac.new(secret, b"liveness-proxy subject wrapping key v1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class SubjectSecret:
    """A subject's secret and its commitment (the one that stands for the subject itself)."""

    lookup: str
    secret: bytes
    commitment: str

    def commit(self, name: str, value: str) -> str:
        return commit(self.secret, name, value)


class SubjectRegistry:
    """Finds, creates and caches subjects' secrets (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        keys: SubjectKeys,
        *,
        cache_size: int = 100_000,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._cache: dict[str, SubjectSecret] = {}
        self._cache_size = cache_size
        self._wall_clock = wall_clock
        self._creating: dict[str, asyncio.Task[SubjectSecret]] = {}
        # Bumped by `forget_all`: a lookup that started before an erasure must not be cached after it.
        self._generation = 0

    def cached(self, subject: str) -> SubjectSecret | None:
        return self._cache.get(subject)

    async def resolve(self, subject: str) -> SubjectSecret:
        """The subject's secret, created on its first use (durable on return). One round trip per
        subject and process, however many requests wait for it; the lookup runs in a task of its
        own, so a waiter that is cancelled (its client left) cancels nobody else's."""
        known = self._cache.get(subject)
        if known is not None:
            return known
        lookup = self._creating.get(subject)
        if lookup is None:
            lookup = asyncio.create_task(self._find_or_create(subject, self._generation))
            self._creating[subject] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(subject, done))
        return await asyncio.shield(lookup)

    def _lookup_done(self, subject: str, done: asyncio.Task[SubjectSecret]) -> None:
        if self._creating.get(subject) is done:
            del self._creating[subject]
        if not done.cancelled():
            done.exception()  # retrieved: a failure whose waiters all left is not "never retrieved"

    async def find(self, subject: str, connection: AsyncConnection | None = None) -> SubjectSecret | None:
        """The subject's secret if it has one; never creates one, never cached (erasure, export and
        verification must see the table, not this process's view)."""
        lookup = self._keys.lookup(subject)
        query = select(subject_secrets.c.wrapped).where(subject_secrets.c.lookup == lookup)
        if connection is not None:
            wrapped = (await connection.execute(query)).scalar_one_or_none()
        else:
            async with self._engine.connect() as own:
                wrapped = (await own.execute(query)).scalar_one_or_none()
        if wrapped is None:
            return None
        return self._opened(subject, lookup, str(wrapped))

    async def commitments_of(self, subjects: set[str], connection: AsyncConnection) -> dict[str, str | None]:
        """Each subject's commitment under its current secret (None: it has none), read on
        `connection` (verification's snapshot): `audit_verify.PlainValueCheck`."""
        lookups = {self._keys.lookup(subject): subject for subject in subjects}
        found: dict[str, str | None] = dict.fromkeys(subjects)
        names = list(lookups)
        for start in range(0, len(names), 500):
            rows = await connection.execute(
                select(subject_secrets.c.lookup, subject_secrets.c.wrapped).where(
                    subject_secrets.c.lookup.in_(names[start : start + 500])
                )
            )
            for lookup, wrapped in rows:
                subject = lookups[str(lookup)]
                found[subject] = self._opened(subject, str(lookup), str(wrapped)).commitment
        return found

    def forget_all(self) -> None:
        """After an erasure anywhere in the fleet: the next use of any subject reads the table."""
        self._generation += 1
        self._cache.clear()
        self._creating.clear()  # lookups in flight finish for their waiters, but are not reused

    async def _find_or_create(self, subject: str, generation: int) -> SubjectSecret:
        found = await self._find_or_insert(subject)
        if generation == self._generation:
            self._remember(subject, found)
        return found

    async def _find_or_insert(self, subject: str) -> SubjectSecret:
        found = await self.find(subject)
        if found is not None:
            return found
        lookup = self._keys.lookup(subject)
        wrapped = self._keys.wrap(lookup, os.urandom(SECRET_BYTES))
        dialect_insert = postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        statement = (
            dialect_insert(subject_secrets)
            .values(lookup=lookup, wrapped=wrapped, created_at=self._wall_clock())
            .on_conflict_do_nothing(index_elements=[subject_secrets.c.lookup])
        )
        async with self._engine.begin() as connection:
            await connection.execute(statement)
            # Whoever inserted first (another replica, a moment ago) wins: read back what stands.
            stored = (
                await connection.execute(
                    select(subject_secrets.c.wrapped).where(subject_secrets.c.lookup == lookup)
                )
            ).scalar_one()
        return self._opened(subject, lookup, str(stored))

    def _opened(self, subject: str, lookup: str, wrapped: str) -> SubjectSecret:
        secret = self._keys.unwrap(lookup, wrapped)
        return SubjectSecret(lookup=lookup, secret=secret, commitment=commit(secret, "subject", subject))

    def _remember(self, subject: str, found: SubjectSecret) -> None:
        if subject not in self._cache and len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))  # oldest first: bounded, no LRU bookkeeping
        self._cache[subject] = found
