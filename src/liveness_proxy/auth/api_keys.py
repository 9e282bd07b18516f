"""API keys: `lpk_<16 hex key id>_<secret>`. Only HMAC-SHA256(pepper, secret) is stored.

The key id in the clear lets us fetch exactly one row and compare its hash in constant time, instead
of looking a hash up (which would make the stored hash an index an attacker can probe).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers

from liveness_proxy.auth.caller import Caller
from liveness_proxy.errors import Unauthenticated
from liveness_proxy.store import ApiKeyStore, StoredApiKey

API_KEY_PREFIX = "lpk_"
_API_KEY_PATTERN = re.compile(r"lpk_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")
_MAX_CREDENTIAL_LENGTH = 4096
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 scope-token
SUBJECT_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


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


def new_api_key(*, pepper: bytes, subject: str, scopes: Iterable[str], name: str, now: float) -> IssuedApiKey:
    if not SUBJECT_PATTERN.fullmatch(subject):
        raise ValueError("subject must be 1-255 characters without control characters")
    scope_tuple = tuple(dict.fromkeys(scopes))
    for scope in scope_tuple:
        if not SCOPE_PATTERN.fullmatch(scope):
            raise ValueError(f"invalid scope {scope!r}: use 1-128 printable characters without spaces")
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
    )
    return IssuedApiKey(key_id=key_id, key=f"{API_KEY_PREFIX}{key_id}_{secret}", stored=stored)


class ApiKeyAuthenticator:
    """Authenticates `X-API-Key: <key>` or `Authorization: Bearer <key>`.

    Verified keys are cached for `cache_seconds`, keyed by the HMAC of the whole key (never the key
    itself), so the hot path does no database read; a revocation takes effect within that time.
    """

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        pepper: bytes,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        cache_size: int = 10_000,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[Caller, float]] = {}
        self._cache_size = cache_size
        self._lookups: dict[str, asyncio.Task[Caller]] = {}

    async def authenticate(self, headers: Headers) -> Caller | None:
        credential = presented_api_key(headers)
        if credential is None:
            return None
        return await self.verify(credential)

    async def verify(self, credential: str) -> Caller:
        if len(credential) > _MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("The API key is not valid.", error="invalid_token")
        match = _API_KEY_PATTERN.fullmatch(credential)
        if match is None:
            raise Unauthenticated("The API key is not valid.", error="invalid_token")
        key_id, secret = match.groups()
        digest = hash_secret(self._pepper, secret)
        cache_key = f"{key_id}:{digest}"
        now = self._clock()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > now:
            return cached[0]
        # One database read per key however many requests present it at once (a cold cache, or an
        # entry expiring, under 1000 concurrent requests would otherwise queue 1000 reads).
        lookup = self._lookups.get(cache_key)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._look_up(key_id, digest, cache_key))
            self._lookups[cache_key] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_done, cache_key))
        # Shielded: one caller giving up must not cancel the read the others wait for.
        return await asyncio.shield(lookup)

    async def _look_up(self, key_id: str, digest: str, cache_key: str) -> Caller:
        stored = await self._store.get(key_id)
        # Compare even when the row is missing, so a wrong id and a wrong secret take the same time.
        expected = stored.secret_hash if stored is not None else hash_secret(self._pepper, "")
        if not hmac.compare_digest(expected, digest) or stored is None or stored.revoked_at is not None:
            self._cache.pop(cache_key, None)
            raise Unauthenticated("The API key is not valid.", error="invalid_token")
        caller = Caller(
            subject=stored.subject, scopes=frozenset(stored.scopes), credential_id=f"key:{key_id}"
        )
        if self._cache_seconds > 0:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[cache_key] = (caller, self._clock() + self._cache_seconds)
        return caller

    def verified_caller(self, headers: Headers) -> Caller | None:
        """The caller of the presented key if this process verified it within `cache_seconds`;
        None otherwise (no database read, nothing awaited)."""
        credential = presented_api_key(headers)
        if credential is None or len(credential) > _MAX_CREDENTIAL_LENGTH:
            return None
        match = _API_KEY_PATTERN.fullmatch(credential)
        if match is None:
            return None
        key_id, secret = match.groups()
        cached = self._cache.get(f"{key_id}:{hash_secret(self._pepper, secret)}")
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        return None

    def _lookup_done(self, cache_key: str, task: asyncio.Task[Caller]) -> None:
        self._lookups.pop(cache_key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter has gone


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
