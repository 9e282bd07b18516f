"""What goes in and out is what is declared (issue 17, items 2, 3, 4 and 6), through the running
proxy: request bodies checked before anything goes upstream, answers reduced to their allow list,
answers that echo a secret, answer for another session or hand out a session token twice refused,
one credential per request (in library mode too).

The upstream is the sandbox behind a `Tap`: a loopback server that forwards each request to the
sandbox as it came, keeps what the proxy sent (the sandbox's own request log keeps only sizes), and
lets a test rewrite the sandbox's answer to whatever shape a confused or hostile upstream could
send. The pure checks, and the property test of images hidden in answers, are in
unit/test_declared_answers.py."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema_rs
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from integration.test_library_mode import USER_HEADER, gateway_hook
from liveness_proxy.api.openapi import build_openapi
from liveness_proxy.sandbox import SandboxConfig
from services import scratch_redis
from support import CLIENT_SECRET, ProxyHarness, ServerThread, find_leaks, wait_until
from unit.test_declared_answers import JPEG, PNG, leaked_runs

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
UPSTREAM = SandboxConfig()  # the sandbox's paths, which the proxy is configured with
PROBLEM = "urn:liveness-proxy:problem:"
PNG_BASE64 = base64.b64encode(PNG).decode()


# --- a tap in front of the sandbox ----------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One request the proxy sent upstream, and the sandbox's answer to it."""

    endpoint: str  # session_token, create_session, result or other
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    answer: bytes

    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.answer)
        return parsed

    def sent(self) -> Any:
        return orjson.loads(self.body)


# A rewrite turns the sandbox's answer into the one the proxy gets: (status, JSON body).
Rewrite = Callable[[Exchange], tuple[int, bytes]]


def _endpoint(path: str) -> str:
    if path == UPSTREAM.session_token_path:
        return "session_token"
    if path == UPSTREAM.session_path:
        return "create_session"
    if path.startswith(UPSTREAM.result_path_prefix):
        return "result"
    return "other"


@dataclass
class Tap:
    """Forwards every request to `target` (the sandbox), records it with the sandbox's answer, and
    answers with `rewrites[endpoint]` of it when there is one."""

    target: str = ""
    rewrites: dict[str, Rewrite] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)

    def reset(self) -> None:
        self.target = ""
        self.rewrites.clear()
        self.exchanges.clear()

    def sent(self, endpoint: str) -> list[Exchange]:
        return [exchange for exchange in self.exchanges if exchange.endpoint == endpoint]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body, more_body = b"", True
        while more_body:
            message = await receive()
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in (b"host", b"content-length")
        ]
        target = scope["raw_path"].decode("latin-1")
        async with httpx.AsyncClient(base_url=self.target, timeout=5) as upstream:
            answer = await upstream.request(scope["method"], target, headers=headers, content=body)
        exchange = Exchange(
            endpoint=_endpoint(scope["path"]),
            path=scope["path"],
            headers=dict(headers),
            body=body,
            status=answer.status_code,
            answer=answer.content,
        )
        self.exchanges.append(exchange)
        status, content = exchange.status, exchange.answer
        content_type = answer.headers.get("content-type", "application/json").encode()
        rewrite = self.rewrites.get(exchange.endpoint)
        if rewrite is not None:
            status, content = rewrite(exchange)
            content_type = b"application/json"
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
        )
        await send({"type": "http.response.body", "body": content})


def adding(members: dict[str, Any] | Callable[[Exchange], dict[str, Any]]) -> Rewrite:
    """A 2xx answer with `members` added (or replaced); other answers as they were."""

    def rewrite(exchange: Exchange) -> tuple[int, bytes]:
        if not 200 <= exchange.status < 300:
            return exchange.status, exchange.answer
        extra = members(exchange) if callable(members) else members
        return exchange.status, orjson.dumps({**exchange.payload(), **extra})

    return rewrite


def appending_raw(name: str, raw: Callable[[Exchange], str]) -> Rewrite:
    """A 2xx answer with one more string member written as `raw` (JSON escapes and all)."""

    def rewrite(exchange: Exchange) -> tuple[int, bytes]:
        assert exchange.answer.endswith(b"}")
        member = f',"{name}":"{raw(exchange)}"}}'.encode()
        return exchange.status, exchange.answer[:-1] + member

    return rewrite


def answering(status: int, body: dict[str, Any]) -> Rewrite:
    """This answer instead of the sandbox's."""
    return lambda _exchange: (status, orjson.dumps(body))


def escaped(text: str) -> str:
    """`text` written as JSON \\uXXXX escapes only: the same string once decoded, none of its bytes."""
    return "".join(f"\\u{ord(char):04x}" for char in text)


def access_token(exchange: Exchange) -> str:
    return exchange.headers["authorization"].removeprefix("Bearer ")


TappedProxy = Callable[..., AbstractContextManager[tuple[ProxyHarness, Tap]]]


@pytest.fixture(scope="module")
def tap_server() -> Iterator[tuple[Tap, str]]:
    tap = Tap()
    server = ServerThread(tap, lifespan="off").start()
    try:
        yield tap, server.url
    finally:
        server.stop()


@pytest.fixture
def tapped(make_proxy: MakeProxy, tap_server: tuple[Tap, str]) -> TappedProxy:
    """`with tapped(**settings) as (proxy, tap):` a proxy whose liveness calls go through the tap
    to its own sandbox (its access tokens come from the sandbox directly)."""
    tap, url = tap_server

    @contextlib.contextmanager
    def build(**overrides: Any) -> Iterator[tuple[ProxyHarness, Tap]]:
        # Reset on the way in only: a test reads what the tap recorded after the proxy stopped.
        tap.reset()
        with make_proxy(proxy_overrides={"CYNOPSIS_API_BASE_URL": url, **overrides}) as proxy:
            tap.target = proxy.sandbox_url
            yield proxy, tap

    return build


def problem_of(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM + slug
    return body


def audit_row(proxy: ProxyHarness, response: httpx.Response) -> dict[str, Any]:
    [row] = [row for row in proxy.audit_rows() if row["request_id"] == response.headers["x-request-id"]]
    return row


def liveness_calls(proxy: ProxyHarness) -> list[str]:
    """The liveness requests the sandbox received (not the token endpoint's)."""
    return [path for path in proxy.upstream_paths() if path.startswith("/service/")]


def new_token(proxy: ProxyHarness, client: httpx.Client, key: str | None = None) -> str:
    response = client.post(SESSION_TOKEN, headers=proxy.auth(key))
    assert response.status_code == 200, response.text
    token: str = response.json()["session_token"]
    return token


# --- item 2: declared request bodies ----------------------------------------------------------


def test_a_body_outside_its_declaration_is_refused_and_costs_nothing(tapped: TappedProxy) -> None:
    """Refused with a 422 naming the member, before the session token is used, an attempt is
    counted or anything goes upstream; the same token then works, and the one daily attempt too."""
    with tapped(LIVENESS_PROXY_DAILY_ATTEMPTS=1, LIVENESS_PROXY_EXTRA_BODY_FIELDS="note") as (proxy, tap):
        with proxy.client() as client:
            token = new_token(proxy, client)
            tap.exchanges.clear()
            proxy.sandbox.reset_log()
            long_name = "a" * 5000
            refused = {
                "token route, unknown": (SESSION_TOKEN, {"bogus": 1}, '"bogus"'),
                "token route, session_token": (SESSION_TOKEN, {"session_token": token}, '"session_token"'),
                "unknown": (SESSIONS, {"session_token": token, "bogus": 1}, '"bogus"'),
                "case of a known name": (
                    SESSIONS,
                    {"session_token": token, "Session_Token": token},
                    "Session_Token",
                ),
                "long name": (SESSIONS, {"session_token": token, long_name: 1}, '"' + "a" * 64 + '"'),
                "an integer": (SESSIONS, {"session_token": 123}, "'session_token'"),
                "empty": (SESSIONS, {"session_token": ""}, "'session_token'"),
                "4097 characters": (SESSIONS, {"session_token": "t" * 4097}, "'session_token'"),
                "a space": (SESSIONS, {"session_token": token[:8] + " " + token[8:]}, "'session_token'"),
                "a trailing newline": (SESSIONS, {"session_token": token + "\n"}, "'session_token'"),
                "missing": (SESSIONS, {}, "'session_token'"),
                "missing, extra given": (SESSIONS, {"note": "n"}, "'session_token'"),
            }
            answers = {
                name: client.post(route, headers=proxy.auth(), json=body)
                for name, (route, body, _) in refused.items()
            }
            upstream_after_refusals = (list(tap.exchanges), liveness_calls(proxy))
            created = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
            over_limit = client.post(
                SESSIONS, headers=proxy.auth(), json={"session_token": new_token(proxy, client)}
            )
        audit = {row["request_id"]: row for row in proxy.audit_rows()}
    for name, answer in answers.items():
        detail = problem_of(answer, 422, "unprocessable-content")["detail"]
        assert refused[name][2] in detail, (name, detail)
        row = audit[answer.headers["x-request-id"]]
        assert (row["status"], row["problem"], row["upstream_status"]) == (422, "unprocessable-content", None)
    long_detail = answers["long name"].json()["detail"]
    assert "a" * 65 not in long_detail
    assert len(long_detail) < 300
    assert upstream_after_refusals == ([], [])
    assert created.status_code == 201, created.text  # the token was not used, no attempt was counted
    # The one daily attempt was the create above; this one is refused before it goes upstream.
    assert problem_of(over_limit, 429, "rate-limited")["limit"] == "daily_attempts"
    assert len(tap.sent("create_session")) == 1


def test_only_declared_and_allowed_members_go_upstream(tapped: TappedProxy) -> None:
    with tapped(LIVENESS_PROXY_EXTRA_BODY_FIELDS="note,metadata") as (proxy, tap), proxy.client() as client:
        token_answer = client.post(
            SESSION_TOKEN, headers=proxy.auth(), json={"note": "hello", "metadata": {"order": [1, 2]}}
        )
        token = token_answer.json()["session_token"]
        # Duplicate members, spacing, key order: what goes upstream is re-encoded from what was checked.
        raw = (
            b'{ "note": "first", "session_token": "%s", "note": "second", "metadata": null }' % token.encode()
        )
        created = client.post(
            SESSIONS, headers={**proxy.auth(), "Content-Type": "application/json"}, content=raw
        )
        refused = client.post(
            SESSIONS, headers=proxy.auth(), json={"session_token": token, "note": 1, "nickname": "x"}
        )
        sizes = {record.path: record.body_size for record in proxy.sandbox.request_log}
    assert token_answer.status_code == 200, token_answer.text
    assert created.status_code == 201, created.text
    problem_of(refused, 422, "unprocessable-content")
    [token_call] = tap.sent("session_token")
    [create_call] = tap.sent("create_session")
    assert token_call.sent() == {"note": "hello", "metadata": {"order": [1, 2]}}
    assert create_call.body == orjson.dumps({"session_token": token, "note": "second", "metadata": None})
    # The sandbox received exactly those bytes (its log keeps their size).
    assert sizes[UPSTREAM.session_token_path] == len(token_call.body)
    assert sizes[UPSTREAM.session_path] == len(create_call.body)


def test_the_served_document_declares_the_allowed_extra_members(make_proxy: MakeProxy) -> None:
    settings = {
        "LIVENESS_PROXY_EXTRA_BODY_FIELDS": "note,metadata",
        "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "vendor",
    }
    with make_proxy(proxy_overrides=settings) as proxy, proxy.client() as client:
        document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("SessionTokenRequest", "CreateSessionRequest"):
        assert {"note", "metadata"} <= set(schemas[name]["properties"]), name
        assert schemas[name]["additionalProperties"] is False, name
    assert set(schemas["CreateSessionRequest"]["properties"]) == {"session_token", "note", "metadata"}
    assert schemas["CreateSessionRequest"]["required"] == ["session_token"]
    for name in ("SessionTokenResponse", "SessionResponse", "LivenessResult"):
        assert "vendor" in schemas[name]["properties"], name
        assert "note" not in schemas[name]["properties"], name
        assert schemas[name]["additionalProperties"] is False, name
    operations = document["paths"]
    for path, name in ((SESSION_TOKEN, "SessionTokenRequest"), (SESSIONS, "CreateSessionRequest")):
        schema = operations[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{name}"}

    def valid(name: str, body: dict[str, Any]) -> bool:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        return bool(jsonschema_rs.Draft202012Validator(schema).is_valid(body))

    # The document and the proxy's check agree: what one accepts, the other does.
    assert valid("CreateSessionRequest", {"session_token": "sst_a", "note": {"any": 1}})
    assert not valid("CreateSessionRequest", {"session_token": "sst_a", "nickname": 1})
    assert not valid("CreateSessionRequest", {"session_token": "a b"})
    assert not valid("CreateSessionRequest", {"note": 1})
    assert valid("SessionTokenRequest", {"metadata": [1]})
    assert not valid("SessionTokenRequest", {"session_token": "sst_a"})
    # Without the settings, no extra member is declared.
    default = build_openapi()["components"]["schemas"]
    assert set(default["CreateSessionRequest"]["properties"]) == {"session_token"}
    assert (
        "properties" not in default["SessionTokenRequest"] or not default["SessionTokenRequest"]["properties"]
    )
    assert "vendor" not in default["LivenessResult"]["properties"]


# --- item 3: declared answers -------------------------------------------------------------------


def test_undeclared_and_mistyped_answer_members_are_dropped_and_named(tapped: TappedProxy) -> None:
    with tapped() as (proxy, tap), proxy.client() as client:
        tap.rewrites["session_token"] = adding(
            {"trace_id": "t-1", "user": {"face": PNG_BASE64}, "x-debug": 1, "expires_in": -5}
        )
        tap.rewrites["create_session"] = adding({"region": "eu", "status": 7, "selfie": " " + PNG_BASE64})
        tap.rewrites["result"] = adding(
            {
                "liveness_score": 0.93,
                "device": {"os": "ios"},
                "confidence": 150,
                "frames": [PNG_BASE64[i : i + 500] for i in range(0, len(PNG_BASE64), 500)],
                "jpeg": list(JPEG),
            }
        )
        token_answer = client.post(SESSION_TOKEN, headers=proxy.auth())
        token = token_answer.json()["session_token"]
        created = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
        session_id = created.json()["session_id"]
        proxy.sandbox.complete_session(session_id, live=True, confidence=97.0)
        result = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
    assert token_answer.json() == {
        "session_token": token,
        "redacted_fields": ["expires_in", "trace_id", "user", "..."],
    }
    assert created.status_code == 201
    assert created.json() == {
        "session_id": session_id,
        "expires_in": 180,
        "redacted_fields": ["region", "selfie", "status"],
    }
    assert result.json() == {
        "session_id": session_id,
        "status": "SUCCEEDED",
        "redacted_fields": [
            "audit_images",
            "confidence",
            "device",
            "frames",
            "jpeg",
            "liveness_score",
            "reference_image",
        ],
    }
    for response in (token_answer, created, result):
        assert not leaked_runs(response.text)
        assert len(response.content) < 1024


# Session tokens that are images: the token is passed on verbatim (no image heuristic looks at a
# declared member), so the session-token check refuses what opens like one.
IMAGE_TOKENS = {
    "data URI": "data:image/png;base64," + PNG_BASE64,
    "PNG, base64": PNG_BASE64,
    "JPEG, base64": base64.b64encode(JPEG).decode(),
    "JPEG, base64url": base64.urlsafe_b64encode(JPEG).decode(),
}


def test_a_session_token_that_is_an_image_is_no_session_token(tapped: TappedProxy) -> None:
    with tapped() as (proxy, tap), proxy.client() as client:
        answers = {}
        for name, image in IMAGE_TOKENS.items():
            assert len(image) <= 4096  # within the bounds of a token: only its opening gives it away
            tap.rewrites["session_token"] = adding({"session_token": image})
            answers[name] = client.post(SESSION_TOKEN, headers=proxy.auth())
        tap.rewrites.clear()
        fine = client.post(SESSION_TOKEN, headers=proxy.auth())
        audit = {row["request_id"]: row for row in proxy.audit_rows()}
    for name, answer in answers.items():
        problem = problem_of(answer, 502, "upstream-malformed")
        assert "no usable session token" in problem["detail"], name
        row = audit[answer.headers["x-request-id"]]
        assert (row["problem"], row["upstream_status"]) == ("upstream-malformed", 200), name
        assert IMAGE_TOKENS[name][:48] not in answer.text, name
        assert not leaked_runs(answer.text), name
    assert fine.status_code == 200, fine.text


def _added_members(exchange: Exchange) -> dict[str, Any]:
    return {"vendor": {"name": "cyn", "region": "eu"}, "portrait": PNG_BASE64, "other": 1}


# What passes on, per setting: the allow list decides which members may pass at all; the image
# heuristics (and what relaxes them) only which of those allowed keep an image.
RELAXATIONS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "extra members": (
        {"LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "vendor,portrait"},
        {"vendor"},
    ),
    "extra members, biometric allow": (
        {
            "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "vendor,portrait",
            "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS": "portrait",
        },
        {"vendor", "portrait"},
    ),
    "extra members, stripping off": (
        {"LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "vendor,portrait", "LIVENESS_PROXY_STRIP_BIOMETRICS": False},
        {"vendor", "portrait"},
    ),
    "stripping off": ({"LIVENESS_PROXY_STRIP_BIOMETRICS": False}, set()),
    "biometric allow": (
        {"LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS": "reference_image,audit_images,portrait,vendor"},
        set(),
    ),
    "reference_image allowed, stripping off": (
        {"LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "reference_image", "LIVENESS_PROXY_STRIP_BIOMETRICS": False},
        {"reference_image"},
    ),
    # Allowed by the allow list and exempted by name from the heuristics: the deny list
    # (LIVENESS_PROXY_BIOMETRIC_FIELDS) still wins over the exemption.
    "reference_image allowed and exempted": (
        {
            "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "reference_image",
            "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS": "reference_image",
        },
        set(),
    ),
}


@pytest.mark.parametrize("case", sorted(RELAXATIONS))
def test_the_allow_list_comes_before_the_image_heuristics(tapped: TappedProxy, case: str) -> None:
    settings, passed = RELAXATIONS[case]
    with tapped(**settings) as (proxy, tap), proxy.client() as client:
        for endpoint in ("session_token", "create_session", "result"):
            tap.rewrites[endpoint] = adding(_added_members)
        token_answer = client.post(SESSION_TOKEN, headers=proxy.auth())
        created = client.post(
            SESSIONS, headers=proxy.auth(), json={"session_token": token_answer.json()["session_token"]}
        )
        session_id = created.json()["session_id"]
        proxy.sandbox.complete_session(session_id, live=True)
        result = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
        [reference_image, *_] = proxy.sandbox.face_images(session_id)
    added = {"vendor", "portrait", "other"}
    declared = {"session_token", "expires_in", "session_id", "status", "confidence", "redacted_fields"}
    for response, sandbox_members in (
        (token_answer, set()),
        (created, set()),
        (result, {"reference_image", "audit_images"}),
    ):
        assert response.status_code in (200, 201), response.text
        body = response.json()
        offered = added | sandbox_members
        assert set(body) - declared == passed & offered, response.request.url
        assert set(body["redacted_fields"]) == offered - passed, response.request.url
        if "portrait" in passed:
            assert body["portrait"] == PNG_BASE64
        else:
            assert not leaked_runs(response.text)
        if "vendor" in passed:
            assert body["vendor"] == {"name": "cyn", "region": "eu"}
    if "reference_image" in passed:
        assert result.json()["reference_image"]["bytes"] == reference_image
    else:
        assert reference_image not in result.text


# --- item 3: no answer carries a secret of ours -------------------------------------------------


def _echo_body(exchange: Exchange) -> dict[str, Any]:
    return {"echo": exchange.sent()}


def test_an_answer_holding_a_secret_is_refused_and_the_secret_goes_nowhere(tapped: TappedProxy) -> None:
    """The access token (each answer), the client secret, the caller's credential (which the caller
    itself put in a body the upstream echoes): raw or written as JSON escapes, the answer is a 502,
    audited, and none of it reaches the caller, the log or the audit records."""
    outcomes: dict[str, tuple[int, str, str | None, int | None]] = {}
    refusals: list[httpx.Response] = []
    with tapped(LIVENESS_PROXY_EXTRA_BODY_FIELDS="note") as (proxy, tap), proxy.client() as client:
        alice = proxy.auth()
        alice_by_header = {"X-API-Key": proxy.keys.alice}
        sessions = [proxy.create_session(client) for _ in range(2)]

        def attempt(name: str, endpoint: str, rewrite: Rewrite, send: Callable[[], httpx.Response]) -> None:
            tap.rewrites.clear()
            tap.rewrites[endpoint] = rewrite
            response = send()
            tap.rewrites.clear()
            refusals.append(response)
            row = audit_row(proxy, response)
            outcomes[name] = (
                response.status_code,
                response.json()["type"],
                row["problem"],
                row["upstream_status"],
            )

        def create(
            body: dict[str, Any] | None = None, headers: dict[str, str] = alice
        ) -> Callable[[], httpx.Response]:
            def send() -> httpx.Response:
                token = new_token(proxy, client)
                return client.post(SESSIONS, headers=headers, json={"session_token": token, **(body or {})})

            return send

        def token_route(
            body: dict[str, Any] | None = None, headers: dict[str, str] = alice
        ) -> Callable[[], httpx.Response]:
            return lambda: client.post(SESSION_TOKEN, headers=headers, json=body or {})

        def result(session_id: str) -> Callable[[], httpx.Response]:
            return lambda: client.get(f"{SESSIONS}/{session_id}/result", headers=alice)

        echo_token = adding(lambda exchange: {"trace": {"authorization": exchange.headers["authorization"]}})
        attempt("access token, token answer", "session_token", echo_token, token_route())
        attempt("access token, create answer", "create_session", echo_token, create())
        attempt("access token, result", "result", echo_token, result(sessions[0]))
        escaped_token = appending_raw("trace", lambda exchange: escaped(access_token(exchange)))
        attempt("access token escaped, token answer", "session_token", escaped_token, token_route())
        attempt("access token escaped, result", "result", escaped_token, result(sessions[1]))
        attempt("client secret", "session_token", adding({"config": CLIENT_SECRET}), token_route())
        attempt(
            "client secret escaped, create answer",
            "create_session",
            appending_raw("config", lambda _: escaped(CLIENT_SECRET)),
            create(),
        )
        note = {"note": f"my key is {proxy.keys.alice}"}
        attempt("api key echoed, token answer", "session_token", adding(_echo_body), token_route(note))
        attempt(
            "api key echoed, X-API-Key caller",
            "session_token",
            adding(_echo_body),
            token_route(note, alice_by_header),
        )
        attempt("api key echoed, create answer", "create_session", adding(_echo_body), create(note))
        attempt(
            "api key escaped",
            "session_token",
            appending_raw("echo", lambda _: escaped(proxy.keys.alice)),
            token_route(),
        )
        # The same echo without a secret in it: the member is merely dropped.
        harmless = token_route({"note": "nothing secret here"})
        tap.rewrites["session_token"] = adding(_echo_body)
        control = harmless()
        tap.rewrites.clear()
        audit_text = str(proxy.audit_rows())
        log_text = proxy.log_text()
        token_values = {access_token(exchange) for exchange in tap.exchanges}
        seen = "\n".join(f"{response.headers}\n{response.text}" for response in refusals)
        everything = b"\n".join(proxy.responses).decode()
    refused = (502, PROBLEM + "upstream-malformed", "upstream-malformed", 200)
    assert outcomes == dict.fromkeys(outcomes, refused)
    assert len(outcomes) == 11
    assert control.status_code == 200
    assert control.json()["redacted_fields"] == ["echo"]
    for where, text in (("refusals", seen), ("log", log_text), ("audit", audit_text)):
        assert find_leaks(text) == [], where
    # Nor did any other answer the caller got (those hold the caller's own session tokens).
    for where, text in (("responses", everything), ("log", log_text), ("audit", audit_text)):
        for secret in (*token_values, CLIENT_SECRET, proxy.keys.alice):
            assert secret not in text, where
            assert escaped(secret) not in text, where


# Client secrets a test proxy is given instead of the usual one: one that is also a valid upstream
# error code (the one piece of an error answer a caller sees), one with characters JSON escapes.
ODD_SECRETS = {
    "an error code": "lowercase_client_secret_" + "7" * 16,
    "quotes and backslashes": 'quote"and\\backslash-secret-0123',
}


@pytest.mark.parametrize("kind", sorted(ODD_SECRETS))
def test_a_client_secret_of_any_characters_is_refused_in_any_answer(tapped: TappedProxy, kind: str) -> None:
    secret = ODD_SECRETS[kind]
    answers: dict[str, tuple[int, dict[str, Any]]] = {
        "as the error code of a refusal": (400, {"error": secret}),
        "as the session token": (200, {"session_token": secret, "expires_in": 60}),
        "in an allowed member": (200, {"session_token": "sst_fine", "config": {"value": secret}}),
    }
    settings = {"CYNOPSIS_CLIENT_SECRET": secret, "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "config"}
    with tapped(**settings) as (proxy, tap), proxy.client() as client:
        # Before the first call: the proxy fetches its first access token with the first request.
        proxy.sandbox.rotate_client_secret(secret)
        responses = {}
        for name, (status, body) in answers.items():
            tap.rewrites["session_token"] = answering(status, body)
            responses[name] = client.post(SESSION_TOKEN, headers=proxy.auth())
        tap.rewrites["session_token"] = answering(400, {"error": "invalid_request"})
        rejected = client.post(SESSION_TOKEN, headers=proxy.auth())
        rows = {name: audit_row(proxy, response) for name, response in responses.items()}
        log_text = proxy.log_text()
    outcomes = {
        name: (
            response.status_code,
            response.json()["type"],
            rows[name]["problem"],
            rows[name]["upstream_status"],
        )
        for name, response in responses.items()
    }
    assert outcomes == {
        name: (502, PROBLEM + "upstream-malformed", "upstream-malformed", status)
        for name, (status, _body) in answers.items()
    }
    written = orjson.dumps(secret)[1:-1].decode()
    for text in (*(response.text for response in responses.values()), log_text):
        assert secret not in text
        assert written not in text
    # An ordinary error code still reaches the caller.
    assert "invalid_request" in problem_of(rejected, 400, "upstream-rejected")["detail"]


# --- a session token issued twice -----------------------------------------------------------------


@pytest.mark.parametrize("store", ["database", "redis"])
def test_a_session_token_the_upstream_issues_twice_reaches_its_first_holder_only(
    tapped: TappedProxy, store: str
) -> None:
    """Cynopsis answers a second request with the token it gave the first (to another subject, or to
    the same one): the second answer is refused, so the token never has two holders; its first
    holder's binding stands. Bindings in the database (SQLite here) or in Redis."""
    with contextlib.ExitStack() as stack:
        settings = {}
        if store == "redis":
            redis_url, prefix = stack.enter_context(scratch_redis())
            settings = {"LIVENESS_PROXY_REDIS_URL": redis_url, "LIVENESS_PROXY_REDIS_KEY_PREFIX": prefix}
        proxy, tap = stack.enter_context(tapped(**settings))
        client = stack.enter_context(proxy.client())
        first_answers: list[bytes] = []

        def the_first_answer_again(exchange: Exchange) -> tuple[int, bytes]:
            first_answers.append(exchange.answer)
            return exchange.status, first_answers[0]

        tap.rewrites["session_token"] = the_first_answer_again
        alice = client.post(SESSION_TOKEN, headers=proxy.auth())
        to_bob = client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob))
        to_alice_again = client.post(SESSION_TOKEN, headers=proxy.auth())
        tap.rewrites.clear()
        token = alice.json()["session_token"]
        by_bob = client.post(SESSIONS, headers=proxy.auth(proxy.keys.bob), json={"session_token": token})
        by_alice = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
        audit = {row["request_id"]: row for row in proxy.audit_rows()}
    assert alice.status_code == 200, alice.text
    for answer in (to_bob, to_alice_again):
        problem_of(answer, 502, "upstream-malformed")
        assert token not in answer.text
        assert "session_token" not in answer.json()
        row = audit[answer.headers["x-request-id"]]
        assert (row["problem"], row["upstream_status"]) == ("upstream-malformed", 200)
    problem_of(by_bob, 422, "session-token-invalid")
    assert by_alice.status_code == 201, by_alice.text


# --- item 4: answers checked against the question -----------------------------------------------

# The finalizer on, reading at short offsets (as in test_verdict_delivery.py).
FAST_FINALIZER = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6",
    "LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS": 4,
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
}


def test_a_result_for_another_session_is_refused_and_never_becomes_a_verdict(tapped: TappedProxy) -> None:
    settings = {**FAST_FINALIZER, "CYNOPSIS_SESSION_ID_FIELDS": "session_id,sessionId"}
    with tapped(**settings) as (proxy, tap), proxy.client() as client:
        admin = proxy.auth(proxy.keys.admin)
        other = proxy.create_session(client, proxy.keys.bob)
        confused, aliased, mistyped, recased = (proxy.create_session(client) for _ in range(4))
        answers_for: dict[str, dict[str, Any]] = {
            confused: {"session_id": other},
            aliased: {"sessionId": other},  # the configured alias says another session
            mistyped: {"session_id": 12345},
            recased: {"session_id": recased.upper()},
        }

        def wrong_answers(exchange: Exchange) -> dict[str, Any]:
            return answers_for.get(exchange.path.rsplit("/", 1)[-1], {})

        tap.rewrites["result"] = adding(wrong_answers)
        for session_id in answers_for:
            proxy.sandbox.complete_session(session_id, live=True, confidence=99.0)
        reads = {
            session_id: client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
            for session_id in answers_for
        }
        refresh = client.get(f"{SESSIONS}/{confused}", params={"refresh": "true"}, headers=admin)

        def finalizer_reads(session_id: str) -> int:
            return sum(
                exchange.headers.get("x-request-id", "").startswith("fin-")
                and exchange.path.endswith(session_id)
                for exchange in tap.sent("result")
            )

        # The finalizer has read each session's (terminal) result twice since, and recorded nothing.
        wait_until(lambda: all(finalizer_reads(session_id) >= 2 for session_id in answers_for))
        records = {
            session_id: client.get(f"{SESSIONS}/{session_id}", headers=admin).json()
            for session_id in answers_for
        }
        # The upstream answers for the right session again: the finalizer's next read records it (so
        # the records above were read when a verdict would have shown).
        del answers_for[confused]
        wait_until(lambda: client.get(f"{SESSIONS}/{confused}", headers=admin).json()["verdict"] is not None)
        healed = client.get(f"{SESSIONS}/{confused}", headers=admin).json()
        audit = {row["request_id"]: row for row in proxy.audit_rows()}
    for session_id, read in reads.items():
        problem_of(read, 502, "upstream-malformed")
        row = audit[read.headers["x-request-id"]]
        assert (row["action"], row["problem"], row["upstream_status"]) == (
            "result.read",
            "upstream-malformed",
            200,
        )
        assert records[session_id]["verdict"] is None, session_id
    problem_of(refresh, 502, "upstream-malformed")
    assert healed["verdict"]["status"] == "SUCCEEDED"
    assert healed["verdict"]["request_id"].startswith("fin-")


# --- item 6: one identity per request -----------------------------------------------------------


@pytest.mark.served  # the headers as sent over the wire, parsed by the server
def test_a_repeated_credential_header_is_refused_whatever_the_order(make_proxy: MakeProxy) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        alice, bob = proxy.keys.alice, proxy.keys.bob
        session_id = proxy.create_session(client)
        proxy.sandbox.reset_log()
        cases: dict[str, list[tuple[str, str]]] = {
            "Authorization twice, same": [("Authorization", f"Bearer {alice}")] * 2,
            "Authorization twice, alice then bob": [
                ("Authorization", f"Bearer {alice}"),
                ("Authorization", f"Bearer {bob}"),
            ],
            "Authorization twice, bob then alice": [
                ("Authorization", f"Bearer {bob}"),
                ("Authorization", f"Bearer {alice}"),
            ],
            "Authorization twice, junk first": [
                ("Authorization", "Bearer junk"),
                ("Authorization", f"Bearer {alice}"),
            ],
            "Authorization twice, junk last": [
                ("Authorization", f"Bearer {alice}"),
                ("Authorization", "Bearer junk"),
            ],
            "Authorization twice, other spelling": [
                ("authorization", f"Bearer {alice}"),
                ("AUTHORIZATION", f"Bearer {alice}"),
            ],
            "X-API-Key twice, same": [("X-API-Key", alice)] * 2,
            "X-API-Key twice, alice then bob": [("X-API-Key", alice), ("X-API-Key", bob)],
            "X-API-Key twice, bob then alice": [("X-API-Key", bob), ("X-API-Key", alice)],
            "X-API-Key twice, junk first": [("X-API-Key", "junk"), ("X-API-Key", alice)],
            "one of each": [("Authorization", f"Bearer {alice}"), ("X-API-Key", alice)],
            "one of each, X-API-Key first": [("X-API-Key", bob), ("Authorization", f"Bearer {alice}")],
            # What a front proxy that merges repeated headers would pass on: one value, no identity.
            "Authorization, merged": [("Authorization", f"Bearer {alice}, Bearer {bob}")],
            "X-API-Key, merged": [("X-API-Key", f"{alice}, {bob}")],
        }
        routes: list[tuple[str, str]] = [
            ("POST", SESSION_TOKEN),
            ("GET", f"{SESSIONS}/{session_id}/result"),
            ("GET", f"{SESSIONS}/{session_id}"),
        ]
        statuses = {
            (name, path): client.request(method, path, headers=headers).status_code
            for name, headers in cases.items()
            for method, path in routes
        }
        refused = client.post(SESSION_TOKEN, headers=cases["X-API-Key twice, alice then bob"])
        upstream = liveness_calls(proxy)
        single = {
            "Authorization": client.post(
                SESSION_TOKEN, headers=[("Authorization", f"Bearer {alice}")]
            ).status_code,
            "X-API-Key": client.post(SESSION_TOKEN, headers=[("X-API-Key", alice)]).status_code,
        }
    assert statuses == dict.fromkeys(statuses, 401)
    assert upstream == []
    assert single == {"Authorization": 200, "X-API-Key": 200}
    assert problem_of(refused, 401, "unauthenticated")["detail"].startswith("Send one credential, once")
    assert 'error="invalid_request"' in refused.headers["www-authenticate"]


def test_in_library_mode_a_repeated_credential_header_is_refused_though_the_host_would_accept(
    make_proxy: MakeProxy,
) -> None:
    """The host's hook speaks first, and would accept each request below on its own header; the
    repeated credential header is refused before it is asked."""
    with make_proxy(app_options={"authenticate_caller": gateway_hook}) as proxy, proxy.client() as client:
        alice, bob = proxy.keys.alice, proxy.keys.bob
        host_user = (USER_HEADER, "zoe")
        cases: dict[str, list[tuple[str, str]]] = {
            "Authorization twice": [host_user, ("Authorization", f"Bearer {alice}")] * 2,
            "Authorization, alice then bob": [
                host_user,
                ("Authorization", f"Bearer {alice}"),
                ("Authorization", f"Bearer {bob}"),
            ],
            "X-API-Key twice": [host_user, ("X-API-Key", alice), ("X-API-Key", alice)],
            "X-API-Key, junk then alice": [host_user, ("X-API-Key", "junk"), ("X-API-Key", alice)],
        }
        refused = {name: client.post(SESSION_TOKEN, headers=headers) for name, headers in cases.items()}
        upstream = liveness_calls(proxy)
        host_only = client.post(SESSION_TOKEN, headers=[host_user])
        host_and_one_key = client.post(SESSION_TOKEN, headers=[host_user, ("X-API-Key", alice)])
        zoe = audit_row(proxy, host_and_one_key)["subject"]
    for name, answer in refused.items():
        problem = problem_of(answer, 401, "unauthenticated")
        assert problem["detail"].startswith("Send one credential, once"), name
    assert upstream == []
    assert host_only.status_code == host_and_one_key.status_code == 200
    assert zoe == "zoe"  # the host's identity, as before: only the repeat is refused
