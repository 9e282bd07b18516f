"""API fuzzing: schemathesis generates requests from the proxy's own OpenAPI document (as served at
/openapi.json) and sends them over real HTTP to the proxy (uvicorn on loopback, every middleware
included) in front of a healthy sandbox upstream, with valid and invalid credentials.

Every answer must be documented (status code, content type, headers, body schema) and must not be a
5xx: the upstream is healthy, so no 5xx has an excuse. Every answer carries X-Request-ID (the
caller's own when well-formed) and X-Content-Type-Options; every error is problem+json naming the
same request id; a valid credential always gets past authentication and an invalid one never does.
Afterwards neither the responses nor the proxy's log may hold a secret. The cases are counted and
the count asserted, so the run fails if generation silently shrinks.

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
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from liveness_proxy.auth import new_api_key
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
LIVENESS_ROUTES = (SESSION_TOKEN, CREATE_SESSION, RESULT, SESSION_RECORD, LIST_SESSIONS)
# Filters whose random values match no session (a random subject, a time in year 312).
NARROWING_FILTERS = ("subject", "reference", "created_after", "created_before")
UPSTREAM_RESULT_PREFIX = "/service/liveness-v2/liveness_result/"
# _known_sessions reads each finished session once: two owners, two finished sessions each.
SETUP_RESULT_READS = 4
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
# form. The sum (2400) is the exact count when Hypothesis runs every campaign to its end.
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
    ("GET /healthz", 200),
    ("GET /readyz", 200),
    ("GET /metrics", 200),
    ("GET /openapi.json", 200),
}


# The response checks the issue asks for; max_response_time and the data-acceptance checks are left
# out: timing is not a correctness property, and a valid credential with random data is refused on
# purpose (an unknown session token is the upstream's 400).
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


@dataclass(frozen=True)
class Variation:
    """What each case adds to what schemathesis generated."""

    credential: Credential
    request_id: str | None
    content_type: str | None
    # A create-session case gets a session token just issued, so it can succeed (201) too.
    fresh_session_token: bool
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
        Credential("api-key-bearer", True, bearer(proxy.keys.alice)),
        Credential("api-key-header", True, {"X-API-Key": proxy.keys.alice}),
        Credential("admin-api-key", True, bearer(proxy.keys.admin)),
        Credential("jwt", True, bearer(_jwt(idp_key, "jwt-user"))),
        Credential("admin-jwt", True, bearer(_jwt(idp_key, "jwt-ops", scope="liveness:admin"))),
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
        fresh_session_token=st.booleans(),
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
        self._prepare(case, mode, variation)
        try:
            response = case.call(base_url=self.proxy.url, session=self.session, timeout=15)
        except requests.RequestException as exc:
            report.failures.append(f"{label} [{credential.name}]: no answer: {type(exc).__name__}: {exc}")
            return
        report.outcomes[(label, response.status_code)] += 1
        if label == SESSION_RECORD and response.status_code == 200 and _refresh_asked(case):
            report.refresh_reads += orjson.loads(response.content)["verdict"] is None
        try:
            case.validate_response(response, checks=list(RESPONSE_CHECKS))
        except FailureGroup as group:
            report.failures.append(f"{label} [{credential.name}]: {group}")
        for broken in self._own_promises(case, response, mode, variation):
            report.failures.append(
                f"{label} [{credential.name}]: {broken} (status {response.status_code})\n"
                f"    {case.as_curl_command()}"
            )
        self._scan(response, label)

    def _prepare(self, case: FuzzCase, mode: GenerationMode, variation: Variation) -> None:
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
            return
        if variation.known_session_id is not None and case.path_parameters:
            case.path_parameters = {"session_id": variation.known_session_id}
        if variation.known_session_id is not None and case.operation.label == LIST_SESSIONS and case.query:
            # Most list cases page through the sessions that exist, by status: random filters match
            # none, and a random cursor is one the list never returned (a 400).
            case.query = {name: value for name, value in case.query.items() if name not in NARROWING_FILTERS}
            if "cursor" in case.query:
                case.query["cursor"] = self.known_cursor
        if (
            variation.fresh_session_token
            and case.operation.label == CREATE_SESSION
            and isinstance(case.body, dict)
        ):
            token = self._fresh_session_token()
            if token is not None:
                case.body["session_token"] = token

    def _fresh_session_token(self) -> str | None:
        """A session token issued to alice now; None when her limit refuses one (429)."""
        answer = self.session.post(
            f"{self.proxy.url}/v1/liveness/session-token", headers=self.proxy.auth(), timeout=15
        )
        if answer.status_code == 429:
            return None
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["session_token"]
        return token

    def _own_promises(
        self, case: FuzzCase, response: schemathesis.Response, mode: GenerationMode, variation: Variation
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
            if not variation.credential.valid and status != 401:
                broken.append("an invalid credential was not refused with 401")
            content_type = variation.content_type
            sent_json = content_type is None or JSON_MEDIA_TYPE.fullmatch(content_type.split(";")[0].strip())
            body_sent = not isinstance(case.body, NotSet)
            # (The rate limit is checked before the body is read.)
            if variation.credential.valid and body_sent and not sent_json and status not in (413, 415, 429):
                broken.append(f"a body sent as {content_type!r} was not refused with 415")
        return broken

    def _scan(self, response: schemathesis.Response, label: str) -> None:
        text = str(response.headers)
        # The one secret the proxy hands out on purpose: a session token, for the frontend SDK.
        if not (label == SESSION_TOKEN and response.status_code == 200):
            text += response.content.decode("utf-8", "replace")
        self.report.leaks += [f"{label}: {leak}" for leak in find_leaks(text)]


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
    run = FuzzRun(
        report=report,
        seconds=time.monotonic() - started,
        upstream_reads=upstream_reads,
        existing_sessions=existing_sessions,
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
    # is an admin): with a healthy upstream, exactly the reads answered 200, the admin's refreshes
    # of sessions without a verdict, and the setup's.
    assert set(run.upstream_reads) <= run.existing_sessions
    assert len(run.upstream_reads) == (
        report.outcomes[(RESULT, 200)] + report.refresh_reads + SETUP_RESULT_READS
    )


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
