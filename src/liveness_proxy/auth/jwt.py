"""JWT callers: `Authorization: Bearer <JWT>` signed by the customer's identity provider.

A token is checked from the cheapest test to the dearest, so a forged one costs at most what a
valid one does: its length, then its shape (three base64url segments), then its small header
(`alg` on the allow-list, a well-formed `kid`, no `crit`), then the selection of exactly one key that
fits both (see `jwks.py`), then one signature check by PyJWT, and only then the payload and its
claims. `exp` is required; `nbf` and `iat` are honoured with the configured leeway; a token may not
live longer than `max_lifetime_seconds`, counted from `iat` when it has one and from now in any case
(so a token without `iat` is held to its remaining time only); `iss` and `aud` are enforced when
configured (the settings require an audience unless the operator allows any). Header members
that point at keys (`jku`, `x5u`, `jwk`, `x5c`) are ignored: keys come from configuration only.
A 401 may say briefly what was wrong, never what the token contained.

Every Bearer credential that is not an API key (`lpk_…`) is taken to be a JWT: with the chain
[API keys, JWT] a token of neither kind is refused here, with a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
import orjson
from starlette.datastructures import Headers

from liveness_proxy.auth.api_keys import SCOPE_PATTERN, SUBJECT_PATTERN, bearer_credential, looks_like_api_key
from liveness_proxy.auth.caller import Caller, is_reference
from liveness_proxy.auth.jwks import (
    ASYMMETRIC_ALGORITHMS,
    MAX_KID_LENGTH,
    KeyMiss,
    KeySource,
)
from liveness_proxy.errors import ServiceUnavailable, Unauthenticated

# A JWS in compact form: three unpadded base64url segments. The header is small in every real token;
# bounding it keeps the one thing decoded before the key lookup cheap.
MAX_HEADER_SEGMENT_CHARS = 4096
_COMPACT_JWS = re.compile(
    rf"([A-Za-z0-9_-]{{2,{MAX_HEADER_SEGMENT_CHARS}}})\.([A-Za-z0-9_-]{{2,}})\.([A-Za-z0-9_-]{{2,}})"
)
# credential_id is "jwt:" + the kid when the kid is short printable ASCII; else a digest of it.
_MAX_CREDENTIAL_ID_LENGTH = 64
_PRINTABLE_KID = re.compile(r"[\x21-\x7e]{1,60}")
_TOO_LONG = "The token lives longer than this proxy accepts (exp - iat, or exp - now)."


@dataclass(frozen=True, slots=True)
class JwtPolicy:
    """What a token must satisfy besides its signature."""

    algorithms: frozenset[str]
    issuer: str | None
    audiences: frozenset[str]
    subject_claim: str
    leeway_seconds: float
    max_token_bytes: int
    reference_claim: str | None = None  # the customer's business id for the session, if any
    max_lifetime_seconds: float = 86400.0  # the longest `exp - iat`, and `exp - now`


def _refuse(detail: str) -> Unauthenticated:
    return Unauthenticated(detail, error="invalid_token")


def _is_timestamp(value: object) -> TypeGuard[int | float]:
    # bool is an int in Python; `"exp": true` is not a time.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class JwtAuthenticator:
    """Turns a verified JWT into a Caller; see the module docstring for the order of checks."""

    def __init__(
        self,
        policy: JwtPolicy,
        keys: KeySource,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._keys = keys
        self._wall_clock = wall_clock
        # Defence in depth: even a policy built by hand cannot allow HS* or "none" here.
        algorithms = sorted(policy.algorithms & ASYMMETRIC_ALGORITHMS)
        if not algorithms:
            raise ValueError("a JwtAuthenticator needs at least one asymmetric algorithm")
        self._algorithms = frozenset(algorithms)
        self._jws = jwt.PyJWS(algorithms=algorithms, options={"enforce_minimum_key_length": True})

    async def start(self) -> None:
        """Loads the keys ahead of the first request where that helps (a JWKS); never raises."""
        await self._keys.start()

    async def close(self) -> None:
        """Stops any background key fetch."""
        await self._keys.close()

    async def authenticate(self, headers: Headers) -> Caller | None:
        token = bearer_credential(headers)
        if token is None or looks_like_api_key(token):
            return None
        if "x-api-key" in headers:
            # Two credentials: refuse rather than pick one, as the API-key authenticator does.
            raise Unauthenticated(
                "Send one credential: Authorization or X-API-Key, not both.", error="invalid_request"
            )
        return await self.verify(token)

    async def verify(self, token: str) -> Caller:
        # Header values arrive decoded as latin-1, one character per byte: len() is the byte count.
        if len(token) > self._policy.max_token_bytes:
            raise _refuse("The token is too large.")
        shape = _COMPACT_JWS.fullmatch(token)
        if shape is None:
            raise _refuse("The token is malformed.")
        header = _decode_header(shape[1])
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise _refuse("The token's algorithm is not accepted.")
        if "crit" in header or "b64" in header:
            raise _refuse("The token uses an unsupported header extension.")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH):
            raise _refuse("The token is malformed.")
        key = await self._select_key(kid, algorithm)
        try:
            verified = self._jws.decode_complete(token, key=key, algorithms=[algorithm])
        except (jwt.PyJWTError, ValueError):
            raise _refuse("The token signature is not valid.") from None
        try:
            claims = orjson.loads(verified["payload"])
        except orjson.JSONDecodeError:
            raise _refuse("The token is malformed.") from None
        if not isinstance(claims, dict):
            raise _refuse("The token is malformed.")
        return self._caller(claims, kid)

    async def _select_key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        keys = await self._keys.current()
        if keys is None:
            # Not the caller's fault: the identity provider's keys cannot be had right now.
            raise ServiceUnavailable(
                "The keys to verify the token are not available right now.",
                retry_after_seconds=self._keys.retry_after_seconds(),
            )
        selected = keys.select(kid, algorithm)
        if selected is KeyMiss.UNKNOWN_KID:
            refreshed = await self._keys.refetch_for_unknown_kid()
            if refreshed is not None and refreshed is not keys:
                selected = refreshed.select(kid, algorithm)
        if isinstance(selected, KeyMiss):
            raise _refuse(selected.value)
        return selected

    def _caller(self, claims: dict[str, Any], kid: str | None) -> Caller:
        policy = self._policy
        now = self._wall_clock()
        expires = claims.get("exp")
        if not _is_timestamp(expires):
            raise _refuse("The token has no valid expiry (exp).")
        if expires <= now - policy.leeway_seconds:
            raise _refuse("The token has expired.")
        # The leeway here allows for our clock running behind the identity provider's.
        if expires - now > policy.max_lifetime_seconds + policy.leeway_seconds:
            raise _refuse(_TOO_LONG)
        not_before = claims.get("nbf")
        if not_before is not None and (
            not _is_timestamp(not_before) or not_before > now + policy.leeway_seconds
        ):
            raise _refuse("The token is not valid yet.")
        issued_at = claims.get("iat")
        if issued_at is not None and (
            not _is_timestamp(issued_at) or issued_at > now + policy.leeway_seconds
        ):
            raise _refuse("The token was issued in the future.")
        # Both times come from the token itself: no clock skew to allow for.
        if issued_at is not None and expires - issued_at > policy.max_lifetime_seconds:
            raise _refuse(_TOO_LONG)
        if policy.issuer is not None and claims.get("iss") != policy.issuer:
            raise _refuse("The token's issuer is not accepted.")
        if policy.audiences and not _audiences(claims.get("aud")) & policy.audiences:
            raise _refuse("The token's audience is not accepted.")
        subject = claims.get(policy.subject_claim)
        # isprintable() also refuses C1 controls, line separators and bidi overrides, which an
        # identity provider may copy from user input into a claim such as `email` or `name`.
        if (
            not isinstance(subject, str)
            or not SUBJECT_PATTERN.fullmatch(subject)
            or not subject.isprintable()
        ):
            raise _refuse("The token has no usable subject.")
        reference = None
        if policy.reference_claim is not None and policy.reference_claim in claims:
            reference = claims[policy.reference_claim]
            if not is_reference(reference):
                raise _refuse("The token's reference claim is not usable.")
        return Caller(
            subject=subject, scopes=_scopes(claims), credential_id=_credential_id(kid), reference=reference
        )


def _decode_header(segment: str) -> dict[str, Any]:
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise _refuse("The token is malformed.") from None
    if not isinstance(header, dict):
        raise _refuse("The token is malformed.")
    return header


def _audiences(claim: object) -> frozenset[str]:
    """`aud` as a set; a claim of another shape matches nothing."""
    if isinstance(claim, str):
        return frozenset({claim})
    if isinstance(claim, list) and all(isinstance(item, str) for item in claim):
        return frozenset(claim)
    return frozenset()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """The union of `scope` (RFC 8693: a space-separated string) and `scp` (a list, or a string).

    A malformed scope refuses the token rather than being dropped: it means the identity provider
    and this proxy disagree about the token format, which should be loud.
    """
    found: list[str] = []
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise _refuse("The token's scopes are malformed.")
        found.extend(scope.split(" "))
    scp = claims.get("scp")
    if isinstance(scp, str):
        found.extend(scp.split(" "))
    elif isinstance(scp, list) and all(isinstance(item, str) for item in scp):
        found.extend(scp)
    elif scp is not None:
        raise _refuse("The token's scopes are malformed.")
    scopes = frozenset(item for item in found if item)
    if not all(SCOPE_PATTERN.fullmatch(item) for item in scopes):
        raise _refuse("The token's scopes are malformed.")
    return scopes


def _credential_id(kid: str | None) -> str:
    """Names the verifying key for the audit log: `jwt:<kid>`, at most 64 characters, no secret."""
    if kid is None:
        return "jwt"
    if _PRINTABLE_KID.fullmatch(kid):
        return f"jwt:{kid}"
    digest = hashlib.sha256(kid.encode("utf-8", "surrogatepass")).hexdigest()
    return f"jwt:sha256:{digest}"[:_MAX_CREDENTIAL_ID_LENGTH]
