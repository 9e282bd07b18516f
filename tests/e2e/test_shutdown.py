"""SIGTERM on `serve`: stop accepting, let requests in flight finish, flush the audit log, exit 0;
past LIVENESS_PROXY_SHUTDOWN_TIMEOUT_SECONDS, cut what is left and still exit cleanly.

The real command runs as a subprocess in front of the sandbox, made slow with injected latency so
that requests are in flight, provably, when the signal arrives.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.test_serve_limits import HIGH_LIMITS, Serve, running_serve
from liveness_proxy.sandbox import Fault, Sandbox
from liveness_proxy.settings import Settings, settings_from_mapping
from liveness_proxy.store import AuditLog, ChainVerdict, create_engine
from support import TEST_AUDIT_KEYS, ServerThread, subprocess_env, upstream_sandbox

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
IN_FLIGHT = 6
UPSTREAM_DELAY_SECONDS = 3.0


@dataclass
class Upstream:
    sandbox: Sandbox
    url: str


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    sandbox = upstream_sandbox()
    server = ServerThread(sandbox.app, lifespan="off").start()
    yield Upstream(sandbox, server.url)
    server.stop()


@dataclass
class Outcome:
    status: int | None = None
    request_id: str | None = None
    body: dict[str, object] | None = None
    error: str | None = None
    finished_at: float | None = None


def create_session(serve: Serve, session_token: str, outcome: Outcome, request_id: str) -> None:
    try:
        response = httpx.post(
            f"{serve.url}{SESSIONS}",
            headers={**serve.auth, "X-Request-ID": request_id},
            json={"session_token": session_token},
            timeout=60,
        )
        outcome.status = response.status_code
        outcome.request_id = response.headers.get("x-request-id")
        outcome.body = response.json()
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    outcome.finished_at = time.monotonic()


def wait_for_upstream_calls(sandbox: Sandbox, count: int) -> None:
    """Until `count` create-session calls reached the sandbox (which then holds each for its delay)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        arrived = [r for r in sandbox.request_log if r.path.endswith("/liveness_session")]
        if len(arrived) >= count:
            return
        time.sleep(0.01)
    raise AssertionError("the create-session calls did not reach the sandbox")


def wait_until_refused(port: int, timeout: float = 5.0) -> float:
    """The instant a new connection to `port` is refused (the listening socket is closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            return time.monotonic()
        probe.close()
        time.sleep(0.02)
    raise AssertionError("new connections were still accepted after SIGTERM")


def audit_settings(env: dict[str, str]) -> Settings:
    return settings_from_mapping(
        {name: value for name, value in env.items() if name.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))}
    )


def audit_records(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every audit record `serve` left in its database, by request id, read in-process."""

    async def read() -> list[dict[str, Any]]:
        engine = create_engine(audit_settings(env).database_url, pool_size=1)
        try:
            return [record async for record in AuditLog(engine, TEST_AUDIT_KEYS).iterate()]
        finally:
            await engine.dispose()

    return {str(record["request_id"]): record for record in asyncio.run(read())}


def assert_chain_verifies(env: dict[str, str]) -> None:
    async def verify() -> ChainVerdict:
        engine = create_engine(audit_settings(env).database_url, pool_size=1)
        try:
            return await AuditLog(engine, TEST_AUDIT_KEYS).verify()
        finally:
            await engine.dispose()

    verdict = asyncio.run(verify())
    assert verdict.problem is None, verdict.problem
    assert verdict.records > 0


def shutdown_env(upstream: Upstream, folder: Path, shutdown_timeout: float) -> dict[str, str]:
    return subprocess_env(
        upstream.url,
        folder / "proxy.db",
        LIVENESS_PROXY_SHUTDOWN_TIMEOUT_SECONDS=str(shutdown_timeout),
        # The injected upstream delays must not be cut by the proxy's own upstream timeout.
        CYNOPSIS_TIMEOUT_SECONDS="60",
        **HIGH_LIMITS,
    )


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight_and_every_answer_is_audited(
    upstream: Upstream, tmp_path: Path
) -> None:
    sandbox = upstream.sandbox
    env = shutdown_env(upstream, tmp_path, shutdown_timeout=15)
    with running_serve(env, tmp_path) as serve:
        tokens = [
            httpx.post(f"{serve.url}{SESSION_TOKEN}", headers=serve.auth).json()["session_token"]
            for _ in range(IN_FLIGHT)
        ]
        sandbox.inject_fault(
            Fault(
                target="liveness_session",
                kind="latency",
                delay_seconds=UPSTREAM_DELAY_SECONDS,
                count=IN_FLIGHT,
            )
        )
        outcomes = [Outcome() for _ in range(IN_FLIGHT)]
        threads = [
            threading.Thread(target=create_session, args=(serve, token, outcome, f"drain-{index}"))
            for index, (token, outcome) in enumerate(zip(tokens, outcomes, strict=True))
        ]
        for thread in threads:
            thread.start()
        wait_for_upstream_calls(sandbox, IN_FLIGHT)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        refused = wait_until_refused(serve.port)
        for thread in threads:
            thread.join(timeout=60)
        exit_code = serve.process.wait(timeout=30)
        exited = time.monotonic()

    assert [outcome.error for outcome in outcomes] == [None] * IN_FLIGHT
    assert [outcome.status for outcome in outcomes] == [201] * IN_FLIGHT, [o.body for o in outcomes]
    # New connections were refused while the requests were still being answered.
    assert all(outcome.finished_at is not None and refused < outcome.finished_at for outcome in outcomes)
    assert exit_code == 0, serve.output_text()
    assert exited - signalled < 15, "the drain did not end when the last request was answered"
    records = audit_records(env)
    for outcome in outcomes:
        assert outcome.request_id is not None
        record = records[outcome.request_id]
        assert (record["action"], record["status"]) == ("session.create", 201)
        assert outcome.body is not None
        assert record["session_id"] == outcome.body["session_id"]
    assert_chain_verifies(env)


def test_a_request_still_running_at_the_deadline_is_cut_and_the_process_exits(
    upstream: Upstream, tmp_path: Path
) -> None:
    sandbox = upstream.sandbox
    shutdown_timeout = 1.0
    env = shutdown_env(upstream, tmp_path, shutdown_timeout=shutdown_timeout)
    with running_serve(env, tmp_path) as serve:
        token = httpx.post(f"{serve.url}{SESSION_TOKEN}", headers=serve.auth).json()["session_token"]
        # Far longer than the shutdown deadline: only cutting the request lets the process exit.
        sandbox.inject_fault(Fault(target="liveness_session", kind="latency", delay_seconds=30))
        outcome = Outcome()
        thread = threading.Thread(target=create_session, args=(serve, token, outcome, "cut-at-deadline"))
        thread.start()
        wait_for_upstream_calls(sandbox, 1)
        signalled = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        exit_code = serve.process.wait(timeout=20)
        exited = time.monotonic()
        thread.join(timeout=20)

    assert exit_code == 0, serve.output_text()
    assert exited - signalled < shutdown_timeout + 10, "the process waited for the upstream call"
    # The caller is told, as a problem it can retry, under the request id the audit record has.
    assert outcome.status == 503, (outcome.status, outcome.body, outcome.error)
    assert outcome.body is not None
    assert outcome.body["type"] == "urn:liveness-proxy:problem:service-unavailable"
    assert outcome.request_id == "cut-at-deadline"
    record = audit_records(env)["cut-at-deadline"]
    assert (record["action"], record["status"], record["problem"]) == ("session.create", 499, "cancelled")
    assert_chain_verifies(env)
