"""API keys: `lpk_<16 hex key id>_<secret>`. Only HMAC-SHA256(pepper, secret) is stored.

The key id in the clear lets us fetch exactly one row and compare its hash in constant time, instead
of looking a hash up (which would make the stored hash an index an attacker can probe).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from starlette.datastructures import Headers

from liveness_proxy.auth.caller import Caller
from liveness_proxy.auth.key_ids import KnownKeyIds
from liveness_proxy.auth.key_usage import DEFAULT_USE_INTERVAL_SECONDS, KeyUseRecorder
from liveness_proxy.errors import Unauthenticated
from liveness_proxy.store import ApiKeyStore, StoredApiKey

API_KEY_PREFIX = "lpk_"
_API_KEY_PATTERN = re.compile(r"lpk_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")
_MAX_CREDENTIAL_LENGTH = 4096
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 scope-token
SUBJECT_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
# The longest an unknown key id is answered from memory (see ApiKeyAuthenticator).
MAX_UNKNOWN_SECONDS = 10.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    """A freshly made key: `key` is shown once and never stored."""

    key_id: str
    key: str
    stored: StoredApiKey


def hash_secret(pepper: bytes, secret: str) -> str:
    # hmac.digest is the one-shot C path: the same HMAC-SHA256, without building an HMAC object on
    # every authenticated request.
    return hmac.digest(pepper, secret.encode("ascii"), "sha256").hex()


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(API_KEY_PREFIX)


def new_api_key(
    *,
    pepper: bytes,
    subject: str,
    scopes: Iterable[str],
    name: str,
    now: float,
    expires_at: float | None = None,
    successor_of: str | None = None,
) -> IssuedApiKey:
    """A new key for `subject`; `expires_at` (epoch seconds) None: it never expires."""
    if not SUBJECT_PATTERN.fullmatch(subject):
        raise ValueError("subject must be 1-255 characters without control characters")
    scope_tuple = tuple(dict.fromkeys(scopes))
    for scope in scope_tuple:
        if not SCOPE_PATTERN.fullmatch(scope):
            raise ValueError(f"invalid scope {scope!r}: use 1-128 printable characters without spaces")
    if expires_at is not None and expires_at <= now:
        raise ValueError("the expiry must be in the future")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    stored = StoredApiKey(
        key_id=key_id,
        name=name[:200],
        subject=subject,
        scopes=scope_tuple,
        secret_hash=hash_secret(pepper, secret),
        created_at=now,
        revoked_at=None,
        expires_at=expires_at,
        successor_of=successor_of,
    )
    return IssuedApiKey(key_id=key_id, key=f"{API_KEY_PREFIX}{key_id}_{secret}", stored=stored)


@dataclass(frozen=True, slots=True)
class _KnownKey:
    """A key row as the authenticator caches it. Times are on the authenticator's clock."""

    secret_hash: str
    caller: Caller | None  # None: revoked
    usable_until: float  # its expiry (inf: none)
    cached_until: float


class ApiKeyAuthenticator:
    """Authenticates `X-API-Key: <key>` or `Authorization: Bearer <key>`.

    Key rows are cached by key id for `cache_seconds`, so the hot path does no database read: a
    revocation takes effect within that time, an expiry exactly when it falls. A key id with no row
    is remembered as unknown for `cache_seconds` too (at most `MAX_UNKNOWN_SECONDS`), so a flood of
    bad keys with one id costs one read, and that memory is bounded (the oldest id is forgotten
    first); every id in the store is held too (`key_ids.KnownKeyIds`), so random ids cost no read
    each. Every wrong key gets the same answer, whatever was wrong: unknown id, wrong secret,
    revoked or expired.
    """

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        pepper: bytes,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        unknown_cache_size: int = 10_000,
        max_known_ids: int = 200_000,
        use_interval_seconds: float = DEFAULT_USE_INTERVAL_SECONDS,
        on_use_not_recorded: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._cache_seconds = cache_seconds
        # A key created after someone presented its id stays hidden this long at most (ids are 64
        # random bits, so only a caller who had the key before its row existed can be affected:
        # a replica that lags behind the primary, say).
        self._unknown_seconds = min(cache_seconds, MAX_UNKNOWN_SECONDS)
        self._clock = clock
        self._wall_clock = wall_clock
        self._known: dict[str, _KnownKey] = {}
        self._cache_size = cache_size
        self._unknown: dict[str, float] = {}  # key id -> until when it is taken as unknown
        self._unknown_cache_size = unknown_cache_size
        self._lookups: dict[str, asyncio.Task[_KnownKey | None]] = {}
        self._uses = KeyUseRecorder(
            store,
            wall_clock=wall_clock,
            interval_seconds=use_interval_seconds,
            on_failure=on_use_not_recorded,
        )
        # Every id in the store, so that a flood of random ids costs one read per interval, not one
        # per request (kept as long as unknown ids are remembered; off with the cache).
        self._ids = KnownKeyIds(
            store.ids, max_age_seconds=self._unknown_seconds, clock=clock, max_ids=max_known_ids
        )
        # Compared against when the id is unknown, so that answer costs what a wrong secret does.
        self._absent_hash = hash_secret(pepper, "")

    def forget_all(self) -> None:
        """After an erasure anywhere in the fleet: verified keys hold their subject, and the erased
        subject's keys are now revoked in the store."""
        self._known.clear()

    async def authenticate(self, headers: Headers) -> Caller | None:
        credential = presented_api_key(headers)
        if credential is None:
            return None
        return await self.verify(credential)

    async def close(self) -> None:
        """Writes the key uses not recorded yet."""
        await self._uses.close()

    async def verify(self, credential: str) -> Caller:
        parts = _key_parts(credential)
        if parts is None:
            raise _invalid()
        key_id, secret = parts
        digest = hash_secret(self._pepper, secret)
        now = self._clock()
        known = self._known.get(key_id)
        if known is None or known.cached_until <= now:
            if self._unknown.get(key_id, 0.0) > now or not await self._ids.may_exist(key_id):
                known = None
            else:
                known = await self._read(key_id)
        expected = known.secret_hash if known is not None else self._absent_hash
        if (
            not hmac.compare_digest(expected, digest)
            or known is None
            or known.caller is None
            or known.usable_until <= now
        ):
            raise _invalid()
        self._uses.used(key_id, now)
        return known.caller

    async def _read(self, key_id: str) -> _KnownKey | None:
        # One database read per key id however many requests present it at once (a cold cache, or
        # an entry expiring, under 1000 concurrent requests would otherwise queue 1000 reads).
        lookup = self._lookups.get(key_id)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._look_up(key_id))
            self._lookups[key_id] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_done, key_id))
        # Shielded: one caller giving up must not cancel the read the others wait for.
        return await asyncio.shield(lookup)

    async def _look_up(self, key_id: str) -> _KnownKey | None:
        stored = await self._store.get(key_id)
        now = self._clock()
        if stored is None:
            if self._unknown_seconds > 0:
                _remember(self._unknown, key_id, now + self._unknown_seconds, self._unknown_cache_size)
            return None
        self._unknown.pop(key_id, None)
        caller = None
        if stored.revoked_at is None:
            caller = Caller(
                subject=stored.subject, scopes=frozenset(stored.scopes), credential_id=f"key:{key_id}"
            )
        # The expiry is a wall-clock time; it is carried over to the cache's clock once, here.
        usable_until = (
            math.inf if stored.expires_at is None else now + (stored.expires_at - self._wall_clock())
        )
        known = _KnownKey(stored.secret_hash, caller, usable_until, now + self._cache_seconds)
        if self._cache_seconds > 0:
            _remember(self._known, key_id, known, self._cache_size)
        return known

    async def known_caller(self, headers: Headers) -> Caller | None:
        """The caller of the presented key if this process has its row in memory and the secret
        matches it; None otherwise, without a database read. A row older than `cache_seconds` is
        read again first (once per interval, and only for someone who holds the right secret, which
        no flood can forge), so a revocation or expiry still takes effect."""
        credential = presented_api_key(headers)
        parts = None if credential is None else _key_parts(credential)
        if parts is None:
            return None
        key_id, secret = parts
        known = self._known.get(key_id)
        if known is None or not hmac.compare_digest(known.secret_hash, hash_secret(self._pepper, secret)):
            return None
        now = self._clock()
        if known.cached_until <= now:
            known = await self._read(key_id)
        if known is None or known.caller is None or known.usable_until <= now:
            return None
        self._uses.used(key_id, now)
        return known.caller

    def _lookup_done(self, key_id: str, task: asyncio.Task[_KnownKey | None]) -> None:
        self._lookups.pop(key_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter has gone


def _remember(cache: dict[str, _T], key: str, value: _T, size: int) -> None:
    if key not in cache and len(cache) >= size:
        # Drop the oldest entry (dicts keep insertion order): bounded memory, no LRU bookkeeping.
        cache.pop(next(iter(cache)))
    cache[key] = value


def _key_parts(credential: str) -> tuple[str, str] | None:
    """(key id, secret) of a credential shaped like one of our keys; None for anything else."""
    if len(credential) > _MAX_CREDENTIAL_LENGTH:
        return None
    match = _API_KEY_PATTERN.fullmatch(credential)
    return None if match is None else (match[1], match[2])


def _invalid() -> Unauthenticated:
    return Unauthenticated("The API key is not valid.", error="invalid_token")


def presented_api_key(headers: Headers) -> str | None:
    """The API key the request carries, if any: `X-API-Key`, or a Bearer credential with our prefix."""
    # getlist, not get: Mapping.get raises and catches KeyError when the header is absent, which it
    # is on nearly every request (Bearer is the common form), and that showed in profiles.
    presented = headers.getlist("x-api-key")
    explicit = presented[0] if presented else None
    if explicit is not None:
        if "authorization" in headers:
            # Two credentials: refuse rather than pick one, so no proxy in front can smuggle a second.
            raise Unauthenticated(
                "Send one credential: Authorization or X-API-Key, not both.", error="invalid_request"
            )
        return explicit.strip()
    bearer = bearer_credential(headers)
    if bearer is not None and looks_like_api_key(bearer):
        return bearer
    return None


def bearer_credential(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None
