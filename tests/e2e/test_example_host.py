"""examples/fastapi_host, run as its README says: `uvicorn examples.fastapi_host.app:create_host_app
--factory` in a subprocess, against the sandbox upstream on loopback, with SQLite in tmp_path.

The host's users log in with its own cookie; the mounted proxy binds sessions to them, audits their
calls under their names, and refuses forged cookies and cross-site (header-less) POSTs. The proxy's
own API keys keep working beside the cookie."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from starlette.requests import HTTPConnection

from e2e.test_cli import free_port, run
from e2e.test_serve_limits import HIGH_LIMITS, issue_key, wait_ready
from liveness_proxy import ADMIN_SCOPE, Caller, Unauthenticated
from liveness_proxy.sandbox import ManualClock, Sandbox
from support import (
    CLIENT_SECRET,
    TEST_PEPPER,
    ServerThread,
    background_command,
    find_leaks,
    subprocess_env,
    upstream_sandbox,
)

pytestmark = pytest.mark.slow  # the example host in a subprocess per test

REPO = Path(__file__).resolve().parents[2]
# As README.md runs it (uvicorn's own access log off: it would log session ids in paths).
HOST_COMMAND = [
    str(Path(sys.executable).parent / "uvicorn"),
    "examples.fastapi_host.app:create_host_app",
    "--factory",
    "--no-access-log",
]
PREFIX = "/liveness"
SESSION_TOKEN = f"{PREFIX}/v1/liveness/session-token"
SESSIONS = f"{PREFIX}/v1/liveness/sessions"
COOKIE = "host_session"
CSRF = {"X-Requested-With": "liveness"}
# The demo users' passwords, as examples/fastapi_host/README.md documents them.
PASSWORDS = {"alice": "alice-demo-password", "bob": "bob-demo-password", "auditor": "auditor-demo-password"}
PNG_SIGNATURE = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()[:10]


@dataclass
class Host:
    """The example host in its subprocess, its sandbox upstream, and every response it gave."""

    url: str
    sandbox: Sandbox
    sandbox_url: str
    env: dict[str, str]
    api_key: str
    output: Path
    # Each response as (headers without Set-Cookie, body), for the leak scans.
    captured: list[str] = field(default_factory=list)

    def client(self) -> httpx.Client:
        def keep(response: httpx.Response) -> None:
            response.read()
            headers = {k: v for k, v in response.headers.items() if k.lower() != "set-cookie"}
            self.captured.append(f"{headers}\n{response.text}")

        return httpx.Client(base_url=self.url, event_hooks={"response": [keep]}, timeout=10)

    @contextlib.contextmanager
    def login(self, username: str) -> Iterator[httpx.Client]:
        """A client holding `username`'s host session cookie."""
        with self.client() as client:
            answer = client.post(
                "/login", headers=CSRF, json={"username": username, "password": PASSWORDS[username]}
            )
            assert answer.status_code == 200, answer.text
            assert client.cookies.get(COOKIE)
            yield client

    def create_session(self, client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
        """Session token, then session, through the mounted proxy; the 201 answer."""
        headers = headers or CSRF
        token = client.post(SESSION_TOKEN, headers=headers)
        assert token.status_code == 200, token.text
        created = client.post(
            SESSIONS, headers=headers, json={"session_token": token.json()["session_token"]}
        )
        assert created.status_code == 201, created.text
        return created

    def complete(self, session_id: str) -> None:
        """Through the sandbox's control API, as an operator of the sandbox would."""
        answer = httpx.post(
            f"{self.sandbox_url}/_sandbox/sessions/{session_id}/complete",
            json={"outcome": "live"},
            timeout=10,
        )
        assert answer.status_code < 300, answer.text

    def log_text(self) -> str:
        return self.output.read_text(errors="replace")

    def audit_records(self) -> list[dict[str, Any]]:
        exported = run(self.env, "audit", "export", "--format", "jsonl")
        assert exported.returncode == 0, exported.stderr
        return [json.loads(line) for line in exported.stdout.splitlines()]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    folder = tmp_path_factory.mktemp("example-host")
    sandbox = upstream_sandbox()
    sandbox_server = ServerThread(sandbox.app, lifespan="off").start()
    env = subprocess_env(sandbox_server.url, folder / "host.db", **HIGH_LIMITS)
    # A server-to-server caller's key (this also migrates the database before the host starts).
    api_key = issue_key(env, "backoffice")
    port = free_port()
    output = folder / "host.log"
    url = f"http://127.0.0.1:{port}"
    try:
        with background_command(
            [*HOST_COMMAND, "--host", "127.0.0.1", "--port", str(port)], env=env, output=output, cwd=REPO
        ) as process:
            try:
                wait_ready(f"{url}{PREFIX}", process)
            except AssertionError:
                raise AssertionError(output.read_text(errors="replace")) from None
            yield Host(
                url=url,
                sandbox=sandbox,
                sandbox_url=sandbox_server.url,
                env=env,
                api_key=api_key,
                output=output,
            )
    finally:
        sandbox_server.stop()
    text = output.read_text(errors="replace")
    # uvicorn shuts down gracefully, then ends itself with the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert api_key not in text
    assert not find_leaks(text), find_leaks(text)


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert len(problem["request_id"]) == 32
    return problem


def test_alice_runs_a_check_with_only_her_host_cookie(host: Host) -> None:
    with host.login("alice") as alice:
        login_cookie = next(c for c in alice.cookies.jar if c.name == COOKIE)
        created = host.create_session(alice)
        session_id = created.json()["session_id"]
        pending = alice.get(f"{SESSIONS}/{session_id}/result")
        host.complete(session_id)
        result = alice.get(created.headers["location"])
        me = alice.get("/me")

    assert "Authorization" not in created.request.headers
    # The cookie: HttpOnly, SameSite=Strict, for the whole site; not Secure over plain http.
    assert login_cookie.has_nonstandard_attr("HttpOnly")
    assert login_cookie.get_nonstandard_attr("SameSite") == "strict"
    assert login_cookie.path == "/"
    assert not login_cookie.secure
    assert created.headers["location"] == f"{PREFIX}/v1/liveness/sessions/{session_id}/result"
    assert pending.status_code == 200
    assert pending.json()["status"] != "SUCCEEDED"
    assert result.status_code == 200, result.text
    payload = result.json()
    assert payload["status"] == "SUCCEEDED"
    assert payload["session_id"] == session_id
    # The sandbox answered with face images; none reaches the browser.
    assert not {"reference_image", "audit_images"} & payload.keys()
    assert set(payload["redacted_fields"]) >= {"reference_image", "audit_images"}
    assert PNG_SIGNATURE not in result.text
    assert me.json() == {"user_id": "alice", "display_name": "Alice", "roles": [], "liveness_admin": False}


def test_another_user_gets_404_and_the_auditor_reads_it(host: Host) -> None:
    with host.login("alice") as alice, host.login("bob") as bob, host.login("auditor") as auditor:
        session_id = host.create_session(alice).json()["session_id"]
        host.complete(session_id)
        by_bob = bob.get(f"{SESSIONS}/{session_id}/result")
        by_auditor = auditor.get(f"{SESSIONS}/{session_id}/result")
        record = auditor.get(f"{SESSIONS}/{session_id}")
        record_by_bob = bob.get(f"{SESSIONS}/{session_id}")
        auditor_me = auditor.get("/me").json()

    problem = _problem(by_bob, 404)
    assert problem["type"].endswith(":not-found")
    assert session_id not in by_bob.text
    assert by_auditor.status_code == 200, by_auditor.text
    assert by_auditor.json()["status"] == "SUCCEEDED"
    assert record.status_code == 200, record.text
    assert record.json()["subject"] == "alice"
    _problem(record_by_bob, 403)
    assert auditor_me["roles"] == ["admin"]
    assert auditor_me["liveness_admin"] is True
    assert ADMIN_SCOPE == "liveness:admin"


def test_no_credential_a_forged_cookie_or_a_logged_out_one_is_401(host: Host) -> None:
    with host.client() as anonymous, host.login("alice") as alice:
        nothing = anonymous.post(SESSION_TOKEN, headers=CSRF)
        forged = anonymous.post(SESSION_TOKEN, headers={**CSRF, "Cookie": f"{COOKIE}=forged-{'x' * 40}"})
        forged_read = anonymous.get(f"{SESSIONS}/abc/result", headers={"Cookie": f"{COOKIE}=forged"})
        old_cookie = alice.cookies[COOKIE]
        before = alice.post(SESSION_TOKEN, headers=CSRF)
        logout_without_header = alice.post("/logout")
        logged_out = alice.post("/logout", headers=CSRF)
        replayed = anonymous.post(SESSION_TOKEN, headers={**CSRF, "Cookie": f"{COOKIE}={old_cookie}"})
        me_after = anonymous.get("/me", headers={"Cookie": f"{COOKIE}={old_cookie}"})
        me_anonymous = anonymous.get("/me")

    assert _problem(nothing, 401)["type"].endswith(":unauthenticated")
    assert nothing.headers["www-authenticate"].startswith("Bearer")
    assert "log in again" in _problem(forged, 401)["detail"]
    _problem(forged_read, 401)
    assert before.status_code == 200
    assert logout_without_header.status_code == 403
    assert logged_out.status_code == 204
    assert "log in again" in _problem(replayed, 401)["detail"]
    assert me_after.status_code == 401
    assert me_anonymous.status_code == 401


def test_cookie_posts_need_the_csrf_header_and_the_own_origin(host: Host) -> None:
    with host.login("alice") as alice:
        without_header = alice.post(SESSION_TOKEN)
        wrong_value = alice.post(SESSION_TOKEN, headers={"X-Requested-With": "XMLHttpRequest"})
        other_origin = alice.post(SESSION_TOKEN, headers={**CSRF, "Origin": "https://evil.example"})
        own_origin = alice.post(SESSION_TOKEN, headers={**CSRF, "Origin": host.url})
        login_without_header = alice.post(
            "/login", json={"username": "alice", "password": PASSWORDS["alice"]}
        )
        created = host.create_session(alice)
        # Reads change nothing: a GET needs no header.
        read = alice.get(created.headers["location"])

    for refused in (without_header, wrong_value, other_origin):
        assert _problem(refused, 403)["type"].endswith(":forbidden")
    assert "X-Requested-With" in without_header.json()["detail"]
    assert own_origin.status_code == 200, own_origin.text
    assert login_without_header.status_code == 403
    assert read.status_code == 200


def test_the_proxys_own_api_key_works_beside_the_cookie(host: Host) -> None:
    bearer = {"Authorization": f"Bearer {host.api_key}"}
    with host.client() as backoffice, host.login("alice") as alice:
        # No cookie, so the hook steps aside and the API key decides; no CSRF header needed.
        own = host.create_session(backoffice, headers=bearer).json()["session_id"]
        alices = host.create_session(alice).json()["session_id"]
        own_read = backoffice.get(f"{SESSIONS}/{own}/result", headers=bearer)
        alices_by_backoffice = backoffice.get(f"{SESSIONS}/{alices}/result", headers=bearer)
        backoffice_by_alice = alice.get(f"{SESSIONS}/{own}/result")
        wrong_key = backoffice.post(SESSION_TOKEN, headers={"Authorization": f"Bearer {host.api_key}x"})

    assert own_read.status_code == 200
    _problem(alices_by_backoffice, 404)
    _problem(backoffice_by_alice, 404)
    _problem(wrong_key, 401)


def test_the_audit_log_names_the_host_user_and_the_cookie_credential(host: Host) -> None:
    with host.login("alice") as alice:
        token = alice.post(SESSION_TOKEN, headers=CSRF)
        created = alice.post(SESSIONS, headers=CSRF, json={"session_token": token.json()["session_token"]})
        session_id = created.json()["session_id"]
        host.complete(session_id)
        result = alice.get(created.headers["location"])
        refused = alice.post(SESSION_TOKEN)
    request_ids = [answer.headers["x-request-id"] for answer in (token, created, result, refused)]

    by_request = {record["request_id"]: record for record in host.audit_records()}
    mine = [by_request[request_id] for request_id in request_ids]
    assert [record["action"] for record in mine] == [
        "session_token.create",
        "session.create",
        "result.read",
        "session_token.create",
    ]
    assert [record["status"] for record in mine] == [200, 201, 200, 403]
    for record in mine[:3]:
        assert record["subject"] == "alice"
        assert record["credential_id"] == "host-session"
    assert mine[1]["session_id"] == mine[2]["session_id"] == session_id
    # The CSRF refusal came before any identity was accepted.
    assert mine[3]["subject"] is None
    assert mine[3]["problem"] == "forbidden"
    verified = run(host.env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_js_client_and_the_hosts_own_routes_are_served(host: Host) -> None:
    with host.client() as browser:
        script = browser.get(f"{PREFIX}/client/liveness-proxy-client.js")
        health = browser.get(f"{PREFIX}/healthz")
        openapi = browser.get(f"{PREFIX}/openapi.json")
        wrong_password = browser.post("/login", headers=CSRF, json={"username": "alice", "password": "nope"})
        unknown_user = browser.post("/login", headers=CSRF, json={"username": "mallory", "password": "x"})
        assert not browser.cookies
    with host.login("bob") as bob:
        me = bob.get("/me")

    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "LivenessProxyClient" in script.text
    assert health.json() == {"status": "ok"}
    assert "/v1/liveness/session-token" in openapi.json()["paths"]
    assert wrong_password.status_code == unknown_user.status_code == 401
    assert wrong_password.json() == unknown_user.json()
    assert me.status_code == 200
    assert me.json()["user_id"] == "bob"
    assert me.headers["cache-control"] == "no-store"


def test_no_response_or_log_line_holds_a_secret_a_cookie_a_password_or_a_face(host: Host) -> None:
    first = len(host.captured)
    issued_tokens: list[str] = []
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(host.login(name)) for name in PASSWORDS}
        alice = clients["alice"]
        token = alice.post(SESSION_TOKEN, headers=CSRF).json()["session_token"]
        issued_tokens.append(token)
        session_id = alice.post(SESSIONS, headers=CSRF, json={"session_token": token}).json()["session_id"]
        host.complete(session_id)
        for name in ("alice", "bob", "auditor"):
            clients[name].get(f"{SESSIONS}/{session_id}/result")
            clients[name].get(f"{SESSIONS}/{session_id}")
            clients[name].get("/me")
        alice.post(SESSION_TOKEN)
        host.sandbox.revoke_tokens()  # the proxy refreshes its access token: two tokens to look for
        issued_tokens.append(alice.post(SESSION_TOKEN, headers=CSRF).json()["session_token"])
        cookies = {client.cookies[COOKIE] for client in clients.values()}

    access_tokens = {
        record.headers["authorization"].removeprefix("Bearer ")
        for record in host.sandbox.request_log
        if "authorization" in record.headers
    }
    assert len(access_tokens) >= 2
    assert len(cookies) == 3
    forbidden = {CLIENT_SECRET, TEST_PEPPER, host.api_key, *access_tokens, *cookies, *PASSWORDS.values()}
    responses = "\n".join(host.captured[first:])
    assert "SUCCEEDED" in responses  # the capture really holds the answers
    logs = host.log_text()
    assert '"event":"request"' in logs
    for where, text in {"responses": responses, "logs": logs}.items():
        for secret in forbidden:
            assert secret not in text, f"a secret leaked into {where}"
        assert PNG_SIGNATURE not in text, f"a face image leaked into {where}"
    # The proxy logs route templates; with uvicorn's access log off, no session id is logged at all.
    assert session_id not in logs
    # Session tokens are the answer of the session-token route; anything else secret-shaped is a leak.
    for token in issued_tokens:
        responses = responses.replace(token, "<session token>")
    assert find_leaks(responses) == []
    assert find_leaks(logs) == []


def _load_example() -> ModuleType:
    """The example's module, loaded from its file (the repository root is not on the test path)."""
    spec = importlib.util.spec_from_file_location(
        "example_fastapi_host_app", REPO / "examples" / "fastapi_host" / "app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def test_an_idle_or_too_old_host_session_is_refused_by_the_hook() -> None:
    """Expiry needs a clock the test can move: the hook and its session store, in-process."""
    example = _load_example()
    clock = ManualClock()
    sessions = example.SessionStore(clock=clock.now)
    hook = example.cookie_authentication(sessions)

    def call(token: str, method: str = "GET", headers: dict[str, str] | None = None) -> Caller | None:
        raw = [(b"cookie", f"{COOKIE}={token}".encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        scope = {"type": "http", "method": method, "path": "/", "headers": raw, "scheme": "http"}
        caller: Caller | None = asyncio.run(hook(HTTPConnection(scope)))
        return caller

    idle = sessions.create("alice")
    busy = sessions.create("auditor")
    alice = Caller(subject="alice", scopes=frozenset(), credential_id="host-session")
    assert call(idle) == alice
    for _ in range(example.SESSION_MAX_SECONDS // example.SESSION_IDLE_SECONDS):
        clock.advance(example.SESSION_IDLE_SECONDS - 1)
        assert call(busy) == Caller("auditor", frozenset({ADMIN_SCOPE}), "host-session")
    with pytest.raises(Unauthenticated):
        call(idle)
    clock.advance(example.SESSION_IDLE_SECONDS - 1)
    with pytest.raises(Unauthenticated):
        call(busy)  # used all along, but older than SESSION_MAX_SECONDS
    fresh = sessions.create("alice")
    assert call(fresh, "POST", CSRF) == alice
    assert len(sessions._sessions) == 1  # the expired ones were dropped
