"""API fuzzing: schemathesis generates requests from the proxy's own OpenAPI document (as served at
/openapi.json) and sends them over real HTTP to the proxy (uvicorn on loopback, every middleware
included) in front of a healthy sandbox upstream, with valid and invalid credentials.

Every answer must be documented (status code, content type, headers, body schema) and must not be a
5xx: the upstream is healthy, so no 5xx has an excuse. Every answer carries X-Request-ID (the
caller's own when well-formed) and X-Content-Type-Options; every error is problem+json naming the
same request id; a valid credential always gets past authentication and an invalid one never does.
Afterwards neither the responses nor the proxy's log may hold a secret. The cases are counted and
the count asserted, so the run fails if generation silently shrinks.

The request bodies are closed and bounded in the document, so a positive case is a body the proxy
must accept as it is: a session-token request is answered 200, and a create is answered 201 when its
session token was issued to the same caller just before, else 422 `session-token-invalid` (a token
schemathesis made up was never issued to anyone), and only a 201 ever reaches Cynopsis. An admin's
erasure (of a subject, or of a session) is answered 200, with zeros when there is nothing to erase;
anyone else's is refused with 403.

The stateful test lets schemathesis chain the operations through the document's own OpenAPI links
(session token → create → result), with a valid API key: a create answered 201 must be reached with a
token taken from a session-token answer, and that session's result read through the next link.

Reproducibility: the campaigns run with `derandomize=True` (a seed derived from the test, no example
database), so CI sends the same cases on every run and a failure seen once is seen again, on any
machine. The price is that CI does not explore new inputs from run to run; what it sends is
thousands of cases over every route, and every failure it reports is reproducible.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import hypothesis
import jwt
import orjson
import pytest
import requests
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from schemathesis import Case, CheckFunction, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from liveness_proxy.api.openapi import build_openapi
from liveness_proxy.auth import new_api_key
from liveness_proxy.errors import PROBLEM_TYPE_PREFIX, IdempotencyKeyReused, SessionTokenInvalid
from liveness_proxy.store import ApiKeyStore
from support import TEST_PEPPER, LogScan, ProxyHarness, find_leaks

pytestmark = pytest.mark.slow  # fuzzing campaigns of thousands of requests

FuzzCase = Case[Any]

MINIMUM_CASES = 2000
MAX_BODY_BYTES = 512
JWT_ISSUER = "https://idp.fuzz.test/"
JWT_AUDIENCE = "liveness-proxy"
SESSION_TOKEN = "POST /v1/liveness/session-token"
CREATE_SESSION = "POST /v1/liveness/sessions"
RESULT = "GET /v1/liveness/sessions/{session_id}/result"
SESSION_RECORD = "GET /v1/liveness/sessions/{session_id}"
LIST_SESSIONS = "GET /v1/liveness/sessions"
ERASE_SESSION = "DELETE /v1/liveness/sessions/{session_id}"
ERASE_SUBJECT = "POST /v1/subjects/erase"
# The erasures last: they remove sessions the other routes' cases read.
LIVENESS_ROUTES = (
    SESSION_TOKEN,
    CREATE_SESSION,
    RESULT,
    SESSION_RECORD,
    LIST_SESSIONS,
    ERASE_SESSION,
    ERASE_SUBJECT,
)
# Routes that refuse a caller without `liveness:admin` (403) before they read anything else.
ADMIN_ROUTES = (SESSION_RECORD, LIST_SESSIONS, ERASE_SESSION, ERASE_SUBJECT)
# Subjects a generated erasure must not name, so it is changed before it is sent: those of the run's
# API keys (erasing one would revoke a key the later cases count on as valid), and the admins' own
# (refused with 422).
RESERVED_SUBJECTS = frozenset({"alice", "bob", "ops", "jwt-ops"})
# Filters whose random values match no session (a random subject, a time in year 312).
NARROWING_FILTERS = ("subject", "reference", "created_after", "created_before")
UPSTREAM_RESULT_PREFIX = "/service/liveness-v2/liveness_result/"
UPSTREAM_CREATE_PATH = "/service/liveness-v2/liveness_session"
# _known_sessions reads each finished session once: two owners, two finished sessions each.
SETUP_RESULT_READS = 4
# _known_sessions creates three sessions for each of two owners, and one for a JWT caller.
SETUP_CREATES = 7
# Where a positive create case's session token comes from: the one schemathesis generated (issued
# to no one), one issued to ISSUED_TO just before, or a conforming one longer than the body limit.
TokenSource = Literal["generated", "issued", "oversized"]
# Generated and issued tokens each about 4 cases in 9, oversized ones 1 in 9.
TOKEN_SOURCES: tuple[TokenSource, ...] = ("generated", "issued") * 4 + ("oversized",)
ISSUED_TO = "alice"
# Printable ASCII within the declared 4096 characters, so the body conforms; too large to be read.
OVERSIZED_SESSION_TOKEN = "o" * MAX_BODY_BYTES
PROBLEM_MEMBERS = {"type", "title", "status", "detail", "request_id"}
PROBLEM_EXTENSIONS = {"limit", "checks"}
WELL_FORMED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
GENERATED_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9.+-]*\+)?json", re.IGNORECASE)
# Content types a POST case is sent with instead of schemathesis' application/json, now and then.
ODD_CONTENT_TYPES = (
    "application/json; charset=utf-8",
    "application/problem+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=fuzz",
    "application/jsonx",
    "*/*",
)


# Cases per operation and generation mode. Positive cases conform to the document, with the
# credential drawn per case (most of them valid); negative cases break it (bodies that are not
# objects, malformed session ids, stray headers). Operations without parameters have no negative
# form. The sum (2780) is the exact count when Hypothesis runs every campaign to its end. The
# erasures run last: they remove the sessions the other campaigns read.
CAMPAIGNS: tuple[tuple[str, GenerationMode, int], ...] = (
    (SESSION_TOKEN, GenerationMode.POSITIVE, 330),
    (SESSION_TOKEN, GenerationMode.NEGATIVE, 170),
    (CREATE_SESSION, GenerationMode.POSITIVE, 380),
    (CREATE_SESSION, GenerationMode.NEGATIVE, 170),
    (RESULT, GenerationMode.POSITIVE, 380),
    (RESULT, GenerationMode.NEGATIVE, 170),
    (SESSION_RECORD, GenerationMode.POSITIVE, 280),
    (SESSION_RECORD, GenerationMode.NEGATIVE, 120),
    (LIST_SESSIONS, GenerationMode.POSITIVE, 160),
    (LIST_SESSIONS, GenerationMode.NEGATIVE, 80),
    ("GET /healthz", GenerationMode.POSITIVE, 30),
    ("GET /readyz", GenerationMode.POSITIVE, 30),
    ("GET /metrics", GenerationMode.POSITIVE, 30),
    ("GET /openapi.json", GenerationMode.POSITIVE, 30),
    ("GET /client/liveness-proxy-client.js", GenerationMode.POSITIVE, 20),
    ("GET /client/liveness-proxy-client.d.ts", GenerationMode.POSITIVE, 20),
    (ERASE_SESSION, GenerationMode.POSITIVE, 120),
    (ERASE_SESSION, GenerationMode.NEGATIVE, 60),
    (ERASE_SUBJECT, GenerationMode.POSITIVE, 120),
    (ERASE_SUBJECT, GenerationMode.NEGATIVE, 80),
)
RATE_LIMITED_CASES_PER_ROUTE = 40
# What the proxy must have answered at least once: a run that only ever met 401s and 404s fails.
REQUIRED_OUTCOMES = {
    (SESSION_TOKEN, 200),
    (SESSION_TOKEN, 401),
    (SESSION_TOKEN, 415),
    (SESSION_TOKEN, 422),
    (CREATE_SESSION, 201),
    (CREATE_SESSION, 400),
    (CREATE_SESSION, 401),
    (CREATE_SESSION, 413),
    (CREATE_SESSION, 415),
    (CREATE_SESSION, 422),
    (RESULT, 200),
    (RESULT, 400),
    (RESULT, 401),
    (RESULT, 404),
    (SESSION_RECORD, 200),
    (SESSION_RECORD, 401),
    (SESSION_RECORD, 403),
    (SESSION_RECORD, 404),
    (LIST_SESSIONS, 200),
    (LIST_SESSIONS, 400),
    (LIST_SESSIONS, 401),
    (LIST_SESSIONS, 403),
    (ERASE_SESSION, 200),
    (ERASE_SESSION, 400),
    (ERASE_SESSION, 401),
    (ERASE_SESSION, 403),
    (ERASE_SUBJECT, 200),
    (ERASE_SUBJECT, 401),
    (ERASE_SUBJECT, 403),
    (ERASE_SUBJECT, 422),
    ("GET /healthz", 200),
    ("GET /readyz", 200),
    ("GET /metrics", 200),
    ("GET /openapi.json", 200),
}


# The response checks the issue asks for; max_response_time and the data-acceptance checks are left
# out: timing is not a correctness property, and a valid credential with random data is refused on
# purpose (a session token the caller never obtained is 422 `session-token-invalid`). What a
# conforming body must get instead is asserted by Fuzzer._conforming_body_issues.
RESPONSE_CHECKS: tuple[CheckFunction, ...] = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)


@dataclass(frozen=True)
class Credential:
    """What a case authenticates with: exactly these headers (none is also a credential)."""

    name: str
    valid: bool
    headers: Mapping[str, str]
    # Whom the proxy knows the caller as, where a promise depends on it (the owner of issued tokens).
    subject: str | None = None
    # Holds `liveness:admin`: the admin routes answer it, and refuse any other caller (403).
    admin: bool = False


@dataclass(frozen=True)
class Variation:
    """What each case adds to what schemathesis generated."""

    credential: Credential
    request_id: str | None
    content_type: str | None
    # A positive create-session case keeps its generated session token, or gets one just issued to
    # ISSUED_TO (so it can succeed: 201), or one too large for the body limit (413).
    session_token: TokenSource
    # A positive read names a session that exists (own, foreign, finished or not) instead of the
    # random well-formed id schemathesis drew, which exists nowhere.
    known_session_id: str | None


@dataclass
class FuzzReport:
    cases: int = 0
    outcomes: Counter[tuple[str, int]] = field(default_factory=Counter)
    by_credential: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    # Session records answered with refresh=true and no verdict: each read the result upstream.
    refresh_reads: int = 0
    # Creates answered 201 and not replayed: the only ones that may have called Cynopsis.
    created: int = 0
    # Result reads answered 200 by a call of their own (`X-Liveness-Result-Source: upstream`), not
    # from the proxy's record of a finished session or another read's answer.
    called_reads: int = 0


def _es256_key_file(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / "idp-public.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, path


def _jwt(key: ec.EllipticCurvePrivateKey, subject: str, *, lifetime: int = 3600, scope: str = "") -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
    }
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "fuzz-1"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _handmade_jwt(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token PyJWT refuses to make: alg none, or HS256 keyed with the identity provider's public key."""
    signing_input = f"{_b64url(orjson.dumps(header))}.{_b64url(orjson.dumps(claims))}"
    return f"{signing_input}.{_b64url(sign(signing_input.encode()))}"


def _revoke(proxy: ProxyHarness, key_id: str) -> None:
    async def revoke() -> None:
        async with proxy.database() as engine:
            assert await ApiKeyStore(engine).revoke(key_id, revoked_at=time.time())

    asyncio.run(revoke())


def _credentials(
    proxy: ProxyHarness, idp_key: ec.EllipticCurvePrivateKey, public_key_pem: bytes
) -> list[Credential]:
    bearer = proxy.auth
    now = int(time.time())
    claims = {"sub": "alice", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 3600}
    alg_none = _handmade_jwt({"alg": "none", "typ": "JWT"}, claims, lambda _: b"")
    alg_confusion = _handmade_jwt(
        {"alg": "HS256", "kid": "fuzz-1"},
        claims,
        lambda signing_input: hmac.new(public_key_pem, signing_input, hashlib.sha256).digest(),
    )
    # Well-formed, but never stored: the proxy knows neither its id nor its secret.
    unknown_key = new_api_key(
        pepper=TEST_PEPPER.encode(), subject="nobody", scopes=[], name="unknown", now=time.time()
    ).key
    _revoke(proxy, proxy.keys.revocable_id)
    stranger = ec.generate_private_key(ec.SECP256R1())
    return [
        Credential("api-key-bearer", True, bearer(proxy.keys.alice), subject=ISSUED_TO),
        Credential("api-key-header", True, {"X-API-Key": proxy.keys.alice}, subject=ISSUED_TO),
        Credential("admin-api-key", True, bearer(proxy.keys.admin), admin=True),
        Credential("jwt", True, bearer(_jwt(idp_key, "jwt-user"))),
        Credential("admin-jwt", True, bearer(_jwt(idp_key, "jwt-ops", scope="liveness:admin")), admin=True),
        Credential("none", False, {}),
        Credential("unknown-api-key", False, bearer(unknown_key)),
        Credential("revoked-api-key", False, bearer(proxy.keys.revocable)),
        Credential("jwt-foreign-signer", False, bearer(_jwt(stranger, "jwt-user"))),
        Credential("jwt-expired", False, bearer(_jwt(idp_key, "jwt-user", lifetime=-3600))),
        Credential("jwt-alg-none", False, bearer(alg_none)),
        Credential("jwt-hs256-public-key", False, bearer(alg_confusion)),
        Credential("two-credentials", False, {**bearer(proxy.keys.alice), "X-API-Key": proxy.keys.alice}),
        Credential("basic-scheme", False, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}),
    ]


def _known_sessions(proxy: ProxyHarness, client: httpx.Client, jwt_credential: Credential) -> list[str]:
    """Sessions of three owners (alice, bob, a JWT user) in every state, finished ones read once so
    their verdicts are recorded: result and admin reads of them reach their 200s."""
    made: list[str] = []
    for key in (proxy.keys.alice, proxy.keys.bob):
        live, spoof, pending = (proxy.create_session(client, key) for _ in range(3))
        proxy.sandbox.complete_session(live, live=True)
        proxy.sandbox.complete_session(spoof, live=False)
        for finished in (live, spoof):
            read = client.get(f"/v1/liveness/sessions/{finished}/result", headers=proxy.auth(key))
            assert read.status_code == 200, read.text
        made += [live, spoof, pending]
    jwt_headers = dict(jwt_credential.headers)
    token = client.post("/v1/liveness/session-token", headers=jwt_headers).json()["session_token"]
    created = client.post("/v1/liveness/sessions", headers=jwt_headers, json={"session_token": token})
    assert created.status_code == 201, created.text
    made.append(created.json()["session_id"])
    return made


def _known_cursor(proxy: ProxyHarness, client: httpx.Client) -> str:
    """The cursor after the newest session: a page that exists."""
    first = client.get("/v1/liveness/sessions?limit=1", headers=proxy.auth(proxy.keys.admin))
    assert first.status_code == 200, first.text
    cursor: str = first.json()["next_cursor"]
    return cursor


def _refresh_asked(case: FuzzCase) -> bool:
    return str((case.query or {}).get("refresh", "")).lower() == "true"


def _header_text(max_size: int) -> st.SearchStrategy[str]:
    """What a header value can be: printable ASCII, no space at either end."""
    return st.from_regex(
        re.compile(rf"[\x21-\x7e](?:[\x20-\x7e]{{0,{max_size}}}[\x21-\x7e])?"), fullmatch=True
    )


def _random_credentials() -> st.SearchStrategy[Credential]:
    """Random Authorization and X-API-Key values, some shaped like an API key or a JWT."""
    api_key_shaped = st.from_regex(re.compile(r"lpk_[0-9a-f]{16}_[A-Za-z0-9_-]{8,48}"), fullmatch=True)
    jwt_shaped = st.from_regex(
        re.compile(r"eyJ[A-Za-z0-9_-]{2,60}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}"), fullmatch=True
    )
    secret = st.one_of(_header_text(80), api_key_shaped, jwt_shaped)
    authorization = st.one_of(
        secret.map(lambda value: f"Bearer {value}"),
        st.sampled_from(["Bearer", "Bearer ", "bearer x"]),
        secret,
    )
    headers = st.fixed_dictionaries({}, optional={"Authorization": authorization, "X-API-Key": secret})
    return headers.map(lambda drawn: Credential("random", False, drawn))


def _variations(credentials: list[Credential], session_ids: list[str]) -> st.SearchStrategy[Variation]:
    valid = [credential for credential in credentials if credential.valid]
    invalid = [credential for credential in credentials if not credential.valid]
    # Valid credentials count twice: most cases should get past authentication. None stands for
    # a random credential, drawn afresh.
    choices: list[Credential | None] = [*valid, *valid, *invalid, None, None]
    return st.builds(
        Variation,
        credential=st.sampled_from(choices).flatmap(
            lambda chosen: _random_credentials() if chosen is None else st.just(chosen)
        ),
        request_id=st.one_of(
            st.none(),
            st.from_regex(WELL_FORMED_REQUEST_ID, fullmatch=True),
            _header_text(200),
        ),
        content_type=st.one_of(st.none(), st.sampled_from(ODD_CONTENT_TYPES)),
        session_token=st.sampled_from(TOKEN_SOURCES),
        known_session_id=st.one_of(st.none(), st.sampled_from(session_ids)),
    )


class Fuzzer:
    """Sends one case with its variation; checks the answer with schemathesis and against the
    proxy's own promises, and scans it for secrets. Failures are collected, not raised."""

    def __init__(
        self, proxy: ProxyHarness, session: requests.Session, report: FuzzReport, known_cursor: str
    ) -> None:
        self.proxy = proxy
        self.session = session
        self.report = report
        # A cursor the list returned: a positive list case sometimes pages on with it.
        self.known_cursor = known_cursor

    def exercise(self, case: FuzzCase, mode: GenerationMode, variation: Variation) -> None:
        report = self.report
        label = case.operation.label
        credential = variation.credential
        report.cases += 1
        report.by_credential["valid" if credential.valid else "invalid"] += 1
        token_source = self._prepare(case, mode, variation)
        try:
            response = case.call(base_url=self.proxy.url, session=self.session, timeout=15)
        except requests.RequestException as exc:
            report.failures.append(f"{label} [{credential.name}]: no answer: {type(exc).__name__}: {exc}")
            return
        report.outcomes[(label, response.status_code)] += 1
        if label == CREATE_SESSION and response.status_code == 201:
            report.created += response.headers.get("idempotent-replayed") is None
        if label == RESULT and response.status_code == 200:
            # schemathesis' response keeps each header as a list of its values.
            report.called_reads += response.headers.get("x-liveness-result-source") == ["upstream"]
        if label == SESSION_RECORD and response.status_code == 200 and _refresh_asked(case):
            report.refresh_reads += orjson.loads(response.content)["verdict"] is None
        try:
            case.validate_response(response, checks=list(RESPONSE_CHECKS))
        except FailureGroup as group:
            report.failures.append(f"{label} [{credential.name}]: {group}")
        for broken in self._own_promises(case, response, mode, variation, token_source):
            report.failures.append(
                f"{label} [{credential.name}]: {broken} (status {response.status_code})\n"
                f"    {case.as_curl_command()}"
            )
        self._scan(response, label)

    def _prepare(self, case: FuzzCase, mode: GenerationMode, variation: Variation) -> TokenSource | None:
        """Applies the variation; returns where a positive create's session token came from."""
        replaced = {"x-request-id", "authorization", "x-api-key"}
        headers = {
            name: value for name, value in (case.headers or {}).items() if name.lower() not in replaced
        }
        headers.update(variation.credential.headers)
        if variation.request_id is not None:
            headers["X-Request-ID"] = variation.request_id
        if variation.content_type is not None and not isinstance(case.body, NotSet):
            headers = {name: value for name, value in headers.items() if name.lower() != "content-type"}
            headers["Content-Type"] = variation.content_type
        case.headers = CaseInsensitiveDict(headers)
        if mode is not GenerationMode.POSITIVE:
            return None
        if variation.known_session_id is not None and case.path_parameters:
            case.path_parameters = {"session_id": variation.known_session_id}
        if variation.known_session_id is not None and case.operation.label == LIST_SESSIONS and case.query:
            # Most list cases page through the sessions that exist, by status: random filters match
            # none, and a random cursor is one the list never returned (a 400).
            case.query = {name: value for name, value in case.query.items() if name not in NARROWING_FILTERS}
            if "cursor" in case.query:
                case.query["cursor"] = self.known_cursor
        if case.operation.label == ERASE_SUBJECT and isinstance(case.body, dict):
            subject = case.body.get("subject")
            if isinstance(subject, str) and subject in RESERVED_SUBJECTS:
                case.body["subject"] = f"{subject}-not"
            return None
        if case.operation.label != CREATE_SESSION or not isinstance(case.body, dict):
            return None
        if variation.session_token == "oversized":
            case.body["session_token"] = OVERSIZED_SESSION_TOKEN
            return "oversized"
        if variation.session_token == "issued" and (token := self._fresh_session_token()) is not None:
            case.body["session_token"] = token
            return "issued"
        return "generated"

    def _fresh_session_token(self) -> str | None:
        """A session token issued to ISSUED_TO now; None when her limit refuses one (429)."""
        answer = self.session.post(
            f"{self.proxy.url}/v1/liveness/session-token", headers=self.proxy.auth(), timeout=15
        )
        if answer.status_code == 429:
            return None
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["session_token"]
        return token

    def _own_promises(
        self,
        case: FuzzCase,
        response: schemathesis.Response,
        mode: GenerationMode,
        variation: Variation,
        token_source: TokenSource | None,
    ) -> list[str]:
        broken: list[str] = []
        status = response.status_code
        label = case.operation.label
        if status >= 500:
            broken.append(f"a {status} with a healthy upstream: {response.content[:300]!r}")
        request_ids = response.headers.get("x-request-id") or []
        if len(request_ids) != 1:
            return [*broken, f"X-Request-ID sent {len(request_ids)} times"]
        request_id = request_ids[0]
        sent = variation.request_id
        if sent is not None and WELL_FORMED_REQUEST_ID.fullmatch(sent):
            if request_id != sent:
                broken.append("a well-formed X-Request-ID was not kept")
        elif not GENERATED_REQUEST_ID.fullmatch(request_id):
            broken.append(f"a malformed or missing X-Request-ID was not replaced: {request_id[:40]!r}")
        if response.headers.get("x-content-type-options") != ["nosniff"]:
            broken.append("no X-Content-Type-Options: nosniff")
        if status >= 400:
            broken += _problem_body_issues(response, request_id)
        if label in LIVENESS_ROUTES and mode is GenerationMode.POSITIVE:
            if variation.credential.valid and status == 401:
                broken.append("a valid credential was refused")
            if not variation.credential.valid and status != 401 and not _limited_unauthenticated(response):
                broken.append("an invalid credential was not refused with 401 (or the unauthenticated 429)")
            content_type = variation.content_type
            sent_json = content_type is None or JSON_MEDIA_TYPE.fullmatch(content_type.split(";")[0].strip())
            body_sent = not isinstance(case.body, NotSet)
            # (The rate limit is checked before the body is read, and on the admin routes the scope.)
            read_first = (413, 415, 429, *((403,) if label in ADMIN_ROUTES else ()))
            if variation.credential.valid and body_sent and not sent_json and status not in read_first:
                broken.append(f"a body sent as {content_type!r} was not refused with 415")
            if variation.credential.valid and (sent_json or not body_sent) and status != 429:
                broken += _conforming_body_issues(case, response, variation.credential, token_source)
        return broken

    def _scan(self, response: schemathesis.Response, label: str) -> None:
        text = str(response.headers)
        # The one secret the proxy hands out on purpose: a session token, for the frontend SDK.
        if not (label == SESSION_TOKEN and response.status_code == 200):
            text += response.content.decode("utf-8", "replace")
        self.report.leaks += [f"{label}: {leak}" for leak in find_leaks(text)]


def _problem_slug(response: schemathesis.Response) -> str | None:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind.removeprefix(PROBLEM_TYPE_PREFIX) if isinstance(kind, str) else None


def _conforming_body_issues(
    case: FuzzCase, response: schemathesis.Response, credential: Credential, token_source: TokenSource | None
) -> list[str]:
    """What a positive POST case with a valid credential, sent as JSON, must be answered (a limit's
    429 aside). Its body is one the document declares, so its shape is never refused (no 400, no
    `unprocessable-content`): a session-token request is answered 200; a create is 201 only with a
    token just issued to this same caller, else 422 `session-token-invalid`, and 413 when the token
    makes the body too large. `idempotency-key-reused` is also right when a key was sent: the
    generated keys repeat, and one stored for an earlier create came with another body."""
    status, label = response.status_code, case.operation.label
    if label == SESSION_TOKEN:
        return [] if status == 200 else [f"a conforming session-token request was answered {status}"]
    if label in (ERASE_SUBJECT, ERASE_SESSION):
        # An admin's erasure is answered 200 (zeros when there is nothing to erase), unless its
        # subject makes the body too large; anyone else's is refused before anything is read.
        wanted = ((200, 413) if label == ERASE_SUBJECT else (200,)) if credential.admin else (403,)
        return [] if status in wanted else [f"a conforming erasure was answered {status}, not {wanted}"]
    if label != CREATE_SESSION:
        return []
    # (status, problem slug) answers that keep the promise; None: any slug.
    reused = [(422, IdempotencyKeyReused.slug)] if "Idempotency-Key" in (case.headers or {}) else []
    allowed: list[tuple[int, str | None]]
    if token_source == "oversized":
        allowed = [(413, None)]
    elif token_source == "issued" and credential.subject == ISSUED_TO:
        allowed = [(201, None), *reused]
    else:
        allowed = [(422, SessionTokenInvalid.slug), *reused]
    slug = _problem_slug(response)
    if any(status == wanted and kind in (None, slug) for wanted, kind in allowed):
        return []
    expected = " or ".join(f"{wanted} {kind or ''}".strip() for wanted, kind in allowed)
    answered = f"{status} {slug or ''}".strip()
    return [f"a create whose session token was {token_source} was answered {answered}, not {expected}"]


def _problem_body_issues(response: schemathesis.Response, request_id: str) -> list[str]:
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.split(";")[0].strip() != "application/problem+json":
        return [f"an error answered as {content_type!r}, not application/problem+json"]
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return ["a problem body that is not JSON"]
    if not isinstance(body, dict):
        return ["a problem body that is not an object"]
    issues = []
    if not PROBLEM_MEMBERS <= body.keys() <= PROBLEM_MEMBERS | PROBLEM_EXTENSIONS:
        issues.append(f"problem members {sorted(body)}")
    if body.get("status") != response.status_code:
        issues.append(f"problem status {body.get('status')!r} differs from the response's")
    if body.get("request_id") != request_id:
        issues.append("problem request_id differs from X-Request-ID")
    return issues


def run_campaign(
    cases: st.SearchStrategy[FuzzCase],
    variations: st.SearchStrategy[Variation],
    max_examples: int,
    exercise: Callable[[FuzzCase, Variation], None],
) -> None:
    """One Hypothesis run. `exercise` collects failures instead of raising, so every campaign sends
    its whole count and the report lists every failure (none is shrunk: shrinking re-sends cases
    against a server whose state has moved on)."""

    @hypothesis.settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(case=cases, variation=variations)
    def campaign(case: FuzzCase, variation: Variation) -> None:
        exercise(case, variation)

    campaign()


@dataclass
class FuzzRun:
    report: FuzzReport
    seconds: float
    # Session ids of the result reads that reached the upstream, and of the sessions that exist.
    upstream_reads: list[str]
    existing_sessions: set[str]
    # Session creates the sandbox received.
    upstream_creates: int
    new_log_leaks: list[str]
    log_lines_scanned: int


def fuzz(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
    log_scan: LogScan,
    tmp_path: Path,
    campaigns: tuple[tuple[str, GenerationMode, int], ...],
    **overrides: Any,
) -> FuzzRun:
    """Starts a sandbox and a proxy (with JWT callers), runs the campaigns against it, and collects
    what the assertions need."""
    idp_key, public_key_file = _es256_key_file(tmp_path)
    settings = {
        # Small enough that the larger generated bodies meet the limit (413).
        "LIVENESS_PROXY_MAX_BODY_BYTES": MAX_BODY_BYTES,
        # A loaded CI machine must not turn a slow sandbox answer into a 504.
        "CYNOPSIS_TIMEOUT_SECONDS": 10.0,
        "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": 10.0,
        "LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE": str(public_key_file),
        "LIVENESS_PROXY_JWT_ISSUER": JWT_ISSUER,
        "LIVENESS_PROXY_JWT_AUDIENCE": JWT_AUDIENCE,
        "LIVENESS_PROXY_JWT_ALGORITHMS": "ES256",
        # Results and session records then carry `passed`, checked against its schema too.
        "LIVENESS_PROXY_PASS_THRESHOLD": 80,
        **overrides,
    }
    leaks_before, lines_before = len(log_scan.leaks), log_scan.lines_scanned
    report = FuzzReport()
    started = time.monotonic()
    with (
        make_proxy(proxy_overrides=settings) as proxy,
        proxy.client() as client,
        requests.Session() as session,
    ):
        # The document as served, what a client reads (from_url would leave /openapi.json itself out).
        document = client.get("/openapi.json").json()
        config = schemathesis.Config()
        # The credentials come from the variations; schemathesis' own random ones would only cost time.
        config.projects.default.generation.update(with_security_parameters=False)
        schema = schemathesis.openapi.from_dict(document, config=config)
        loaded = list(schema.get_all_operations())
        operations = {result.ok().label: result.ok() for result in loaded if isinstance(result, Ok)}
        assert len(operations) == len(loaded), "the document has operations schemathesis cannot load"
        assert set(operations) == {label for label, _, _ in CAMPAIGNS}
        credentials = _credentials(proxy, idp_key, public_key_file.read_bytes())
        session_ids = _known_sessions(proxy, client, next(c for c in credentials if c.name == "jwt"))
        fuzzer = Fuzzer(proxy, session, report, _known_cursor(proxy, client))
        variations = _variations(credentials, session_ids)
        for label, mode, examples in campaigns:

            def exercise(case: FuzzCase, variation: Variation, mode: GenerationMode = mode) -> None:
                fuzzer.exercise(case, mode, variation)

            cases = operations[label].as_strategy(generation_mode=mode)
            run_campaign(cases, variations, examples, exercise)
        upstream_reads = [
            request.path.removeprefix(UPSTREAM_RESULT_PREFIX)
            for request in proxy.sandbox.request_log
            if request.path.startswith(UPSTREAM_RESULT_PREFIX)
        ]
        existing_sessions = set(proxy.sandbox.session_ids)
        upstream_creates = sum(request.path == UPSTREAM_CREATE_PATH for request in proxy.sandbox.request_log)
    run = FuzzRun(
        report=report,
        seconds=time.monotonic() - started,
        upstream_reads=upstream_reads,
        existing_sessions=existing_sessions,
        upstream_creates=upstream_creates,
        new_log_leaks=log_scan.leaks[leaks_before:],
        log_lines_scanned=log_scan.lines_scanned - lines_before,
    )
    print(  # the figures a reviewer wants from a CI log
        f"\nfuzz: {report.cases} cases in {run.seconds:.1f} s, {dict(report.by_credential)} credentials, "
        f"{len(report.failures)} failures, {run.log_lines_scanned} log lines scanned\n"
        + "\n".join(
            f"  {label} {status}: {count}" for (label, status), count in sorted(report.outcomes.items())
        )
    )
    return run


def _limited_unauthenticated(response: schemathesis.Response) -> bool:
    """A 429 of the per-address limit on failed authentications (its budget spent by this run)."""
    if response.status_code != 429:
        return False
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and body.get("limit") == "unauthenticated"


def assert_clean(run: FuzzRun) -> None:
    """No failure, no secret in any response or log line, and nothing unexpected upstream."""
    report = run.report
    assert not report.failures, f"{len(report.failures)} failures, the first 20:\n\n" + "\n\n".join(
        report.failures[:20]
    )
    assert not report.leaks, report.leaks[:20]
    assert not run.new_log_leaks, run.new_log_leaks[:20]
    # One access-log line per request at least: the scan read the whole run's log.
    assert run.log_lines_scanned >= report.cases
    # A read reaches the upstream only for a session that exists and is the caller's (or the caller
    # is an admin): with a healthy upstream, exactly the reads answered 200 by a call of their own
    # (a finished session's result is then answered from the proxy's record), the admin's refreshes
    # of sessions without a verdict, and the setup's.
    assert set(run.upstream_reads) <= run.existing_sessions
    assert len(run.upstream_reads) == report.called_reads + report.refresh_reads + SETUP_RESULT_READS, {
        outcome: count for outcome, count in report.outcomes.items() if outcome[0] in (RESULT, SESSION_RECORD)
    }
    assert report.called_reads <= report.outcomes[(RESULT, 200)]
    # A refused create (a session token not issued to its caller, a body refused, a limit met) never
    # reaches Cynopsis: it received exactly the creates answered 201, and the setup's.
    assert run.upstream_creates == report.created + SETUP_CREATES


# About 40 s on an idle 2-core machine, up to 100 s when it is shared with other work: the default
# 120 s timeout would cut a slow run that is not failing.
@pytest.mark.served
@pytest.mark.timeout(300)
def test_fuzz_every_route_with_valid_and_invalid_credentials(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]], log_scan: LogScan, tmp_path: Path
) -> None:
    run = fuzz(
        make_proxy,
        log_scan,
        tmp_path,
        CAMPAIGNS,
        # Limits stay on (429 remains a documented answer) but far above what the run sends.
        LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN="1000000/minute",
        LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION="1000000/minute",
        LIVENESS_PROXY_RATE_LIMIT_RESULT="1000000/minute",
        LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED="1000000/minute",
        LIVENESS_PROXY_DAILY_ATTEMPTS=1000000,
    )
    assert_clean(run)
    report = run.report
    assert report.cases >= MINIMUM_CASES
    assert report.by_credential["valid"] >= MINIMUM_CASES // 2
    assert report.by_credential["invalid"] >= MINIMUM_CASES // 5
    assert set(report.outcomes) >= REQUIRED_OUTCOMES, sorted(REQUIRED_OUTCOMES - set(report.outcomes))


@pytest.mark.served
def test_fuzz_with_tight_limits_every_429_is_documented(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]], log_scan: LogScan, tmp_path: Path
) -> None:
    """The main run keeps the limits out of the way; here they bite, so the 429 answers (their
    Retry-After, the `limit` member) are checked against the document too."""
    campaigns = tuple(
        (label, GenerationMode.POSITIVE, RATE_LIMITED_CASES_PER_ROUTE) for label in LIVENESS_ROUTES
    )
    run = fuzz(
        make_proxy,
        log_scan,
        tmp_path,
        campaigns,
        # What the setup itself needs: 3 session tokens, 3 sessions and 2 reads each for alice and
        # bob; the admins' reads (the setup's one list page among them) meet their limit after 2.
        LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN="3/minute",
        LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION="3/minute",
        LIVENESS_PROXY_RATE_LIMIT_RESULT="2/minute",
        LIVENESS_PROXY_DAILY_ATTEMPTS=4,
    )
    assert_clean(run)
    assert run.report.cases == len(LIVENESS_ROUTES) * RATE_LIMITED_CASES_PER_ROUTE
    assert {(label, 429) for label in LIVENESS_ROUTES} <= set(run.report.outcomes)


# ---------------------------------------------------------------------------------------------------
# Stateful: schemathesis follows the document's links.

# Hypothesis scenarios and the most steps each; about 5 s per configuration on an idle machine.
STATEFUL_SCENARIOS = 40
STATEFUL_STEPS = 6
# The document's links, the only transitions (schemathesis' own inference is switched off).
DOCUMENTED_LINKS = 2
# An operator-allowed body member: generated bodies then carry any JSON value in it.
EXTRA_BODY_FIELD = "metadata"


@dataclass
class LinkReport:
    """What the stateful run sent and got, and what broke; collected, not raised, as in Fuzzer."""

    steps: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    # Steps whose input a link filled from the answer of the step before.
    linked: Counter[tuple[str, int]] = field(default_factory=Counter)
    issued: set[str] = field(default_factory=set)
    spent: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)
    # Sessions answered 201 whose result was then read (200) through the create's link.
    read_through_link: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)


def _linked_workflow(
    schema: schemathesis.BaseSchema, proxy: ProxyHarness, session: requests.Session, report: LinkReport
) -> type[schemathesis.stateful.APIStateMachine]:
    """The state machine schemathesis builds from the links, calling the proxy as alice, with each
    answer counted and held to what the proxy promises for it at that point of the chain."""
    keys = itertools.count()

    class LinkedWorkflow(schema.as_state_machine()):  # type: ignore[misc]  # a class made at run time
        def get_call_kwargs(self, case: FuzzCase) -> dict[str, Any]:
            return {"base_url": proxy.url, "session": session, "headers": proxy.auth(), "timeout": 15}

        def before_call(self, case: FuzzCase) -> None:
            # The keys schemathesis draws repeat across scenarios ("0" again and again) and a key the
            # proxy stored answers 422 the next time: Hypothesis, which replays scenario prefixes and
            # must meet the same answers, would call the run flaky. Each key is made unique instead,
            # its shape kept, so stored keys are still written and never met again.
            if case.headers is not None and (key := case.headers.get("Idempotency-Key")) is not None:
                case.headers["Idempotency-Key"] = f"{key[:40]}-{next(keys)}"

        def after_call(self, response: schemathesis.Response, case: FuzzCase) -> None:
            super().after_call(response, case)
            label, status = case.operation.label, response.status_code
            report.steps += 1
            report.statuses[(label, status)] += 1
            node = self.recorder.cases[case.id]
            parent = self.recorder.find_parent(case_id=case.id)
            parent_answer = self.recorder.find_response(case_id=parent.id) if parent is not None else None
            linked = node.transition is not None and node.is_transition_applied and parent_answer is not None
            if linked:
                report.linked[(label, status)] += 1
            for broken in _link_promises(report, case, response, parent_answer if linked else None):
                report.failures.append(f"{label} {status}: {broken}\n    {case.as_curl_command()}")
            text = str(response.headers)
            if not (label == SESSION_TOKEN and status == 200):  # the token is handed out on purpose
                text += response.content.decode("utf-8", "replace")
            report.leaks += [f"{label}: {leak}" for leak in find_leaks(text)]

        def validate_response(
            self,
            response: schemathesis.Response,
            case: FuzzCase,
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            # The campaigns' checks, and schemathesis' own stateful one: a resource answered 201 is
            # not 404 when read through the link.
            try:
                case.validate_response(
                    response,
                    checks=[*RESPONSE_CHECKS, ensure_resource_availability],
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except FailureGroup as group:
                report.failures.append(f"{case.operation.label}: {group}")

    return LinkedWorkflow


def _link_promises(
    report: LinkReport,
    case: FuzzCase,
    response: schemathesis.Response,
    parent_answer: schemathesis.Response | None,
) -> list[str]:
    """Every step is positive and sent as alice. A session token is issued (200); a create is 201
    exactly when its token was issued in this run and not spent yet, else 422
    `session-token-invalid` (made up by schemathesis, or used already: the link can be followed twice
    from one answer); a result is 200 for a session created in this run, else 404 (an id the link did
    not fill)."""
    label, status = case.operation.label, response.status_code
    body: Any = orjson.loads(response.content) if response.content else None
    if label == SESSION_TOKEN:
        if status != 200:
            return ["a session token was refused"]
        report.issued.add(body["session_token"])
        return []
    if label == CREATE_SESSION:
        assert isinstance(case.body, dict)
        token = case.body["session_token"]
        if token in report.issued and token not in report.spent:
            if status != 201:
                return [f"a token issued to the same caller, unused, was refused: {_problem_slug(response)}"]
            report.spent.add(token)
            report.created.add(body["session_id"])
            if parent_answer is not None and orjson.loads(parent_answer.content)["session_token"] != token:
                return ["the link did not carry the session token of the answer before"]
            return []
        if (status, _problem_slug(response)) != (422, SessionTokenInvalid.slug):
            return ["a token never issued, or spent already, was not refused as session-token-invalid"]
        return []
    if label == RESULT:
        session_id = (case.path_parameters or {})["session_id"]
        if session_id not in report.created:
            return [] if status == 404 else ["a session never created was not 404"]
        if status != 200 or body.get("session_id") != session_id:
            return ["a session created by this caller could not be read"]
        if parent_answer is not None and orjson.loads(parent_answer.content).get("session_id") == session_id:
            report.read_through_link.add(session_id)
        return []
    return [f"an operation no link leads to: {label}"]


# A few seconds per configuration; the default timeout leaves a loaded machine room.
@pytest.mark.served
@pytest.mark.parametrize("extra_body_fields", [(), (EXTRA_BODY_FIELD,)], ids=["declared", "extra-body-field"])
def test_stateful_links_create_a_session_and_read_its_result(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
    log_scan: LogScan,
    extra_body_fields: tuple[str, ...],
) -> None:
    """schemathesis' stateful phase, from the document as served: it can only reach a 201 by taking
    the session token of a session-token answer into the create's body (the getSessionToken →
    createSession link), and it reads that session's result through the next link."""
    settings: dict[str, object] = {
        # Limits far above what the run sends: a 429 would only hide the chain.
        "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "1000000/minute",
        "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "1000000/minute",
        "LIVENESS_PROXY_RATE_LIMIT_RESULT": "1000000/minute",
        "LIVENESS_PROXY_DAILY_ATTEMPTS": 1000000,
        "CYNOPSIS_TIMEOUT_SECONDS": 10.0,
        "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": 10.0,
    }
    if extra_body_fields:
        settings["LIVENESS_PROXY_EXTRA_BODY_FIELDS"] = ",".join(extra_body_fields)
    leaks_before = len(log_scan.leaks)
    report = LinkReport()
    started = time.monotonic()
    with (
        make_proxy(proxy_overrides=settings) as proxy,
        proxy.client() as client,
        requests.Session() as session,
    ):
        config = schemathesis.Config()
        # Valid bodies only, alice's key only (from get_call_kwargs), and no links but the document's.
        config.projects.default.generation.update(
            modes=[GenerationMode.POSITIVE], with_security_parameters=False
        )
        config.projects.default.phases.stateful.inference.algorithms = []
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json(), config=config)
        schema.validate()
        workflow = _linked_workflow(schema, proxy, session, report)
        workflow.run(
            settings=hypothesis.settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
                print_blob=False,
            )
        )
        upstream_creates = sum(request.path == UPSTREAM_CREATE_PATH for request in proxy.sandbox.request_log)
    assert schema.statistic.transitions.total == DOCUMENTED_LINKS
    print(
        f"\nstateful: {report.steps} steps in {time.monotonic() - started:.1f} s, "
        f"{len(report.created)} sessions created, {len(report.read_through_link)} read through the link\n"
        + "\n".join(
            f"  {label} {status}: {count} ({report.linked[(label, status)]} through a link)"
            for (label, status), count in sorted(report.statuses.items())
        )
    )
    assert not report.failures, f"{len(report.failures)} failures, the first 20:\n\n" + "\n\n".join(
        report.failures[:20]
    )
    assert not report.leaks, report.leaks[:20]
    assert not log_scan.leaks[leaks_before:], log_scan.leaks[leaks_before:][:20]
    assert report.steps >= STATEFUL_SCENARIOS
    # The chain was walked: a create answered 201 with a token a link carried, and its result read.
    assert report.linked[(CREATE_SESSION, 201)] >= 1
    assert report.read_through_link
    # The refusals (a made-up token, a spent one) never reached Cynopsis.
    assert upstream_creates == len(report.created)


@pytest.mark.parametrize("extra_fields", [(), (EXTRA_BODY_FIELD,)], ids=["declared", "extra-fields"])
def test_the_document_is_valid_openapi_3_1_and_its_links_load(extra_fields: tuple[str, ...]) -> None:
    """The document, with the operator's extra fields or without, against the OpenAPI 3.1 schema
    (the 2022-10-07 one schemathesis bundles, which refuses a link member it does not define, for
    one); and both links resolve to an operation and a parameter or body of it."""
    document = build_openapi(extra_body_fields=extra_fields, extra_response_fields=extra_fields)
    assert document["openapi"].startswith("3.1.")
    config = schemathesis.Config()
    config.projects.default.phases.stateful.inference.algorithms = []
    schema = schemathesis.openapi.from_dict(document, config=config)
    schema.validate()
    schema.as_state_machine()  # raises for a link whose operation or parameter does not exist
    assert schema.statistic.transitions.total == DOCUMENTED_LINKS
