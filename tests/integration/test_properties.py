"""Property-based tests (Hypothesis) of the proxy's parsers and renderers of untrusted input: the
session-id validator, the interpretation of upstream answers (over real HTTP, from a loopback
upstream that answers whatever a test scripts), the Retry-After / expires_in / error-code helpers,
JWT parsing, and the problem renderer.

Every test runs with `derandomize=True` and no example database: CI checks the same examples on
every run and machine, so a failure is reproducible from the test name alone. The cost is that
runs do not explore new inputs over time; the example counts are set for the whole file to take
a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import posixpath
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import jwt
import jwt.algorithms
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import strategies as st
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from liveness_proxy import errors
from liveness_proxy.auth import JwtAuthenticator, JwtPolicy, StaticKeySource
from liveness_proxy.auth.caller import Caller
from liveness_proxy.auth.jwks import parse_jwks
from liveness_proxy.errors import (
    ProblemError,
    RateLimited,
    Unauthenticated,
    UpstreamError,
    UpstreamMalformed,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    render_problem,
)
from liveness_proxy.openapi import SESSION_ID_PATTERN as DOCUMENTED_SESSION_ID_PATTERN
from liveness_proxy.openapi import build_openapi
from liveness_proxy.routes import SESSION_ID_PATTERN, encode_upstream, session_id_from
from liveness_proxy.upstream import CynopsisClient, CynopsisEndpoints, Http1Pool, TokenManager, UpstreamResult
from liveness_proxy.upstream.tokens import ClientCredentialsFetcher
from liveness_proxy.upstream.transport import (
    MAX_RETRY_AFTER_SECONDS,
    create_http_session,
    parse_retry_after,
    parse_seconds,
    upstream_error_code,
)
from support import ServerThread

PROPERTIES = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

SESSION_ID_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_RESPONSE_BYTES = 4096
RESULT_PREFIX = "/api/v2/liveness_result/"
RESULT_SUFFIX = "/details"
# Marks upstream text: it must never reach a problem detail (only a validated short error code may).
UPSTREAM_TEXT_MARKER = "Zq7-upstream-text"
JWT_ISSUER = "https://idp.properties.test/"
JWT_AUDIENCE = "liveness-proxy"
JWT_ALGORITHMS = frozenset({"ES256", "EdDSA"})


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn about in proportion to its weight (st.one_of would merge
    repeated strategies, so repeating one does not weigh it)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(pool))).flatmap(lambda index: pool[index])


def _unicode_text(**kwargs: Any) -> st.SearchStrategy[str]:
    """Any text a Python str can hold and UTF-8 can encode (no lone surrogates)."""
    return st.text(alphabet=st.characters(exclude_categories=["Cs"]), **kwargs)


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        _unicode_text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(_unicode_text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )


def _json_objects() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_unicode_text(max_size=8), _json_values(), max_size=5)


def _nested(depth: int) -> bytes:
    """A JSON object holding arrays nested `depth` levels deep."""
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


# --- 1. The session-id validator ----------------------------------------------------------------


def _documented_session_id(candidate: str) -> bool:
    """The README's rule, written without a regular expression."""
    return 1 <= len(candidate) <= 128 and set(candidate) <= SESSION_ID_ALPHABET


def _session_id_candidates() -> st.SearchStrategy[str]:
    valid_character = st.sampled_from(sorted(SESSION_ID_ALPHABET))
    near_misses = st.builds(
        lambda prefix, odd, suffix: prefix + odd + suffix,
        st.text(valid_character, max_size=64),
        st.sampled_from(
            ["/", ".", "..", "%2F", "%", "?", "#", " ", "\n", "\x00", "\\", "é", "٣", "\uff21", "\u200b"]
        ),
        st.text(valid_character, max_size=64),
    )
    return st.one_of(
        st.text(valid_character, min_size=0, max_size=130),
        near_misses,
        _unicode_text(max_size=140),
    )


@PROPERTIES
@hypothesis.given(candidate=_session_id_candidates())
def test_a_session_id_is_accepted_exactly_when_it_is_1_to_128_of_the_documented_characters(
    candidate: str,
) -> None:
    expected = _documented_session_id(candidate)
    assert (SESSION_ID_PATTERN.fullmatch(candidate) is not None) is expected
    # The same rule guards ids the upstream hands out (create-session answers).
    if expected:
        assert session_id_from({"session_id": candidate}, ["session_id"], 201) == candidate
    else:
        with pytest.raises(UpstreamMalformed):
            session_id_from({"session_id": candidate}, ["session_id"], 201)
    # The OpenAPI pattern says the same (JSON Schema's `$` is the end of the text, Python's `\Z`).
    documented = re.compile(DOCUMENTED_SESSION_ID_PATTERN.removesuffix("$") + r"\Z")
    assert (documented.search(candidate) is not None) is expected


def test_the_served_document_uses_the_session_id_pattern_on_both_session_routes() -> None:
    paths = build_openapi()["paths"]
    for path in ("/v1/liveness/sessions/{session_id}/result", "/v1/liveness/sessions/{session_id}"):
        (parameter,) = paths[path]["get"]["parameters"]
        assert parameter["schema"]["pattern"] == DOCUMENTED_SESSION_ID_PATTERN


# --- a loopback upstream that answers what the test scripts -------------------------------------


@dataclass
class ScriptedAnswer:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"application/json")]
    )
    body: bytes = b"{}"


@dataclass
class ScriptedUpstream:
    """Answers the token endpoint as Cynopsis would, and every other request with `answer`;
    records every request target as it arrived (still percent-encoded)."""

    answer: ScriptedAnswer = field(default_factory=ScriptedAnswer)
    targets: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        more_body = True
        while more_body:
            message = await receive()
            more_body = message.get("more_body", False)
        if scope["path"] == "/oauth/token":
            token = orjson.dumps(
                {"access_token": f"at-{uuid.uuid4().hex}", "token_type": "Bearer", "expires_in": 3600}
            )
            answer = ScriptedAnswer(body=token)
        else:
            self.targets.append(scope["raw_path"].decode("latin-1"))
            answer = self.answer
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})


@dataclass
class UpstreamRig:
    """A real CynopsisClient (Http1Pool, TokenManager) talking to a ScriptedUpstream over loopback;
    `run` drives its coroutines on the rig's one event loop."""

    upstream: ScriptedUpstream
    client: CynopsisClient
    runner: asyncio.Runner

    def result(self, session_id: str) -> UpstreamResult:
        return self.runner.run(self.client.get_result(session_id, "req-properties"))

    def create_session(self) -> UpstreamResult:
        return self.runner.run(self.client.create_session(b'{"session_token":"sst_x"}', "req-properties"))


@asynccontextmanager
async def _cynopsis_client(base_url: str) -> AsyncIterator[CynopsisClient]:
    http = create_http_session(max_connections=4, connect_timeout_seconds=5, total_timeout_seconds=5)
    tokens = TokenManager(
        ClientCredentialsFetcher(
            http,
            token_url=f"{base_url}/oauth/token",
            client_id="properties",
            client_secret=lambda: "properties-secret",
            default_lifetime_seconds=3600,
            max_lifetime_seconds=86400,
            timeout_seconds=5,
        ),
        refresh_margin=lambda lifetime: lifetime / 10,
        failure_backoff_seconds=1,
    )
    endpoints = CynopsisEndpoints(
        api_base_url=f"{base_url}/api",
        session_token_path="/v2/get_session_token",
        session_path="/v2/liveness_session",
        result_path="/v2/liveness_result/{session_id}" + RESULT_SUFFIX,
    )
    pool = Http1Pool(endpoints.origin, max_connections=4, connect_timeout_seconds=5)
    try:
        yield CynopsisClient(
            pool,
            tokens,
            endpoints=endpoints,
            domain_id="properties-domain",
            max_response_bytes=MAX_RESPONSE_BYTES,
            timeout_seconds=5,
        )
    finally:
        await tokens.close()
        await pool.close()
        await http.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[UpstreamRig]:
    upstream = ScriptedUpstream()
    server = ServerThread(upstream, lifespan="off").start()
    try:
        with asyncio.Runner() as runner:
            context = _cynopsis_client(server.url)
            client = runner.run(context.__aenter__())
            try:
                yield UpstreamRig(upstream, client, runner)
            finally:
                runner.run(context.__aexit__(None, None, None))
    finally:
        server.stop()


@PROPERTIES
@hypothesis.given(session_id=st.text(st.sampled_from(sorted(SESSION_ID_ALPHABET)), min_size=1, max_size=128))
def test_an_accepted_session_id_never_leaves_the_configured_result_path(
    rig: UpstreamRig, session_id: str
) -> None:
    assert SESSION_ID_PATTERN.fullmatch(session_id)
    rig.upstream.answer = ScriptedAnswer(body=orjson.dumps({"session_id": session_id, "status": "CREATED"}))
    result = rig.result(session_id)
    assert result.payload["session_id"] == session_id
    sent = rig.upstream.targets[-1]
    # Exactly the configured path with the id in its place: not encoded, no query, no dot segment.
    assert sent == RESULT_PREFIX + session_id + RESULT_SUFFIX
    assert posixpath.normpath(sent) == sent


# --- 2. Upstream answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamScript:
    status: int
    content_type: str | None
    body: bytes
    retry_after: str | None
    content_encoding: str | None
    chunked: bool
    close: bool

    def answer(self) -> ScriptedAnswer:
        headers: list[tuple[bytes, bytes]] = []
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        if self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode("latin-1")))
        if self.content_encoding is not None:
            headers.append((b"content-encoding", self.content_encoding.encode("latin-1")))
        if not self.chunked:
            headers.append((b"content-length", str(len(self.body)).encode()))
        if self.close:
            headers.append((b"connection", b"close"))
        return ScriptedAnswer(self.status, headers, self.body)


def _header_value(max_size: int) -> st.SearchStrategy[str]:
    return st.from_regex(
        re.compile(rf"[\x21-\x7e](?:[\x20-\x7e]{{0,{max_size}}}[\x21-\x7e])?"), fullmatch=True
    )


def _upstream_bodies() -> st.SearchStrategy[bytes]:
    return _weighted(
        (3, _json_objects().map(orjson.dumps)),
        (1, st.binary(max_size=300)),
        (1, _json_values().map(orjson.dumps)),
        (
            2,
            st.builds(
                lambda code, text: orjson.dumps({"error": code, "message": text}),
                st.one_of(
                    st.from_regex(ERROR_CODE, fullmatch=True),
                    _unicode_text(max_size=70),
                    st.integers(min_value=-(2**63), max_value=2**63 - 1),
                ),
                st.just(UPSTREAM_TEXT_MARKER),
            ),
        ),
        (1, st.integers(min_value=1000, max_value=1100).map(_nested)),
        (
            1,
            st.integers(min_value=MAX_RESPONSE_BYTES - 16, max_value=MAX_RESPONSE_BYTES + 64).map(
                lambda size: (b'{"pad":"' + b"x" * size + b'"}')[:size]
            ),
        ),
    )


def _retry_after_headers() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.integers(min_value=-5, max_value=10**12).map(str),
        st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "soon"]),
        _header_value(40),
    )


def _upstream_scripts() -> st.SearchStrategy[UpstreamScript]:
    # What a working upstream sends: JSON, a status the client tells apart, no encoding.
    plausible = st.builds(
        UpstreamScript,
        status=st.sampled_from([200, 201, 200, 429, 404, 400, 409, 410, 401, 403, 500, 503]),
        content_type=st.sampled_from(["application/json", "application/json; charset=utf-8"]),
        body=_upstream_bodies(),
        retry_after=_retry_after_headers(),
        content_encoding=st.none(),
        chunked=st.booleans(),
        close=st.booleans(),
    )
    anything = st.builds(
        UpstreamScript,
        status=st.integers(min_value=200, max_value=599),
        content_type=st.one_of(
            st.sampled_from(["APPLICATION/JSON", "application/problem+json", "text/html", "text/plain"]),
            st.none(),
            _header_value(40),
        ),
        body=_upstream_bodies(),
        retry_after=_retry_after_headers(),
        content_encoding=st.sampled_from([None, "identity", "gzip", "br", "x-unknown"]),
        chunked=st.booleans(),
        close=st.booleans(),
    )
    return _weighted((3, plausible), (1, anything))


def _expected_problem(script: UpstreamScript, *, is_result: bool) -> type[UpstreamError] | None:
    """What the module docstring of upstream/client.py promises for this answer (None: a result)."""
    status = script.status
    if script.content_encoding not in (None, "identity") or len(script.body) > MAX_RESPONSE_BYTES:
        return UpstreamMalformed
    if 200 <= status < 300:
        try:
            payload = orjson.loads(script.body)
        except orjson.JSONDecodeError:
            return UpstreamMalformed
        json_type = "json" in (script.content_type or "").lower()
        return None if json_type and isinstance(payload, dict) else UpstreamMalformed
    if status == 429:
        return UpstreamRateLimited
    if status in (401, 403):
        return UpstreamUnavailable
    if status == 404:
        return UpstreamNotFound if is_result else UpstreamUnavailable
    if 400 <= status < 500:
        return UpstreamRejected
    return UpstreamUnavailable


def _no_body_allowed(status: int) -> bool:
    return status in (204, 304)


@PROPERTIES
@hypothesis.given(script=_upstream_scripts(), is_result=st.booleans())
def test_any_upstream_answer_is_a_json_object_or_a_documented_upstream_error(
    rig: UpstreamRig, script: UpstreamScript, is_result: bool
) -> None:
    if _no_body_allowed(script.status):
        script = UpstreamScript(**{**script.__dict__, "body": b""})
    rig.upstream.answer = script.answer()
    expected = _expected_problem(script, is_result=is_result)
    hypothesis.event(f"expected {'a result' if expected is None else expected.__name__}")
    outcome: UpstreamResult | UpstreamError
    try:
        outcome = rig.result("session-1") if is_result else rig.create_session()
    except UpstreamError as error:
        outcome = error
    if isinstance(outcome, UpstreamError):
        assert type(outcome) is expected, (outcome, outcome.detail)
        _assert_sanitized(outcome, script)
    else:
        assert expected is None
        assert outcome.status == script.status
        assert outcome.payload == orjson.loads(script.body)


def _assert_sanitized(error: UpstreamError, script: UpstreamScript) -> None:
    """The caller sees our words and the status, never the upstream's text."""
    assert UPSTREAM_TEXT_MARKER not in error.detail
    assert error.detail.isascii()
    if isinstance(error, UpstreamRejected):
        assert error.response_status() == script.status
        code = upstream_error_code(script.body)
        assert error.detail == "The liveness service rejected the request" + (f" ({code})." if code else ".")
    if isinstance(error, UpstreamRateLimited | UpstreamNotFound):
        assert error.response_status() == script.status
    if isinstance(error, UpstreamRateLimited):
        assert 1 <= int(error.headers["Retry-After"]) <= MAX_RETRY_AFTER_SECONDS
    if isinstance(error, UpstreamMalformed | UpstreamUnavailable):
        assert error.response_status() == 502


@PROPERTIES
@hypothesis.given(payload=_json_objects())
def test_a_json_object_from_the_upstream_reaches_the_caller_unchanged(
    rig: UpstreamRig, payload: dict[str, Any]
) -> None:
    body = orjson.dumps(payload)
    hypothesis.assume(len(body) <= MAX_RESPONSE_BYTES)
    rig.upstream.answer = ScriptedAnswer(body=body)
    result = rig.result("session-1")
    assert result.payload == payload
    # What the route then sends on (re-encoded by orjson) reads back as the same object.
    assert orjson.loads(encode_upstream(result.payload, result.status)) == payload


@PROPERTIES
@hypothesis.given(depth=st.integers(min_value=1, max_value=1100))
def test_upstream_json_nested_too_deeply_to_re_encode_is_malformed_not_a_crash(depth: int) -> None:
    try:
        payload = orjson.loads(_nested(depth))
    except orjson.JSONDecodeError:
        return  # deeper than orjson reads: the client refuses it as malformed (test above)
    try:
        encoded = encode_upstream(payload, 200)
    except UpstreamMalformed:
        assert depth > 200
        return
    assert orjson.loads(encoded) == payload


@pytest.mark.parametrize("year", ["2147483648", "99999999999"])
def test_bug_retry_after_date_with_a_year_past_the_int_range_is_bounded_not_an_overflow_error(
    rig: UpstreamRig, year: str
) -> None:
    """Found by test_retry_after_is_always_between_1_and_3600_seconds: an upstream 429 whose
    Retry-After is an HTTP date with a huge year made parse_retry_after raise OverflowError (from
    datetime), which left the client as an unhandled exception: the caller got a 500."""
    assert parse_retry_after(f"Mon, 01 Jan {year} 00:00:00 GMT") in range(1, MAX_RETRY_AFTER_SECONDS + 1)
    rig.upstream.answer = ScriptedAnswer(
        status=429, headers=[(b"retry-after", f"0 JAN {year} 0:0".encode())], body=b""
    )
    with pytest.raises(UpstreamRateLimited):
        rig.result("session-1")


# --- the helpers of upstream/transport.py -------------------------------------------------------


def _retry_after_values() -> st.SearchStrategy[str | None]:
    http_dates = st.builds(
        lambda day, month, year, clock, zone: f"{day} {month} {year} {clock} {zone}".strip(),
        st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["Mon,", "Thu,", ""])),
        st.sampled_from(["Jan", "FEB", "Dec", "Foo", ""]),
        st.one_of(st.integers(-10, 10_000), st.integers(10_000, 10**15)).map(str),
        st.sampled_from(["00:00:00", "23:59:59", "99:99:99", "0:0", ""]),
        st.sampled_from(["GMT", "UTC", "+2359", "-2359", "+9999", "-0000", "EST", ""]),
    )
    return st.one_of(
        st.none(), _unicode_text(max_size=40), st.integers(-(10**12), 10**12).map(str), http_dates
    )


@PROPERTIES
@hypothesis.given(value=_retry_after_values(), now=st.floats(min_value=0, max_value=4e9))
def test_retry_after_is_always_between_1_and_3600_seconds(value: str | None, now: float) -> None:
    seconds = parse_retry_after(value, now=now)
    assert 1 <= seconds <= MAX_RETRY_AFTER_SECONDS
    if value is not None and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        assert seconds == max(1, min(int(value), MAX_RETRY_AFTER_SECONDS))


@PROPERTIES
@hypothesis.given(value=st.one_of(_unicode_text(max_size=12), st.integers(0, 10**12).map(str)))
def test_parse_seconds_reads_exactly_one_to_nine_ascii_digits(value: str) -> None:
    parsed = parse_seconds(value)
    if 1 <= len(value) <= 9 and all(character in "0123456789" for character in value):
        assert parsed == int(value)
    else:
        assert parsed is None


@PROPERTIES
@hypothesis.given(
    body=st.one_of(
        st.binary(max_size=200),
        _json_values().map(orjson.dumps),
        st.one_of(
            _unicode_text(max_size=80),
            st.from_regex(ERROR_CODE, fullmatch=True),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
        ).map(lambda code: orjson.dumps({"error": code})),
    )
)
def test_an_upstream_error_code_is_a_short_identifier_or_nothing(body: bytes) -> None:
    code = upstream_error_code(body)
    if code is None:
        return
    assert ERROR_CODE.fullmatch(code)
    assert orjson.loads(body)["error"] == code


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
        _unicode_text(max_size=10),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.lists(st.just("ES256"), max_size=2),
        st.none(),
    )
    odd = st.one_of(
        _unicode_text(max_size=300), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.none()
    )
    members = st.fixed_dictionaries(
        {"alg": _weighted((3, accepted), (2, refused))},
        optional={
            "kid": st.one_of(st.sampled_from(["ec-1", "ed-1"]), st.sampled_from(["rsa-1", ""]), odd),
            "typ": st.one_of(st.sampled_from(["JWT", "at+jwt", "JOSE"]), _unicode_text(max_size=10)),
            "crit": st.lists(_unicode_text(max_size=5), max_size=2),
            "b64": st.booleans(),
            "jku": st.just("https://attacker.example/jwks.json"),
            "jwk": st.just({"kty": "oct", "k": "c2VjcmV0"}),
            "x5u": st.just("https://attacker.example/cert.pem"),
        },
    )
    without_alg = members.map(lambda header: {name: value for name, value in header.items() if name != "alg"})
    return _weighted((6, members), (1, without_alg), (1, _json_values()))


def _claims() -> st.SearchStrategy[Any]:
    valid = st.just(None).map(lambda _: _valid_claims())
    changed = st.builds(
        lambda claims, changes: {**claims, **changes},
        valid,
        st.dictionaries(
            st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "scope", "scp"]),
            _json_values(),
            max_size=3,
        ),
    )
    return _weighted((2, valid), (2, changed), (1, _json_values()))


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


# --- 4. The problem renderer --------------------------------------------------------------------


def _every_problem(detail: str, number: int) -> list[ProblemError]:
    """One problem of every class in errors.py, built as the code builds them."""
    seconds = max(1, number)
    return [
        ProblemError(detail),
        errors.BadRequest(detail),
        errors.Unauthenticated(detail),
        errors.Unauthenticated(detail, error="invalid_token"),
        errors.Forbidden(detail),
        errors.NotFound(detail),
        errors.MethodNotAllowed(detail),
        errors.RequestTimeout(detail),
        errors.PayloadTooLarge(detail),
        errors.UnsupportedMediaType(detail),
        errors.UnprocessableContent(detail),
        errors.RequestHeaderFieldsTooLarge(detail),
        RateLimited(detail, retry_after_seconds=number),
        RateLimited(detail, retry_after_seconds=number, limit="daily_attempts"),
        errors.InternalError(detail),
        errors.ServiceUnavailable(detail),
        errors.ServiceUnavailable(detail, retry_after_seconds=number),
        errors.StoreUnavailable(detail),
        UpstreamError(detail),
        errors.UpstreamTimeout(detail),
        UpstreamUnavailable(detail, upstream_status=500),
        UpstreamMalformed(detail, upstream_status=200),
        UpstreamRateLimited(detail, retry_after_seconds=number),
        UpstreamRejected(detail, upstream_status=400 + abs(number) % 100),
        UpstreamNotFound(detail),
        errors.TokenUnavailable(detail, retry_after_seconds=seconds),
        errors.UpstreamCircuitOpen(detail, retry_after_seconds=seconds),
    ]


def test_the_renderer_properties_cover_every_problem_class() -> None:
    classes: set[type[ProblemError]] = set()
    pending: list[type[ProblemError]] = [ProblemError]
    while pending:
        cls = pending.pop()
        classes.add(cls)
        pending.extend(cls.__subclasses__())
    assert {type(problem) for problem in _every_problem("detail", 1)} == classes


@PROPERTIES
@hypothesis.given(
    which=st.integers(min_value=0, max_value=len(_every_problem("", 0)) - 1),
    detail=_unicode_text(max_size=200),
    request_id=_unicode_text(min_size=1, max_size=130),
    number=st.integers(min_value=-5, max_value=10**6),
)
def test_a_rendered_problem_is_json_with_exactly_the_rfc_9457_members(
    which: int, detail: str, request_id: str, number: int
) -> None:
    error = _every_problem(detail, number)[which]
    body = render_problem(error, request_id)
    # Valid UTF-8 and valid JSON for a strict parser, with every control character escaped.
    text = body.decode("utf-8")
    assert not any(ord(character) < 0x20 for character in text)
    parsed = json.loads(text)
    assert parsed == orjson.loads(body)
    assert set(parsed) == {"type", "title", "status", "detail", "request_id"} | set(error.extensions())
    assert parsed["type"] == errors.PROBLEM_TYPE_PREFIX + error.slug
    assert re.fullmatch(r"urn:liveness-proxy:problem:[a-z]+(-[a-z]+)*", parsed["type"])
    assert parsed["title"] == error.title
    assert parsed["status"] == error.response_status()
    assert 400 <= parsed["status"] <= 599
    assert parsed["detail"] == detail
    assert parsed["request_id"] == request_id
    for name, value in error.headers.items():
        # Headers go out as latin-1 bytes: no line breaks, nothing a header cannot carry.
        assert value.isascii()
        assert "\r" not in value
        assert "\n" not in value
        if name == "Retry-After":
            assert int(value) >= 1


@PROPERTIES
@hypothesis.given(
    checks=st.dictionaries(_unicode_text(max_size=10), _unicode_text(max_size=30), max_size=4),
    request_id=_unicode_text(min_size=1, max_size=40),
)
def test_problem_extensions_are_added_without_losing_a_member(
    checks: dict[str, str], request_id: str
) -> None:
    error = errors.ServiceUnavailable("Not ready.", retry_after_seconds=5)
    parsed = orjson.loads(render_problem(error, request_id, {"checks": checks}))
    assert parsed["checks"] == checks
    assert parsed["status"] == 503
    assert parsed["request_id"] == request_id
