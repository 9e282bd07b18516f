"""Property-based tests (Hypothesis) of JWT parsing: which tokens and Authorization headers the
authenticator accepts, refuses or ignores, with static keys (split from the former test_properties.py).

The settings (derandomized, no example database) and the strategies the property tests share are
in properties.py, which says why."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

import hypothesis
import jwt
import jwt.algorithms
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import strategies as st
from starlette.datastructures import Headers

from liveness_proxy.auth import JwtAuthenticator, JwtPolicy, StaticKeySource
from liveness_proxy.auth.caller import Caller
from liveness_proxy.auth.jwks import parse_jwks
from liveness_proxy.errors import (
    Unauthenticated,
)
from properties import PROPERTIES, json_values, unicode_text, weighted

JWT_ISSUER = "https://idp.properties.test/"
JWT_AUDIENCE = "liveness-proxy"
JWT_ALGORITHMS = frozenset({"ES256", "EdDSA"})


# --- 3. JWT parsing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JwtRig:
    authenticator: JwtAuthenticator
    ec_key: ec.EllipticCurvePrivateKey
    ed_key: ed25519.Ed25519PrivateKey
    public_jwks: bytes


@pytest.fixture(scope="module")
def jwt_rig() -> JwtRig:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    ed_jwk = jwt.algorithms.OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True)
    jwks = orjson.dumps(
        {"keys": [{**ec_jwk, "kid": "ec-1", "alg": "ES256"}, {**ed_jwk, "kid": "ed-1", "alg": "EdDSA"}]}
    )
    policy = JwtPolicy(
        algorithms=JWT_ALGORITHMS,
        issuer=JWT_ISSUER,
        audiences=frozenset({JWT_AUDIENCE}),
        subject_claim="sub",
        leeway_seconds=30,
        max_token_bytes=8192,
    )
    authenticator = JwtAuthenticator(policy, StaticKeySource(parse_jwks(jwks, JWT_ALGORITHMS)))
    return JwtRig(authenticator, ec_key, ed_key, jwks)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _valid_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "iat": now, "exp": now + 600}


def _verify(rig: JwtRig, token: str) -> Caller:
    return asyncio.run(rig.authenticator.verify(token))


@dataclass(frozen=True)
class TokenRecipe:
    header: Any
    claims: Any
    signer: str  # "ec", "ed", "hmac-public-jwks", "random", "none"
    signature_noise: bytes

    def token(self, rig: JwtRig) -> str:
        signing_input = f"{_b64url(orjson.dumps(self.header))}.{_b64url(orjson.dumps(self.claims))}"
        data = signing_input.encode()
        if self.signer == "ec":
            signature = jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256).sign(data, rig.ec_key)
        elif self.signer == "ed":
            signature = rig.ed_key.sign(data)
        elif self.signer == "hmac-public-jwks":
            # The classic confusion: the public key material used as an HMAC secret.
            signature = hmac.new(rig.public_jwks, data, hashlib.sha256).digest()
        elif self.signer == "random":
            signature = self.signature_noise
        else:
            signature = b""
        return f"{signing_input}.{_b64url(signature)}"


def _jwt_headers() -> st.SearchStrategy[Any]:
    # Mostly an accepted algorithm and a known kid, so signatures, keys and claims are reached too.
    accepted = st.sampled_from(sorted(JWT_ALGORITHMS))
    refused = st.one_of(
        st.sampled_from(["none", "None", "NONE", "nOnE", "HS256", "HS384", "HS512", "hs256", "RS256"]),
        st.sampled_from(["ES512", "PS256", "ES256 ", "es256", "", "ES256\x00"]),
        unicode_text(max_size=10),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.lists(st.just("ES256"), max_size=2),
        st.none(),
    )
    odd = st.one_of(
        unicode_text(max_size=300), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.none()
    )
    members = st.fixed_dictionaries(
        {"alg": weighted((3, accepted), (2, refused))},
        optional={
            "kid": st.one_of(st.sampled_from(["ec-1", "ed-1"]), st.sampled_from(["rsa-1", ""]), odd),
            "typ": st.one_of(st.sampled_from(["JWT", "at+jwt", "JOSE"]), unicode_text(max_size=10)),
            "crit": st.lists(unicode_text(max_size=5), max_size=2),
            "b64": st.booleans(),
            "jku": st.just("https://attacker.example/jwks.json"),
            "jwk": st.just({"kty": "oct", "k": "c2VjcmV0"}),
            "x5u": st.just("https://attacker.example/cert.pem"),
        },
    )
    without_alg = members.map(lambda header: {name: value for name, value in header.items() if name != "alg"})
    return weighted((6, members), (1, without_alg), (1, json_values()))


def _claims() -> st.SearchStrategy[Any]:
    valid = st.just(None).map(lambda _: _valid_claims())
    changed = st.builds(
        lambda claims, changes: {**claims, **changes},
        valid,
        st.dictionaries(
            st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "scope", "scp"]),
            json_values(),
            max_size=3,
        ),
    )
    return weighted((2, valid), (2, changed), (1, json_values()))


@PROPERTIES
@hypothesis.given(
    recipe=st.builds(
        TokenRecipe,
        header=_jwt_headers(),
        claims=_claims(),
        # Mostly real signatures by the trusted keys, so the checks after the signature are reached.
        signer=st.sampled_from(["ec", "ed", "ec", "ed", "hmac-public-jwks", "random", "none"]),
        signature_noise=st.binary(max_size=80),
    )
)
def test_a_jwt_is_accepted_only_when_signed_by_a_trusted_key_with_an_asymmetric_algorithm(
    jwt_rig: JwtRig, recipe: TokenRecipe
) -> None:
    token = recipe.token(jwt_rig)
    outcome: Caller | Unauthenticated
    try:
        outcome = _verify(jwt_rig, token)
    except Unauthenticated as refusal:
        outcome = refusal
    hypothesis.event(outcome.detail if isinstance(outcome, Unauthenticated) else "accepted")
    if isinstance(outcome, Unauthenticated):
        assert outcome.status == 401
        assert outcome.headers["WWW-Authenticate"].startswith("Bearer ")
        return
    header = recipe.header
    assert isinstance(header, dict)
    assert header.get("alg") in JWT_ALGORITHMS
    assert recipe.signer == {"ES256": "ec", "EdDSA": "ed"}[header["alg"]]
    assert "crit" not in header
    assert "b64" not in header
    assert outcome.subject == recipe.claims["sub"]


@PROPERTIES
@hypothesis.given(
    alg=st.sampled_from(["ES256", "EdDSA"]),
    with_kid=st.booleans(),
    extra=st.fixed_dictionaries(
        {},
        optional={
            "typ": st.sampled_from(["JWT", "at+jwt"]),
            "jku": st.just("https://attacker.example/jwks.json"),
            "x5u": st.just("https://attacker.example/cert.pem"),
            "cty": st.just("JWT"),
        },
    ),
)
def test_a_validly_signed_jwt_is_accepted_whatever_else_its_header_says(
    jwt_rig: JwtRig, alg: str, with_kid: bool, extra: dict[str, str]
) -> None:
    """The counterpart of the refusals above: they must not hold only because everything fails."""
    kid = {"ES256": "ec-1", "EdDSA": "ed-1"}[alg] if with_kid else None
    header = {"alg": alg, **extra, **({"kid": kid} if kid else {})}
    token = TokenRecipe(header, _valid_claims(), "ec" if alg == "ES256" else "ed", b"").token(jwt_rig)
    caller = _verify(jwt_rig, token)
    assert caller.subject == "alice"
    assert caller.credential_id == (f"jwt:{kid}" if kid else "jwt")


@PROPERTIES
@hypothesis.given(
    token=st.one_of(
        st.text(max_size=300),
        st.from_regex(re.compile(r"[A-Za-z0-9_=+/-]{0,40}(\.[A-Za-z0-9_=+/-]{0,40}){0,4}"), fullmatch=True),
        st.lists(st.binary(max_size=60).map(_b64url), min_size=1, max_size=5).map(".".join),
        st.from_regex(
            re.compile(r"eyJ[A-Za-z0-9_-]{0,60}\.eyJ[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}"), fullmatch=True
        ),
    )
)
def test_any_other_string_is_refused_as_unauthenticated(jwt_rig: JwtRig, token: str) -> None:
    with pytest.raises(Unauthenticated):
        _verify(jwt_rig, token)


@PROPERTIES
@hypothesis.given(
    authorization=st.one_of(
        st.text(alphabet=st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=120),
        st.text(max_size=80).map(lambda credential: f"Bearer {credential}"),
    ),
    api_key=st.one_of(st.none(), st.text(alphabet=st.characters(max_codepoint=255), max_size=40)),
)
def test_an_authorization_header_is_ignored_or_refused_never_an_error(
    jwt_rig: JwtRig, authorization: str, api_key: str | None
) -> None:
    values = {"authorization": authorization.encode("utf-8").decode("latin-1")}
    if api_key is not None:
        values["x-api-key"] = api_key
    try:
        caller = asyncio.run(jwt_rig.authenticator.authenticate(Headers(values)))
    except Unauthenticated:
        return
    assert caller is None
