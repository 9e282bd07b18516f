"""Session tokens bound to the subject that obtained them.

A Cynopsis session token is a bearer token for one liveness attempt. Unbound, anyone who saw one
(another user of the same app, a log, a shoulder) could spend it as themselves. The proxy therefore
remembers each token it hands out (a keyed hash, with a keyed hash of its subject and its expiry)
and accepts it on `POST /v1/liveness/sessions` only from that subject, once, before it expires.

Every refusal is the same `SessionTokenInvalid`: an unknown, foreign, used or expired token cannot
be told apart. The use is `take`n only when the create call is about to go out, and put back if a
limit then refuses the call, so a refusal before the call never costs the caller its token.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from liveness_proxy.errors import SessionTokenInvalid
from liveness_proxy.store.session_tokens import SessionTokenLedger

# When the upstream's answer says nothing usable about the token's life (`expires_in` missing, not a
# positive integer), the binding lives this long; it never lives longer than the cap, whatever the
# upstream says, so the table (or Redis) holds at most an hour of tokens.
DEFAULT_LIFETIME_SECONDS = 600
MAX_LIFETIME_SECONDS = 3600


class KeyedHash:
    """HMAC-SHA256 under a key derived from the server's pepper, with one domain per kind of value,
    so the hash of a token can never be mistaken for the hash of a subject (or of an API key)."""

    def __init__(self, pepper: bytes) -> None:
        self._key = hmac.new(pepper, b"liveness-proxy request integrity v1", hashlib.sha256).digest()

    def token(self, token: str) -> str:
        return self._hash(b"session-token\x00", token)

    def subject(self, subject: str) -> str:
        return self._hash(b"subject\x00", subject)

    def fingerprint(self, request: bytes) -> str:
        """Of an idempotent request's canonical body: keyed, because the body holds the session
        token and a plain hash would let a database reader test guesses against it."""
        return hmac.new(self._key, b"request\x00" + request, hashlib.sha256).hexdigest()

    def _hash(self, domain: bytes, value: str) -> str:
        return hmac.new(self._key, domain + value.encode(), hashlib.sha256).hexdigest()


def binding_lifetime(expires_in: object) -> float:
    """Seconds a handed-out token stays usable, from the upstream's `expires_in`."""
    if isinstance(expires_in, int) and not isinstance(expires_in, bool) and expires_in > 0:
        return float(min(expires_in, MAX_LIFETIME_SECONDS))
    return float(DEFAULT_LIFETIME_SECONDS)


@dataclass(slots=True)
class TakenToken:
    """A token's one use, which `put_back` undoes (once) while its create call has not gone out."""

    _ledger: SessionTokenLedger | None
    _token_hash: str = ""
    _subject_hash: str = ""
    _expires_at: float = 0.0
    _wall_clock: Callable[[], float] = time.time

    async def put_back(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            await ledger.put_back(self._token_hash, self._subject_hash, self._expires_at, self._wall_clock())


class SessionTokenBinding:
    def __init__(
        self,
        ledger: SessionTokenLedger,
        hashes: KeyedHash,
        *,
        enabled: bool,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._hashes = hashes
        self._wall_clock = wall_clock
        self.enabled = enabled

    async def bind(self, token: str, commitment: str, expires_in: object) -> bool:
        """Remembers that the subject whose commitment is `commitment` (store/subjects.py: never
        its name, so an erasure leaves the row unlinkable) obtained `token`; durable on return.
        False when the token was bound already (the upstream issued it twice): its first binding
        stands."""
        if not self.enabled:
            return True
        now = self._wall_clock()
        return await self._ledger.remember(
            self._hashes.token(token),
            self._hashes.subject(commitment),
            now + binding_lifetime(expires_in),
            now,
        )

    async def take(self, token: str, commitment: str) -> TakenToken:
        """The token's one use by the subject of `commitment`; SessionTokenInvalid when it has none
        left for them."""
        if not self.enabled:
            return TakenToken(None)
        token_hash, subject_hash = self._hashes.token(token), self._hashes.subject(commitment)
        expires_at = await self._ledger.take(token_hash, subject_hash, self._wall_clock())
        if expires_at is None:
            raise SessionTokenInvalid()
        return TakenToken(self._ledger, token_hash, subject_hash, expires_at, self._wall_clock)
