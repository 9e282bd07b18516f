"""The keys that verify JWT callers: a JWKS fetched from the identity provider, or one PEM public key.

Every key is bound, when it is loaded and not when a token arrives, to the exact algorithms it may
verify: an RSA key to RS*/PS*, an EC key to the one ES* of its curve, an Ed25519/Ed448 key to EdDSA,
each intersected with the configured allow-list. A key whose JWK says `alg` verifies that algorithm
only. Anything else is skipped: `kty: oct` (a shared secret could only ever be an HMAC key, the
classic key-confusion hole), `use` other than `sig`, `key_ops` without `verify`, JWKs carrying
private members, RSA keys under 2048 bits, unknown curves. So a token can never choose how its key
is interpreted; it can only name a key and an algorithm that must both fit.

The JWKS cache never makes a caller wait while it has keys: after `cache_seconds` the stale keys keep
answering while one background request fetches new ones, and a failed fetch (host down, non-200,
too large, not a JWKS) keeps the last good keys. A fetch starts at most once per
`refetch_interval_seconds` (an unknown `kid` asks for one, so random kids cannot turn requests into
JWKS requests) and at most one is in flight. Callers only wait for a fetch when there is something to
gain: no keys yet, or a `kid` we do not know (a rotated key must work on its first use, not after
the next scheduled refresh). They wait for the one fetch in flight, which the JWKS timeout bounds.

Why not PyJWT's `PyJWKClient` (2.15) for the fetching and caching: it fetches with blocking
`urllib` (the event loop would stall for the whole fetch), and once its cache expires the next caller
waits for the fetch. The keys themselves are PyJWT's `PyJWK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import jwt.algorithms
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from liveness_proxy.jwt_algorithms import ASYMMETRIC_JWT_ALGORITHMS, EC_ALGORITHM_BY_CURVE, RSA_ALGORITHMS

MAX_JWKS_BYTES = 256 * 1024
# More keys than any identity provider publishes; bounds the work one (possibly hostile) JWKS causes.
MAX_JWKS_KEYS = 100
MAX_KID_LENGTH = 256
MAX_PEM_BYTES = 64 * 1024
MIN_RSA_KEY_BITS = 2048

_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
# Signature algorithms with a public key (one definition, shared with the settings). HS* and "none"
# are not there, so nothing built from this module can verify them, whatever the settings say.
ASYMMETRIC_ALGORITHMS = ASYMMETRIC_JWT_ALGORITHMS
# Private-key members (RFC 7518 §6): a JWKS that carries them is broken, and "k" is a shared secret.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key. Each PyJWK in `by_algorithm` is bound to exactly its algorithm, and PyJWS
    refuses a token whose `alg` differs from the key's."""

    kid: str | None
    by_algorithm: Mapping[str, jwt.PyJWK]


class KeyMiss(enum.Enum):
    """Why no key was selected for a token."""

    UNKNOWN_KID = "The token was signed by an unknown key."
    ALGORITHM_MISMATCH = "The token's algorithm does not fit its key."
    AMBIGUOUS = "The token names no key and several keys could verify it."


class KeySet:
    """An immutable set of verification keys, indexed by `kid`.

    With `match_kid=False` (a single configured PEM key) the token's `kid` is not used to select:
    there is only one key to try.
    """

    def __init__(self, keys: Sequence[VerificationKey], *, match_kid: bool = True) -> None:
        self._keys = tuple(keys)
        self._match_kid = match_kid
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in self._keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self._by_kid = {kid: tuple(keys) for kid, keys in by_kid.items()}

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._by_kid)

    def select(self, kid: str | None, algorithm: str) -> jwt.PyJWK | KeyMiss:
        """The one key that may verify a token with this `kid` and `alg`.

        A token without `kid` is verified only when exactly one key fits its algorithm: trying
        several keys would multiply the signature checks one forged token costs.
        """
        if kid is not None and self._match_kid:
            candidates = self._by_kid.get(kid)
            if candidates is None:
                return KeyMiss.UNKNOWN_KID
        else:
            candidates = self._keys
        fitting = [key.by_algorithm[algorithm] for key in candidates if algorithm in key.by_algorithm]
        if not fitting:
            return KeyMiss.ALGORITHM_MISMATCH
        if len(fitting) > 1:
            return KeyMiss.AMBIGUOUS
        return fitting[0]


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWK's key type (and curve) can verify at all."""
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if kty == "RSA":
        return RSA_ALGORITHMS
    if kty == "EC" and isinstance(crv, str) and crv in EC_ALGORITHM_BY_CURVE:
        return frozenset({EC_ALGORITHM_BY_CURVE[crv]})
    if kty == "OKP" and isinstance(crv, str) and crv in _OKP_CURVES:
        return frozenset({"EdDSA"})
    return frozenset()


def verification_key_from_jwk(jwk: object, allowed_algorithms: Collection[str]) -> VerificationKey | None:
    """The key a JWKS entry describes, or None when it is not a usable signature-verification key."""
    if not isinstance(jwk, dict):
        return None
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
        return None
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    if not _PRIVATE_JWK_MEMBERS.isdisjoint(jwk):
        return None
    algorithms = _algorithms_for(jwk) & frozenset(allowed_algorithms) & ASYMMETRIC_ALGORITHMS
    declared = jwk.get("alg")
    if declared is not None:
        if not isinstance(declared, str) or declared not in algorithms:
            return None
        algorithms = frozenset({declared})
    if not algorithms:
        return None
    by_algorithm: dict[str, jwt.PyJWK] = {}
    for algorithm in sorted(algorithms):
        try:
            bound = jwt.PyJWK(jwk, algorithm=algorithm)
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        if not isinstance(bound.key, _PUBLIC_KEY_TYPES):
            return None
        if isinstance(bound.key, rsa.RSAPublicKey) and bound.key.key_size < MIN_RSA_KEY_BITS:
            return None
        by_algorithm[algorithm] = bound
    return VerificationKey(kid=kid, by_algorithm=by_algorithm)


class JwksError(Exception):
    """A JWKS could not be fetched or is not a JWKS. The message never quotes the response."""


def parse_jwks(body: bytes, allowed_algorithms: Collection[str]) -> KeySet:
    """The usable keys of a JWKS document; unusable entries are skipped, a non-JWKS is an error.

    A well-formed JWKS with no usable key still replaces the cached keys: the identity provider
    withdrawing its keys is an answer to honour (a revocation), unlike a broken response.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JwksError("JWKS response is not JSON") from None
    if not isinstance(document, dict):
        raise JwksError("JWKS response is not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JwksError("JWKS response has no 'keys' list")
    if len(entries) > MAX_JWKS_KEYS:
        raise JwksError(f"JWKS response has more than {MAX_JWKS_KEYS} keys")
    keys = [key for entry in entries if (key := verification_key_from_jwk(entry, allowed_algorithms))]
    return KeySet(keys)


class PublicKeyFileError(Exception):
    """The configured public key file cannot be used. The message says why, never what it holds."""


def key_set_from_pem(pem: bytes, allowed_algorithms: Collection[str]) -> KeySet:
    """The one key of a PEM public key or X.509 certificate; raises PublicKeyFileError saying what is
    wrong (never quoting the file).

    A certificate is accepted for its public key only: its validity dates and chain are not checked,
    because trust comes from the operator having put this file here, as with a bare public key.
    A private key is refused: the proxy must never hold the identity provider's signing key.
    """
    if b"PRIVATE KEY" in pem:
        raise PublicKeyFileError("the file holds a private key; give the identity provider's public key only")
    public_key: Any
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            public_key = x509.load_pem_x509_certificate(pem).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise PublicKeyFileError("the file is not a PEM public key or certificate") from None
    jwk: dict[str, Any]
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_KEY_BITS:
            raise PublicKeyFileError(f"the RSA key has fewer than {MIN_RSA_KEY_BITS} bits")
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
        except jwt.PyJWTError:
            raise PublicKeyFileError(
                "the EC key's curve is not supported (use P-256, P-384 or P-521)"
            ) from None
    elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        raise PublicKeyFileError("the key type is not supported (use RSA, EC or Ed25519/Ed448)")
    key = verification_key_from_jwk(jwk, allowed_algorithms)
    if key is None:
        raise PublicKeyFileError("the key cannot verify any of LIVENESS_PROXY_JWT_ALGORITHMS")
    return KeySet([key], match_kid=False)


def load_public_key_file(path: Path, allowed_algorithms: Collection[str]) -> KeySet:
    """Reads `path` into a one-key set (at start-up, so a blocking read is fine).

    Raises PublicKeyFileError when the file cannot be read or used.
    """
    try:
        with path.open("rb") as file:
            pem = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise PublicKeyFileError(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if len(pem) > MAX_PEM_BYTES:
        raise PublicKeyFileError(f"the file is larger than {MAX_PEM_BYTES} bytes")
    return key_set_from_pem(pem, allowed_algorithms)


class KeySource(Protocol):
    """Where a JwtAuthenticator gets its keys."""

    async def current(self) -> KeySet | None:
        """The keys to verify with now; None only when there are none and none can be had now."""
        ...

    async def refetch_for_unknown_kid(self) -> KeySet | None:
        """Keys that may know a `kid` the current ones do not (may return the current ones)."""
        ...

    def retry_after_seconds(self) -> int:
        """When asking again may help, after `current()` returned None."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticKeySource:
    """A key set that never changes: the configured PEM key."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    async def current(self) -> KeySet:
        return self._keys

    async def refetch_for_unknown_kid(self) -> KeySet:
        return self._keys

    def retry_after_seconds(self) -> int:
        return 1

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class JwksFetcher(Protocol):
    """Where the JWKS document comes from: over HTTP, `auth/jwks_http.py`'s HttpJwksFetcher."""

    async def fetch(self) -> bytes:
        """The JWKS document's bytes; raises JwksError when there is no usable answer."""
        ...


class JwksCache:
    """The identity provider's keys, cached; see the module docstring for the policy."""

    def __init__(
        self,
        fetcher: JwksFetcher,
        *,
        allowed_algorithms: Collection[str],
        cache_seconds: float,
        refetch_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._allowed_algorithms = frozenset(allowed_algorithms)
        self._cache_seconds = cache_seconds
        self._refetch_interval = refetch_interval_seconds
        self._clock = clock
        self._on_failure = on_failure
        self._keys: KeySet | None = None
        self._stale_at = 0.0
        # No fetch starts before this: one per interval, whatever triggers it, and whether the last
        # one succeeded or not (a dead JWKS host is not asked once per request).
        self._next_fetch_at = 0.0
        self._inflight: asyncio.Task[KeySet | None] | None = None

    @property
    def keys(self) -> KeySet | None:
        """The last good key set, stale or not."""
        return self._keys

    async def start(self) -> None:
        """Fetches the keys once, so the first callers need not wait; never raises.

        Waits at most the JWKS timeout; on failure the first requests will try again.
        """
        task = self._start_fetch(self._clock())
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def current(self) -> KeySet | None:
        now = self._clock()
        if self._keys is not None:
            if now >= self._stale_at:
                self._start_fetch(now)  # in the background: this caller keeps the stale keys
            return self._keys
        task = self._start_fetch(now)
        if task is None:
            return None  # the last fetch failed within the interval: answer at once, do not queue
        return await asyncio.shield(task)

    async def refetch_for_unknown_kid(self) -> KeySet | None:
        task = self._start_fetch(self._clock())
        if task is None:
            return self._keys  # a fetch already ran within the interval: fail fast on what we have
        return await asyncio.shield(task)

    def retry_after_seconds(self) -> int:
        return max(1, math.ceil(self._next_fetch_at - self._clock()))

    def _start_fetch(self, now: float) -> asyncio.Task[KeySet | None] | None:
        """The fetch in flight, else a new one if the interval allows, else None."""
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        if now < self._next_fetch_at:
            return None
        self._next_fetch_at = now + self._refetch_interval
        self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="jwks-fetch")
        return self._inflight

    async def _fetch(self) -> KeySet | None:
        """Never raises (but for cancellation): a failure keeps, and returns, the last good keys."""
        started = self._clock()
        try:
            keys = parse_jwks(await self._fetcher.fetch(), self._allowed_algorithms)
        except JwksError as exc:
            self._report(str(exc))
            return self._keys
        except Exception as exc:
            self._report(f"JWKS fetch failed ({type(exc).__name__})")
            return self._keys
        self._keys = keys
        self._stale_at = started + self._cache_seconds
        return keys

    def _report(self, message: str) -> None:
        if self._on_failure is not None:
            with contextlib.suppress(Exception):  # a broken log hook must not break verification
                self._on_failure(message)
