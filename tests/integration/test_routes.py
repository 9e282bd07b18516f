"""The HTTP API: ownership, input validation, error mapping, request ids and the OpenAPI document."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import pytest

from liveness_proxy.sandbox import Fault
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["type"] == f"urn:liveness-proxy:problem:{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# -- ownership ---------------------------------------------------------------------------------------


def test_another_subject_gets_the_same_404_as_for_an_unknown_session(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    session_id = proxy.create_session(client, proxy.keys.alice)
    calls_before = len(proxy.sandbox.request_log)
    foreign = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.bob))
    unknown = client.get(
        f"{SESSIONS}/00000000-0000-0000-0000-000000000000/result", headers=proxy.auth(proxy.keys.bob)
    )
    assert_problem(foreign, 404, "not-found")
    assert_problem(unknown, 404, "not-found")
    assert foreign.json()["detail"] == unknown.json()["detail"]
    assert len(proxy.sandbox.request_log) == calls_before  # neither reached the upstream


def test_admin_scope_reads_any_session(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client, proxy.keys.alice)
    response = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.admin))
    assert response.status_code == 200
    assert response.json()["session_id"] == session_id


def test_an_upstream_session_id_that_is_already_bound_is_never_rebound(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    # A confused or hostile upstream answers two creates with the same id ("x", from the fault body).
    for key in (proxy.keys.alice, proxy.keys.bob):
        token = client.post(SESSION_TOKEN, headers=proxy.auth(key)).json()["session_token"]
        proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="oversized", size_bytes=100))
        answer = client.post(SESSIONS, headers=proxy.auth(key), json={"session_token": token})
        if key == proxy.keys.alice:
            assert answer.status_code == 201
            assert answer.json()["session_id"] == "x"
        else:
            body = assert_problem(answer, 502, "upstream-malformed")
            assert "already in use" in str(body["detail"])
    proxy.sandbox.reset_log()
    assert_problem(client.get(f"{SESSIONS}/x/result", headers=proxy.auth(proxy.keys.bob)), 404, "not-found")
    assert proxy.upstream_paths() == []  # bob is stopped by the ownership check
    client.get(f"{SESSIONS}/x/result", headers=proxy.auth(proxy.keys.alice))
    assert proxy.upstream_paths() == ["/service/liveness-v2/liveness_result/x"]  # alice still owns it


# -- path injection ----------------------------------------------------------------------------------

INJECTION_IDS = [
    "..",
    "%2e%2e",
    "%2E%2E%2Foauth%2Ftoken",
    "..%2F..%2Foauth%2Ftoken",
    "abc%2F..%2F..%2Fget_session_token",
    "abc%3Fx%3D1",
    "abc%23frag",
    "abc%00",
    "%C3%A9t%C3%A9",
    "a%20b",
    "a" * 129,
    "%252e%252e",
    "abc;x=1",
    "abc%5C..",
]


@pytest.mark.served
@pytest.mark.parametrize("raw_id", INJECTION_IDS)
def test_injected_session_ids_never_reach_another_upstream_path(proxy: ProxyHarness, raw_id: str) -> None:
    with proxy.client() as client:
        client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.admin))  # warm the token
        proxy.sandbox.reset_log()
        url = httpx.URL(proxy.url + f"/v1/liveness/sessions/{raw_id}/result")
        response = client.get(url, headers=proxy.auth(proxy.keys.admin))
    assert response.status_code in (400, 404)
    assert response.headers["content-type"] == "application/problem+json"
    assert proxy.sandbox.request_log == []


@pytest.mark.parametrize(
    "raw_target", ["/v1/liveness/sessions/../session-token/result", "/v1/liveness/sessions/a/b/result"]
)
@pytest.mark.served
def test_raw_dot_segments_are_not_normalised_into_another_route(proxy: ProxyHarness, raw_target: str) -> None:
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=5) as sock:
        request = (
            f"GET {raw_target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.keys.admin}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404)
    assert not [r for r in proxy.sandbox.request_log if "liveness-v2" in r.path]


def test_valid_ids_reach_exactly_the_result_path(proxy: ProxyHarness, client: httpx.Client) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.reset_log()
    client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
    assert proxy.upstream_paths() == [f"/service/liveness-v2/liveness_result/{session_id}"]


# -- bad input -------------------------------------------------------------------------------------


def test_missing_credentials_get_401_with_a_challenge(client: httpx.Client) -> None:
    response = client.post(SESSION_TOKEN)
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer lpk_0000000000000000_" + "x" * 43},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "lpk_zz"},
        {"X-API-Key": "x" * 10000},
    ],
)
def test_wrong_credentials_get_401(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.post(SESSION_TOKEN, headers=headers)
    assert_problem(response, 401, "unauthenticated")
    assert "invalid_token" in response.headers["www-authenticate"] or "Basic" in headers.get(
        "Authorization", ""
    )


def test_x_api_key_header_is_accepted(proxy: ProxyHarness, client: httpx.Client) -> None:
    assert client.post(SESSION_TOKEN, headers={"X-API-Key": proxy.keys.alice}).status_code == 200


def test_two_credentials_in_one_request_are_refused(proxy: ProxyHarness, client: httpx.Client) -> None:
    headers = {**proxy.auth(proxy.keys.alice), "X-API-Key": proxy.keys.bob}
    response = client.post(SESSION_TOKEN, headers=headers)
    assert_problem(response, 401, "unauthenticated")
    assert 'error="invalid_request"' in response.headers["www-authenticate"]


def test_a_revoked_key_stops_working(proxy: ProxyHarness, client: httpx.Client) -> None:
    import asyncio

    from liveness_proxy.store import ApiKeyStore

    assert client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.revocable)).status_code == 200

    async def revoke() -> None:
        async with proxy.database() as engine:
            assert await ApiKeyStore(engine).revoke(proxy.keys.revocable_id, revoked_at=1.0)

    asyncio.run(revoke())
    assert_problem(
        client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.revocable)), 401, "unauthenticated"
    )


@pytest.mark.parametrize(
    ("content", "content_type", "status", "slug"),
    [
        (b"not json", "application/json", 400, "bad-request"),
        (b"[1, 2]", "application/json", 422, "unprocessable-content"),
        (b'"a string"', "application/json", 422, "unprocessable-content"),
        (b'{"session_token": "x"}', "text/plain", 415, "unsupported-media-type"),
        (b'{"session_token": "x"}', None, 415, "unsupported-media-type"),
        (b"", "application/json", 400, "bad-request"),
        (b'{"a": "' + b"x" * 70000 + b'"}', "application/json", 413, "payload-too-large"),
        (b"\xff\xfe{}", "application/json", 400, "bad-request"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "bad-request"),
        (b'{"a":' + b"[" * 300 + b"]" * 300 + b"}", "application/json", 422, "unprocessable-content"),
    ],
)
def test_bad_bodies_get_the_documented_problem(
    proxy: ProxyHarness,
    client: httpx.Client,
    content: bytes,
    content_type: str | None,
    status: int,
    slug: str,
) -> None:
    headers = proxy.auth()
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post(SESSIONS, headers=headers, content=content)
    assert_problem(response, status, slug)
    assert not [r for r in proxy.sandbox.request_log if r.path.endswith("liveness_session")]


@pytest.mark.served  # chunked transfer coding on the wire, parsed by the server
def test_oversized_chunked_body_is_refused_while_reading(proxy: ProxyHarness, client: httpx.Client) -> None:
    def chunks() -> object:
        for _ in range(100):
            yield b"x" * 1024

    headers = {**proxy.auth(), "Content-Type": "application/json"}
    response = client.post(SESSIONS, headers=headers, content=chunks())  # type: ignore[arg-type]
    assert_problem(response, 413, "payload-too-large")


def test_session_token_accepts_an_empty_body(proxy: ProxyHarness, client: httpx.Client) -> None:
    response = client.post(SESSION_TOKEN, headers={**proxy.auth(), "Content-Type": "application/json"})
    assert response.status_code == 200


def test_unknown_route_and_wrong_method_are_problems(client: httpx.Client, proxy: ProxyHarness) -> None:
    assert_problem(client.get("/v1/nope"), 404, "not-found")
    response = client.delete(SESSIONS, headers=proxy.auth())
    assert_problem(response, 405, "method-not-allowed")
    # Every method of the path, though two routes serve it (GET lists, POST creates).
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


# -- upstream faults -------------------------------------------------------------------------------

FAULTS = [
    (Fault(target="session_token", kind="status", status=500), 502, "upstream-unavailable"),
    (Fault(target="session_token", kind="status", status=503), 502, "upstream-unavailable"),
    (Fault(target="session_token", kind="rate_limit", retry_after_seconds=7), 429, "upstream-rate-limited"),
    (Fault(target="session_token", kind="timeout", hang_seconds=5), 504, "upstream-timeout"),
    (Fault(target="session_token", kind="malformed"), 502, "upstream-malformed"),
    (Fault(target="session_token", kind="wrong_content_type"), 502, "upstream-malformed"),
    (Fault(target="session_token", kind="oversized", size_bytes=5 * 1024 * 1024), 502, "upstream-malformed"),
    (Fault(target="session_token", kind="status", status=400), 400, "upstream-rejected"),
    (Fault(target="session_token", kind="status", status=409), 409, "upstream-rejected"),
    (Fault(target="session_token", kind="status", status=302), 502, "upstream-unavailable"),
]


@pytest.mark.parametrize(
    ("fault", "status", "slug"), FAULTS, ids=lambda value: getattr(value, "kind", str(value))
)
def test_upstream_faults_map_to_documented_problems(
    proxy: ProxyHarness, client: httpx.Client, fault: Fault, status: int, slug: str
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200  # token cached
    proxy.sandbox.inject_fault(fault)
    response = client.post(SESSION_TOKEN, headers=proxy.auth())
    body = assert_problem(response, status, slug)
    if fault.kind == "rate_limit":
        assert response.headers["retry-after"] == "7"
    assert "injected" not in str(body["detail"])  # upstream text never passes through
    # The proxy keeps working afterwards.
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200


def test_create_session_with_malformed_answer_is_502_and_binds_nothing(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
    proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="malformed"))
    response = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
    assert_problem(response, 502, "upstream-malformed")
    assert proxy.runtime.ownership._cache == {}


def test_upstream_refusing_connections_is_502(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    # A port with nothing listening: bind, read the port, close.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    overrides = {"CYNOPSIS_API_BASE_URL": f"http://127.0.0.1:{dead_port}"}
    with make_proxy(proxy_overrides=overrides) as running, running.client() as client:
        assert_problem(client.post(SESSION_TOKEN, headers=running.auth()), 502, "upstream-unavailable")
        assert running.sandbox.tokens_issued == 1  # the token endpoint still worked


def test_upstream_404_on_a_bound_session_looks_like_any_other_404(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    session_id = proxy.create_session(client)
    proxy.sandbox.inject_fault(Fault(target="liveness_result", kind="status", status=404))
    upstream_404 = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
    ours = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.bob))
    first, second = assert_problem(upstream_404, 404, "not-found"), assert_problem(ours, 404, "not-found")
    assert (first["title"], first["detail"]) == (second["title"], second["detail"])


def test_upstream_404_on_a_post_is_a_configuration_fault_not_a_404(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=404))
    assert_problem(client.post(SESSION_TOKEN, headers=proxy.auth()), 502, "upstream-unavailable")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"session_id": "abc"}, "abc"),
        ({"sessionId": "abc"}, "abc"),
        ({"session_id": None, "sessionId": "def"}, "def"),
        ({"session_id": "../x"}, None),
        ({"session_id": 42}, None),
        ({"session_id": "a" * 129}, None),
        ({}, None),
    ],
)
def test_session_id_is_taken_from_the_configured_fields_and_validated(
    payload: dict[str, object], expected: str | None
) -> None:
    from liveness_proxy.api.bodies import session_id_from
    from liveness_proxy.errors import UpstreamMalformed

    if expected is None:
        with pytest.raises(UpstreamMalformed):
            session_id_from(payload, ["session_id", "sessionId"], 200)
    else:
        assert session_id_from(payload, ["session_id", "sessionId"], 200) == expected


# -- request ids, health, readiness, OpenAPI ---------------------------------------------------------


def test_request_id_is_taken_when_well_formed_and_generated_otherwise(client: httpx.Client) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers[
        "x-request-id"
    ]
    assert generated != "bad id\twith spaces"
    assert len(generated) == 32
    assert len(client.get("/healthz", headers={"X-Request-ID": "x" * 200}).headers["x-request-id"]) == 32


def test_problem_carries_the_callers_request_id(client: httpx.Client) -> None:
    response = client.post(SESSION_TOKEN, headers={"X-Request-ID": "rid-42"})
    assert response.json()["request_id"] == "rid-42"


def test_health_and_readiness(client: httpx.Client, proxy: ProxyHarness) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = {"store": "ok", "upstream_token": "ok"}
    if proxy.settings.redis_url:
        checks["redis"] = "ok"
    assert ready.json() == {"status": "ready", "checks": checks}


def test_readiness_fails_when_no_token_can_be_had(proxy: ProxyHarness, client: httpx.Client) -> None:
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=100))
    response = client.get("/readyz")
    body = assert_problem(response, 503, "service-unavailable")
    assert body["checks"] == {"store": "ok", "upstream_token": "failed: upstream-token-unavailable"}


def test_openapi_document_covers_every_route(proxy: ProxyHarness, client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    served = {
        (route.path, method.lower()) for route in proxy.app.routes for method in route.methods - {"HEAD"}
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == served
    assert "/v1/liveness/sessions/{session_id}" in document["paths"]
    for name in ("Problem", "SessionTokenResponse", "SessionResponse", "LivenessResult"):
        assert name in document["components"]["schemas"]
    result = document["paths"]["/v1/liveness/sessions/{session_id}/result"]["get"]
    assert {"200", "400", "401", "404", "429", "502", "503", "504"} <= set(result["responses"])


def test_a_post_that_may_have_reached_the_upstream_is_not_retried(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
    proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="timeout", hang_seconds=3))
    proxy.sandbox.reset_log()
    response = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
    assert_problem(response, 504, "upstream-timeout")
    assert [r.path for r in proxy.sandbox.request_log] == ["/service/liveness-v2/liveness_session"]


def test_create_session_answer_without_any_session_id_is_502(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
    # A 200 whose JSON object carries no session id (the fault body is {"error": ..., "message": ...}).
    proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="status", status=200))
    response = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
    assert_problem(response, 502, "upstream-malformed")
    assert "no session id" in response.json()["detail"]
