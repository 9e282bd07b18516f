"""JWT callers: verified against a JWKS served over real HTTP on loopback, or a PEM key file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import hmac
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import jwt.algorithms
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liveness_proxy.auth import (
    CallerAuthentication,
    JwksCache,
    JwtAuthenticator,
    JwtPolicy,
)
from liveness_proxy.auth.jwks import parse_jwks
from liveness_proxy.errors import ConfigurationError, ServiceUnavailable, Unauthenticated
from liveness_proxy.http import Http1Transport, HttpTransport
from liveness_proxy.sandbox import ManualClock
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.wiring.parts import jwt_authenticator
from support import ServerThread

ISSUER = "https://idp.example.test/"
AUDIENCE = "liveness-proxy"
CACHE_SECONDS = 300.0
REFETCH_INTERVAL_SECONDS = 30.0


# --- keys and tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """rsa_1 and ec_1 are published as kids "rsa-1" and "ec-1"; rsa_2 is the rotated-in key."""

    rsa_1: rsa.RSAPrivateKey
    rsa_2: rsa.RSAPrivateKey
    ec_1: ec.EllipticCurvePrivateKey
    weak_rsa: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_1=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_1=ec.generate_private_key(ec.SECP256R1()),
        # Too short on purpose: the tests show it is refused.
        weak_rsa=rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **members: Any) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256", **members}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **members: Any) -> dict[str, Any]:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256", **members}


def claims(*, drop: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    now = time.time()
    values: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 300,
        "scope": "liveness:read liveness:write",
    }
    values.update(overrides)
    for name in drop:
        values.pop(name)
    return values


def sign(key: Any, *, alg: str = "RS256", kid: str | None = "rsa-1", **claim_overrides: Any) -> str:
    drop = claim_overrides.pop("drop", ())
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(drop=drop, **claim_overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token PyJWT would refuse to make (alg none, HMAC with a public key as the secret)."""
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}.{b64(signature)}"


def bearer(token: str) -> Headers:
    return Headers({"authorization": f"Bearer {token}"})


# --- a JWKS endpoint over real HTTP ----------------------------------------------------------------


@dataclass
class JwksEndpoint:
    """What the fake identity provider serves; the test thread changes it, the server reads it."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    raw: bytes | None = None
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(self, request: Request) -> Response:
        with self.lock:
            self.requests += 1
        if self.raw is not None:
            return Response(self.raw, status_code=self.status, media_type="application/json")
        return Response(
            orjson.dumps({"keys": self.keys}), status_code=self.status, media_type="application/json"
        )

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/jwks.json", self.handle)])


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[tuple[ServerThread, JwksEndpoint]]:
    endpoint = JwksEndpoint()
    server = ServerThread(endpoint.app(), lifespan="off").start()
    yield server, endpoint
    server.stop()


@pytest.fixture
def jwks(jwks_server: tuple[ServerThread, JwksEndpoint], keys: Keys) -> JwksEndpoint:
    """The shared endpoint, reset to serve rsa-1 and ec-1."""
    _, endpoint = jwks_server
    endpoint.keys = [rsa_jwk(keys.rsa_1, "rsa-1"), ec_jwk(keys.ec_1, "ec-1")]
    endpoint.status = 200
    endpoint.raw = None
    endpoint.requests = 0
    return endpoint


@pytest.fixture
def jwks_url(jwks_server: tuple[ServerThread, JwksEndpoint]) -> str:
    return f"{jwks_server[0].url}/jwks.json"


@pytest.fixture
async def http() -> AsyncIterator[HttpTransport]:
    session = Http1Transport(max_connections=20, connect_timeout_seconds=1)
    yield session
    await session.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@dataclass
class Built:
    authenticator: JwtAuthenticator
    jwks_failures: list[str]


MakeAuthenticator = Callable[..., Awaitable[Built]]


@pytest.fixture
async def make_authenticator(
    http: HttpTransport, clock: ManualClock, jwks_url: str
) -> AsyncIterator[MakeAuthenticator]:
    """Builds (and starts) an authenticator from settings; JWKS mode on the shared endpoint by default."""
    built: list[JwtAuthenticator] = []

    async def build(**overrides: Any) -> Built:
        values: dict[str, Any] = {
            "LIVENESS_PROXY_JWT_JWKS_URL": jwks_url,
            "LIVENESS_PROXY_JWT_ISSUER": ISSUER,
            "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
            "LIVENESS_PROXY_JWT_JWKS_CACHE_SECONDS": CACHE_SECONDS,
            "LIVENESS_PROXY_JWT_JWKS_REFETCH_INTERVAL_SECONDS": REFETCH_INTERVAL_SECONDS,
            "LIVENESS_PROXY_JWT_JWKS_TIMEOUT_SECONDS": 1.0,
        }
        values.update(overrides)
        failures: list[str] = []
        authenticator = jwt_authenticator(
            settings_from_mapping(values), http=http, clock=clock.now, on_jwks_failure=failures.append
        )
        assert authenticator is not None
        built.append(authenticator)
        await authenticator.start()
        return Built(authenticator, failures)

    yield build
    for authenticator in built:
        await authenticator.close()


@pytest.fixture
async def authenticator(make_authenticator: MakeAuthenticator, jwks: JwksEndpoint) -> JwtAuthenticator:
    return (await make_authenticator()).authenticator


async def refused(authenticator: JwtAuthenticator, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await authenticator.authenticate(bearer(token))
    return caught.value


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- valid tokens ----------------------------------------------------------------------------------


async def test_valid_rs256_token_gives_subject_scopes_and_kid(
    authenticator: JwtAuthenticator, keys: Keys, jwks: JwksEndpoint
) -> None:
    caller = await authenticator.authenticate(bearer(sign(keys.rsa_1)))
    assert caller is not None
    assert caller.subject == "alice"
    assert caller.scopes == frozenset({"liveness:read", "liveness:write"})
    assert caller.credential_id == "jwt:rsa-1"
    assert jwks.requests == 1


@pytest.mark.parametrize(
    ("scope_claims", "expected"),
    [
        ({"scp": ["liveness:admin", "profile"]}, {"liveness:admin", "profile"}),
        ({"scp": "liveness:admin profile"}, {"liveness:admin", "profile"}),
        ({"scope": "a b", "scp": ["c"]}, {"a", "b", "c"}),
        ({}, set()),
    ],
)
async def test_valid_es256_token_reads_scope_and_scp(
    authenticator: JwtAuthenticator, keys: Keys, scope_claims: dict[str, Any], expected: set[str]
) -> None:
    token = jwt.encode(
        {**claims(drop=("scope",)), **scope_claims}, keys.ec_1, algorithm="ES256", headers={"kid": "ec-1"}
    )
    caller = await authenticator.authenticate(bearer(token))
    assert caller is not None
    assert caller.scopes == frozenset(expected)
    assert caller.credential_id == "jwt:ec-1"


async def test_expiry_within_the_leeway_is_accepted(authenticator: JwtAuthenticator, keys: Keys) -> None:
    assert await authenticator.authenticate(bearer(sign(keys.rsa_1, exp=int(time.time()) - 10))) is not None


async def test_configured_subject_claim_and_any_configured_audience(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    built = await make_authenticator(
        LIVENESS_PROXY_JWT_SUBJECT_CLAIM="email", LIVENESS_PROXY_JWT_AUDIENCE="other,liveness-proxy"
    )
    token = sign(keys.rsa_1, email="alice@example.test", aud=["unrelated", "liveness-proxy"])
    caller = await built.authenticator.authenticate(bearer(token))
    assert caller is not None
    assert caller.subject == "alice@example.test"


async def test_token_without_kid_uses_the_only_key_that_fits_its_algorithm(
    authenticator: JwtAuthenticator, keys: Keys
) -> None:
    caller = await authenticator.authenticate(bearer(sign(keys.rsa_1, kid=None)))
    assert caller is not None
    assert caller.credential_id == "jwt"


async def test_token_without_kid_is_refused_when_several_keys_fit(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    jwks.keys.append(rsa_jwk(keys.rsa_2, "rsa-2"))
    built = await make_authenticator()
    error = await refused(built.authenticator, sign(keys.rsa_1, kid=None))
    assert "several keys" in error.detail


# --- requests that are not ours ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer lpk_0123456789abcdef_" + "s" * 40},
        {"authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"x-api-key": "lpk_0123456789abcdef_" + "s" * 40},
    ],
)
async def test_no_jwt_means_not_ours(authenticator: JwtAuthenticator, headers: dict[str, str]) -> None:
    assert await authenticator.authenticate(Headers(headers)) is None


async def test_jwt_and_api_key_together_are_refused(authenticator: JwtAuthenticator, keys: Keys) -> None:
    headers = Headers({"authorization": f"Bearer {sign(keys.rsa_1)}", "x-api-key": "lpk_x"})
    with pytest.raises(Unauthenticated, match="one credential"):
        await authenticator.authenticate(headers)


async def test_missing_credential_message_names_jwts_when_they_are_accepted(
    authenticator: JwtAuthenticator,
) -> None:
    with pytest.raises(Unauthenticated, match="API key or a JWT"):
        await CallerAuthentication([authenticator]).authenticate(Headers({}))


# --- invalid tokens ---------------------------------------------------------------------------------


def invalid_tokens(keys: Keys) -> dict[str, tuple[str, str]]:
    """Each case: (token, a word the 401 detail must contain)."""
    valid = sign(keys.rsa_1)
    header, payload, signature = valid.split(".")
    public_pem = keys.rsa_1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    hs_input = f"{b64(orjson.dumps(hs_header))}.{b64(orjson.dumps(claims()))}".encode()
    now = int(time.time())
    tampered_payload = b64(orjson.dumps(claims(sub="mallory")))
    return {
        # The canonical unsecured JWT has an empty signature, which the shape check already refuses.
        "alg none": (handmade({"alg": "none", "kid": "rsa-1"}, claims()), "malformed"),
        "alg none with a signature": (handmade({"alg": "none"}, claims(), b"x" * 256), "algorithm"),
        "alg None": (handmade({"alg": "None"}, claims(), b"x"), "algorithm"),
        "alg missing": (handmade({"kid": "rsa-1"}, claims(), b"x" * 256), "algorithm"),
        "HS256 with public key as secret": (
            f"{hs_input.decode()}.{b64(hmac.new(public_pem, hs_input, hashlib.sha256).digest())}",
            "algorithm",
        ),
        "expired": (sign(keys.rsa_1, exp=now - 120), "expired"),
        "not yet valid": (sign(keys.rsa_1, nbf=now + 120), "not valid yet"),
        "issued in the future": (sign(keys.rsa_1, iat=now + 120), "future"),
        "wrong issuer": (sign(keys.rsa_1, iss="https://evil.example.test/"), "issuer"),
        "wrong audience": (sign(keys.rsa_1, aud="someone-else"), "audience"),
        "no audience": (sign(keys.rsa_1, drop=("aud",)), "audience"),
        "missing exp": (sign(keys.rsa_1, drop=("exp",)), "expiry"),
        "exp as string": (sign(keys.rsa_1, exp=str(now + 300)), "expiry"),
        "unknown kid": (sign(keys.rsa_2, kid="rsa-2"), "unknown key"),
        "tampered payload": (f"{header}.{tampered_payload}.{signature}", "signature"),
        "signed by another key": (sign(keys.rsa_2, kid="rsa-1"), "signature"),
        "truncated signature": (valid[:-10], "signature"),
        "two segments": (f"{header}.{payload}", "malformed"),
        "huge": (f"{header}.{'A' * 9000}.{signature}", "too large"),
        "garbage": ("not-a-jwt", "malformed"),
        "base64 junk": (f"{b64(b'junk')}.{b64(b'more junk')}.{b64(b'sig')}", "malformed"),
        "header not an object": (f"{b64(b'[1]')}.{payload}.{signature}", "malformed"),
        "non-base64 characters": (f"{header}.{payload}!.{signature}", "malformed"),
        "RSA key for ES256": (sign(keys.ec_1, alg="ES256", kid="rsa-1"), "does not fit"),
        "EC key for RS256": (sign(keys.rsa_1, alg="RS256", kid="ec-1"), "does not fit"),
        "no subject": (sign(keys.rsa_1, drop=("sub",)), "subject"),
        "subject with a control character": (sign(keys.rsa_1, sub="alice\nadmin"), "subject"),
        "subject too long": (sign(keys.rsa_1, sub="a" * 256), "subject"),
        "subject with a bidi override": (sign(keys.rsa_1, sub="alice\u202eadmin"), "subject"),
        "scope not a string": (sign(keys.rsa_1, scope=["a"]), "scopes"),
        "scope with a quote": (sign(keys.rsa_1, scope='a"b'), "scopes"),
        "crit header": (
            jwt.encode(claims(), keys.rsa_1, algorithm="RS256", headers={"kid": "rsa-1", "crit": ["exp"]}),
            "extension",
        ),
        # The reviewer's token: `exp` of 10^30 was accepted.
        "exp centuries away": (sign(keys.rsa_1, exp=10**30), "lives longer"),
        "exp - iat over the maximum": (sign(keys.rsa_1, iat=now - 86400, exp=now + 60), "lives longer"),
        "no iat, exp - now over the maximum": (
            sign(keys.rsa_1, drop=("iat",), exp=now + 86400 + 120),
            "lives longer",
        ),
    }


INVALID_CASES = [
    "alg none",
    "alg none with a signature",
    "alg None",
    "alg missing",
    "HS256 with public key as secret",
    "expired",
    "not yet valid",
    "issued in the future",
    "wrong issuer",
    "wrong audience",
    "no audience",
    "missing exp",
    "exp as string",
    "unknown kid",
    "tampered payload",
    "signed by another key",
    "truncated signature",
    "two segments",
    "huge",
    "garbage",
    "base64 junk",
    "header not an object",
    "non-base64 characters",
    "RSA key for ES256",
    "EC key for RS256",
    "no subject",
    "subject with a control character",
    "subject too long",
    "subject with a bidi override",
    "scope not a string",
    "scope with a quote",
    "crit header",
    "exp centuries away",
    "exp - iat over the maximum",
    "no iat, exp - now over the maximum",
]


@pytest.mark.parametrize("case", INVALID_CASES)
async def test_invalid_token_is_refused_without_echoing_it(
    authenticator: JwtAuthenticator, keys: Keys, case: str
) -> None:
    token, reason = invalid_tokens(keys)[case]
    error = await refused(authenticator, token)
    assert reason in error.detail
    assert error.headers["WWW-Authenticate"] == 'Bearer realm="liveness-proxy", error="invalid_token"'
    for fragment in (token, *token.split(".")):
        assert not fragment or fragment not in error.detail
    assert "alice" not in error.detail
    assert "mallory" not in error.detail


def test_every_invalid_case_is_tested(keys: Keys) -> None:
    assert sorted(INVALID_CASES) == sorted(invalid_tokens(keys))


async def test_a_token_within_the_maximum_lifetime_is_accepted_and_the_maximum_is_configurable(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    now = int(time.time())
    day_long = sign(keys.rsa_1, iat=now - 60, exp=now - 60 + 86400)
    # As an identity provider whose clock runs 20 s ahead would issue it: within the 30 s leeway.
    no_iat_within_a_day = sign(keys.rsa_1, drop=("iat",), exp=now + 86400 + 20)
    two_days = sign(keys.rsa_1, iat=now, exp=now + 2 * 86400)
    default = (await make_authenticator()).authenticator
    assert await default.authenticate(bearer(day_long)) is not None
    assert await default.authenticate(bearer(no_iat_within_a_day)) is not None
    assert "lives longer" in (await refused(default, two_days)).detail
    raised = (await make_authenticator(LIVENESS_PROXY_JWT_MAX_LIFETIME_SECONDS=2 * 86400)).authenticator
    assert await raised.authenticate(bearer(two_days)) is not None


def test_jwt_callers_need_an_audience_or_the_explicit_choice_of_any(
    http: HttpTransport, jwks_url: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        jwt_authenticator(settings_from_mapping({"LIVENESS_PROXY_JWT_JWKS_URL": jwks_url}), http=http)
    text = str(caught.value)
    assert text.startswith("LIVENESS_PROXY_JWT_AUDIENCE: required")
    assert "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE=true" in text
    both = settings_from_mapping(
        {
            "LIVENESS_PROXY_JWT_JWKS_URL": jwks_url,
            "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
            "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE": "true",
        }
    )
    with pytest.raises(ConfigurationError, match=r"^LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE: .*not both"):
        jwt_authenticator(both, http=http)
    allowed = settings_from_mapping(
        {"LIVENESS_PROXY_JWT_JWKS_URL": jwks_url, "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE": "true"}
    )
    assert jwt_authenticator(allowed, http=http) is not None
    # Without JWT callers, neither setting is needed.
    assert jwt_authenticator(settings_from_mapping({}), http=http) is None


async def test_with_any_audience_allowed_a_token_for_another_audience_is_accepted(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    built = await make_authenticator(
        LIVENESS_PROXY_JWT_AUDIENCE="", LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE=True
    )
    assert await built.authenticator.authenticate(bearer(sign(keys.rsa_1, aud="another-app"))) is not None
    assert await built.authenticator.authenticate(bearer(sign(keys.rsa_1, drop=("aud",)))) is not None


async def test_a_huge_token_is_refused_before_any_key_lookup(
    authenticator: JwtAuthenticator, keys: Keys, jwks: JwksEndpoint, clock: ManualClock
) -> None:
    clock.advance(REFETCH_INTERVAL_SECONDS + 1)  # a refetch would be allowed: make sure none happens
    huge = "eyJ" + "A" * 9000 + ".e30.c2ln"
    assert "too large" in (await refused(authenticator, huge)).detail
    assert jwks.requests == 1


async def test_jwks_key_alg_must_equal_token_alg(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    # The JWK says RS256; the same RSA key must not verify PS256, although PS256 is allowed.
    built = await make_authenticator(LIVENESS_PROXY_JWT_ALGORITHMS="RS256,PS256")
    assert "does not fit" in (await refused(built.authenticator, sign(keys.rsa_1, alg="PS256"))).detail
    jwks.keys = [{key: value for key, value in rsa_jwk(keys.rsa_1, "rsa-1").items() if key != "alg"}]
    unlabelled = await make_authenticator(LIVENESS_PROXY_JWT_ALGORITHMS="RS256,PS256")
    assert await unlabelled.authenticator.authenticate(bearer(sign(keys.rsa_1, alg="PS256"))) is not None


async def test_an_oct_key_in_the_jwks_is_never_used(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys
) -> None:
    secret = b"shared-secret-" + b"x" * 32
    jwks.keys = [
        {"kty": "oct", "kid": "shared", "k": b64(secret), "alg": "HS256", "use": "sig"},
        {"kty": "oct", "kid": "shared-rs", "k": b64(secret), "alg": "RS256"},
        rsa_jwk(keys.rsa_1, "rsa-1"),
    ]
    built = await make_authenticator()
    hs_token = jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "shared"})
    assert "algorithm" in (await refused(built.authenticator, hs_token)).detail
    rs_token = sign(keys.rsa_1, kid="shared-rs")
    assert "unknown key" in (await refused(built.authenticator, rs_token)).detail


def test_jwks_entries_that_cannot_verify_safely_are_skipped(keys: Keys) -> None:
    private = jwt.algorithms.RSAAlgorithm.to_jwk(keys.rsa_1, as_dict=True)
    p384 = jwt.algorithms.ECAlgorithm.to_jwk(
        ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True
    )
    entries: list[Any] = [
        rsa_jwk(keys.rsa_1, "good"),
        rsa_jwk(keys.rsa_1, "encryption", use="enc"),
        rsa_jwk(keys.rsa_1, "encrypt-only", key_ops=["encrypt"]),
        {**private, "kid": "private"},
        rsa_jwk(keys.weak_rsa, "short"),
        ec_jwk(keys.ec_1, "ec-labelled-rsa", alg="RS256"),
        {**p384, "kid": "p384-labelled-es256", "alg": "ES256"},
        {**p384, "kid": "p384-not-allowed"},
        {"kty": "oct", "kid": "oct", "k": b64(b"k" * 32)},
        {"kty": "XYZ", "kid": "unknown-kty"},
        {**rsa_jwk(keys.rsa_1, "x"), "kid": 7},
        {**rsa_jwk(keys.rsa_1, "bad-modulus"), "n": "!!!"},
        {**rsa_jwk(keys.rsa_1, "alg-as-list"), "alg": ["RS256"]},
        {"kty": "OKP", "kid": "crv-as-list", "crv": ["Ed25519"], "x": "AA"},
        {"kty": "EC", "kid": "crv-as-object", "crv": {"name": "P-256"}},
        "not an object",
    ]
    key_set = parse_jwks(orjson.dumps({"keys": entries}), ["RS256", "ES256"])
    assert key_set.kids == frozenset({"good"})


@pytest.mark.parametrize(
    "body", [b"not json", b"[]", b'{"keys": {}}', b'{"nokeys": []}', orjson.dumps({"keys": [{}] * 101})]
)
def test_a_document_that_is_not_a_jwks_is_an_error(body: bytes) -> None:
    with pytest.raises(Exception, match="JWKS"):
        parse_jwks(body, ["RS256"])


# --- the JWKS cache ---------------------------------------------------------------------------------


async def test_unknown_kid_refetches_once_per_interval_and_finds_a_rotated_key(
    authenticator: JwtAuthenticator, keys: Keys, jwks: JwksEndpoint, clock: ManualClock
) -> None:
    rotated = sign(keys.rsa_2, kid="rsa-2")
    await refused(authenticator, rotated)
    assert jwks.requests == 1  # the start-up fetch was less than an interval ago: no refetch yet
    clock.advance(REFETCH_INTERVAL_SECONDS)
    results = await asyncio.gather(
        *(authenticator.authenticate(bearer(rotated)) for _ in range(25)), return_exceptions=True
    )
    assert all(isinstance(result, Unauthenticated) for result in results)
    assert jwks.requests == 2  # 25 concurrent unknown-kid requests shared one fetch
    for _ in range(25):
        await refused(authenticator, rotated)
    assert jwks.requests == 2  # and the interval holds further ones back

    jwks.keys.append(rsa_jwk(keys.rsa_2, "rsa-2"))
    clock.advance(REFETCH_INTERVAL_SECONDS - 1)
    await refused(authenticator, rotated)
    assert jwks.requests == 2
    clock.advance(2)
    caller = await authenticator.authenticate(bearer(rotated))
    assert caller is not None
    assert caller.credential_id == "jwt:rsa-2"
    assert jwks.requests == 3


async def test_stale_keys_answer_at_once_while_a_background_refresh_replaces_them(
    authenticator: JwtAuthenticator, keys: Keys, jwks: JwksEndpoint, clock: ManualClock
) -> None:
    old = sign(keys.rsa_1)
    jwks.keys = [rsa_jwk(keys.rsa_2, "rsa-2")]  # rsa-1 withdrawn
    clock.advance(CACHE_SECONDS + 1)
    assert await authenticator.authenticate(bearer(old)) is not None  # stale keys, no waiting

    async def old_key_withdrawn() -> bool:
        try:
            await authenticator.authenticate(bearer(old))
        except Unauthenticated:
            return True
        return False

    await eventually(old_key_withdrawn)
    assert jwks.requests == 2
    assert await authenticator.authenticate(bearer(sign(keys.rsa_2, kid="rsa-2"))) is not None
    assert jwks.requests == 2


@pytest.mark.parametrize(
    ("status", "raw"),
    [(500, None), (200, b"<html>oops</html>"), (200, b'{"keys": "nope"}'), (200, b"x" * (300 * 1024))],
)
async def test_broken_jwks_answers_keep_the_last_good_keys(
    make_authenticator: MakeAuthenticator,
    jwks: JwksEndpoint,
    keys: Keys,
    clock: ManualClock,
    status: int,
    raw: bytes | None,
) -> None:
    built = await make_authenticator()
    jwks.status, jwks.raw = status, raw
    clock.advance(CACHE_SECONDS + 1)
    token = sign(keys.rsa_1)
    assert await built.authenticator.authenticate(bearer(token)) is not None

    async def refresh_failed() -> bool:
        return len(built.jwks_failures) == 1

    await eventually(refresh_failed)
    assert "JWKS" in built.jwks_failures[0]
    assert "oops" not in built.jwks_failures[0]
    assert await built.authenticator.authenticate(bearer(token)) is not None


async def test_jwks_host_down_after_the_first_fetch_keeps_stale_keys(
    http: HttpTransport, clock: ManualClock, keys: Keys
) -> None:
    endpoint = JwksEndpoint(keys=[rsa_jwk(keys.rsa_1, "rsa-1")])
    server = ServerThread(endpoint.app(), lifespan="off").start()
    failures: list[str] = []
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_JWT_JWKS_URL": f"{server.url}/jwks.json",
            "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
            "LIVENESS_PROXY_JWT_JWKS_CACHE_SECONDS": CACHE_SECONDS,
            "LIVENESS_PROXY_JWT_JWKS_TIMEOUT_SECONDS": 1.0,
        }
    )
    authenticator = jwt_authenticator(settings, http=http, clock=clock.now, on_jwks_failure=failures.append)
    assert authenticator is not None
    try:
        await authenticator.start()
        server.stop()
        clock.advance(CACHE_SECONDS + 1)
        token = sign(keys.rsa_1)
        assert await authenticator.authenticate(bearer(token)) is not None

        async def refresh_failed() -> bool:
            return bool(failures)

        await eventually(refresh_failed)
        assert await authenticator.authenticate(bearer(token)) is not None
        assert endpoint.requests == 1
    finally:
        await authenticator.close()


async def test_without_any_keys_callers_get_503_at_once_until_the_interval_allows_a_retry(
    make_authenticator: MakeAuthenticator, jwks: JwksEndpoint, keys: Keys, clock: ManualClock
) -> None:
    jwks.status = 503
    built = await make_authenticator()
    token = sign(keys.rsa_1)
    for _ in range(5):
        with pytest.raises(ServiceUnavailable) as caught:
            await built.authenticator.authenticate(bearer(token))
        assert caught.value.headers["Retry-After"] == str(int(REFETCH_INTERVAL_SECONDS))
    assert jwks.requests == 1  # the start-up fetch only: callers do not queue on a failing host
    jwks.status = 200
    clock.advance(REFETCH_INTERVAL_SECONDS)
    assert await built.authenticator.authenticate(bearer(token)) is not None
    assert jwks.requests == 2


async def test_start_never_raises_when_the_jwks_host_is_down(
    make_authenticator: MakeAuthenticator, keys: Keys
) -> None:
    built = await make_authenticator(LIVENESS_PROXY_JWT_JWKS_URL="http://127.0.0.1:9/jwks.json")
    assert built.jwks_failures
    with pytest.raises(ServiceUnavailable):
        await built.authenticator.authenticate(bearer(sign(keys.rsa_1)))


# --- public key file mode and configuration ------------------------------------------------------


def write_public_pem(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def write_certificate(path: Path, key: rsa.RSAPrivateKey) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("form", ["public key", "certificate"])
async def test_public_key_file_mode(
    make_authenticator: MakeAuthenticator, keys: Keys, tmp_path: Path, form: str
) -> None:
    path = tmp_path / "idp.pem"
    if form == "public key":
        write_public_pem(path, keys.rsa_1)
    else:
        write_certificate(path, keys.rsa_1)
    built = await make_authenticator(LIVENESS_PROXY_JWT_JWKS_URL="", LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE=path)
    # One configured key: the token's kid does not select anything.
    caller = await built.authenticator.authenticate(bearer(sign(keys.rsa_1, kid="whatever")))
    assert caller is not None
    assert caller.credential_id == "jwt:whatever"
    assert "signature" in (await refused(built.authenticator, sign(keys.rsa_2))).detail
    assert "does not fit" in (await refused(built.authenticator, sign(keys.ec_1, alg="ES256"))).detail


def test_no_jwt_settings_means_no_authenticator(http: HttpTransport) -> None:
    assert jwt_authenticator(settings_from_mapping({}), http=http) is None


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "algorithms", "message"),
    [
        (None, "RS256", "cannot read the file"),
        ("private", "RS256", "private key"),
        ("garbage", "RS256", "not a PEM public key"),
        ("short rsa", "RS256", "fewer than 2048 bits"),
        ("ec", "RS256", "cannot verify any of LIVENESS_PROXY_JWT_ALGORITHMS"),
    ],
)
def test_unusable_public_key_file_is_a_configuration_error(
    http: HttpTransport,
    keys: Keys,
    tmp_path: Path,
    content: str | None,
    algorithms: str,
    message: str,
) -> None:
    path = tmp_path / "key.pem"
    if content == "private":
        path.write_bytes(_private_pem(keys.rsa_1))
    elif content == "garbage":
        path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    elif content == "short rsa":
        write_public_pem(path, keys.weak_rsa)
    elif content == "ec":
        write_public_pem(path, keys.ec_1)
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE": path,
            "LIVENESS_PROXY_JWT_ALGORITHMS": algorithms,
            "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
        }
    )
    with pytest.raises(ConfigurationError) as caught:
        jwt_authenticator(settings, http=http)
    text = str(caught.value)
    assert text.startswith("LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE: ")
    assert message in text
    assert "BEGIN" not in text
    assert "\n" not in text


def test_jwks_url_and_key_file_together_are_a_configuration_error(
    http: HttpTransport, keys: Keys, tmp_path: Path
) -> None:
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_JWT_JWKS_URL": "https://idp.example.test/jwks.json",
            "LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE": write_public_pem(tmp_path / "k.pem", keys.rsa_1),
        }
    )
    with pytest.raises(ConfigurationError, match=r"^LIVENESS_PROXY_JWT_JWKS_URL: .*not both"):
        jwt_authenticator(settings, http=http)


# --- rejection cost ---------------------------------------------------------------------------------


class InProcessJwks:
    """A JWKS fetcher without the network, so the timing below measures verification only."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = orjson.dumps(document)

    async def fetch(self) -> bytes:
        return self.document


async def _median_seconds(authenticator: JwtAuthenticator, token: str, rounds: int = 50) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        with contextlib.suppress(Unauthenticated):
            await authenticator.verify(token)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


async def test_no_invalid_token_costs_more_to_refuse_than_a_valid_one_costs_to_accept(keys: Keys) -> None:
    """A security property, not a performance test: whoever can reach the proxy can send forged
    tokens without limit, so refusing one must never cost more than accepting a genuine one. If a
    rejection path fetched keys from the network, tried every key, decoded an oversized token or
    waited on something, forged tokens would be an amplifier (each one buying more of our CPU, our
    identity provider's capacity or our connection slots than a real caller gets). Medians of 50
    in-process runs are compared with a fixed margin, so the test does not depend on how fast the
    machine is; absolute speed is not asserted.
    """
    clock = ManualClock()
    cache = JwksCache(
        InProcessJwks({"keys": [rsa_jwk(keys.rsa_1, "rsa-1"), ec_jwk(keys.ec_1, "ec-1")]}),
        allowed_algorithms=["RS256", "ES256"],
        cache_seconds=CACHE_SECONDS,
        refetch_interval_seconds=REFETCH_INTERVAL_SECONDS,
        clock=clock.now,
    )
    policy = JwtPolicy(
        algorithms=frozenset({"RS256", "ES256"}),
        issuer=ISSUER,
        audiences=frozenset({AUDIENCE}),
        subject_claim="sub",
        leeway_seconds=30,
        max_token_bytes=8192,
    )
    authenticator = JwtAuthenticator(policy, cache)
    await authenticator.start()
    try:
        valid = sign(keys.rsa_1)
        await _median_seconds(authenticator, valid, rounds=10)  # warm-up
        accepted = await _median_seconds(authenticator, valid)
        bound = accepted + 0.005
        for case, (token, _) in invalid_tokens(keys).items():
            refused_in = await _median_seconds(authenticator, token)
            assert refused_in <= bound, f"{case}: {refused_in * 1e3:.2f} ms > {bound * 1e3:.2f} ms"
    finally:
        await authenticator.close()
