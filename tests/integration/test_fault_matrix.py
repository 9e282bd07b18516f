"""The fault matrix of docs/reliability.md: one test per row that no other test proves completely.

Each test injects one fault into a real proxy in front of a real sandbox and checks the row's three
columns: what the caller sees (status, problem type, Retry-After), the signal (the log event and
the /metrics value an operator would alert on), and the recovery (the fault ends, and the same
process serves again without a restart). Rows proved elsewhere name their tests in the document.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool

from liveness_proxy.sandbox import Fault
from liveness_proxy.store import AuditLog, PoolOptions, create_engine
from services import scratch_postgres
from support import CLIENT_SECRET, TEST_AUDIT_KEYS, ProxyHarness, ServerThread

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
PROBLEM = "urn:liveness-proxy:problem:"
# The sandbox's access token lifetime (its default).
SANDBOX_TOKEN_LIFETIME = 28800
# A short open interval, so that waiting it out costs the suite little. The breaker times it by the
# real clock (a test's manual clock standing still would keep it open), so the tests sleep it out.
OPEN_SECONDS = 0.5


# -- helpers -------------------------------------------------------------------------------------------


def problem(
    response: httpx.Response, status: int, slug: str, retry_after: str | None = None
) -> dict[str, Any]:
    """Asserts a problem+json answer with the request id; `retry_after`: the exact header expected."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM + slug
    assert body["request_id"] == response.headers["x-request-id"]
    assert "injected" not in body["detail"]  # upstream text never reaches the caller
    if retry_after is not None:
        assert response.headers.get("retry-after") == retry_after
    return body


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def audit_record(proxy: ProxyHarness, request_id: str) -> dict[str, Any]:
    [record] = [record for record in proxy.audit_rows() if record["request_id"] == request_id]
    return record


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def closed_port() -> int:
    """A loopback port with nothing listening (bound, read, closed); the test serves on it later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving_on(port: int, app: Any) -> Iterator[None]:
    """Serves `app` on `port` for the block: the upstream that refused connections is back."""
    server = ServerThread(app, lifespan="off")
    server.server.config.port = port
    server.start()
    try:
        yield
    finally:
        server.stop()


def ask_session_token(
    client: httpx.Client, proxy: ProxyHarness, request_id: str | None = None
) -> httpx.Response:
    """POST /v1/liveness/session-token as alice: the cheapest call that needs the liveness API."""
    headers = proxy.auth() | ({"X-Request-ID": request_id} if request_id else {})
    return client.post(SESSION_TOKEN, headers=headers)


def wait_until_served_again(client: httpx.Client, proxy: ProxyHarness) -> None:
    """Past the token failure backoff, the next request starts one token request in the background
    (that request itself is still answered 503); once it has succeeded, callers are served."""
    proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 0.1)
    ask_session_token(client, proxy)
    wait_for(lambda: proxy.runtime.tokens.cached is not None)
    assert ask_session_token(client, proxy).status_code == 200


# -- the liveness API ----------------------------------------------------------------------------------


def test_upstream_refusing_connections_is_502_until_it_listens_again(make_proxy: MakeProxy) -> None:
    port = closed_port()
    overrides = {"CYNOPSIS_API_BASE_URL": f"http://127.0.0.1:{port}"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        refused = ask_session_token(client, proxy, "refused-1")
        problem(refused, 502, "upstream-unavailable")
        assert proxy.access_line("refused-1")["upstream_status"] is None
        assert metric(client, "liveness_proxy_upstream_requests_total", outcome="connect_error") == 1
        assert audit_record(proxy, "refused-1")["problem"] == "upstream-unavailable"
        # The same sandbox (its tokens stay valid) starts listening on that port: served at once.
        with serving_on(port, proxy.sandbox.app):
            assert ask_session_token(client, proxy).status_code == 200


UPSTREAM_FAULTS = [
    # (fault, status, problem type, outcome label on liveness_proxy_upstream_requests_total, the
    # upstream status in the access log and audit record: None when no answer arrived)
    pytest.param(Fault(target="session_token", kind="timeout", hang_seconds=5), 504, "upstream-timeout",
                 "timeout", None, id="hangs"),
    pytest.param(Fault(target="session_token", kind="reset"), 502, "upstream-unavailable",
                 "connection_error", None, id="resets-mid-body"),
    pytest.param(Fault(target="session_token", kind="garbage"), 502, "upstream-unavailable",
                 "connection_error", None, id="not-http"),
    pytest.param(Fault(target="session_token", kind="malformed"), 502, "upstream-malformed",
                 "malformed", 200, id="malformed-json"),
    pytest.param(Fault(target="session_token", kind="oversized"), 502, "upstream-malformed",
                 "malformed", 200, id="10-mb-body"),
    pytest.param(Fault(target="session_token", kind="wrong_content_type"), 502, "upstream-malformed",
                 "malformed", 200, id="wrong-content-type"),
    pytest.param(Fault(target="session_token", kind="status", status=503), 502, "upstream-unavailable",
                 "503", 503, id="5xx"),
    pytest.param(Fault(target="session_token", kind="status", status=302), 502, "upstream-unavailable",
                 "302", 302, id="3xx"),
    pytest.param(Fault(target="session_token", kind="status", status=404), 502, "upstream-unavailable",
                 "404", 404, id="404-on-a-post"),
    pytest.param(Fault(target="session_token", kind="status", status=409), 409, "upstream-rejected",
                 "409", 409, id="4xx"),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "status", "slug", "outcome", "upstream_status"), UPSTREAM_FAULTS)
def test_an_upstream_fault_is_answered_signalled_and_recovered_from(
    make_proxy: MakeProxy, fault: Fault, status: int, slug: str, outcome: str, upstream_status: int | None
) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200  # the access token is cached
        proxy.sandbox.inject_fault(fault)
        problem(ask_session_token(client, proxy, "faulted-1"), status, slug)
        line = proxy.access_line("faulted-1")
        assert (line["status"], line["upstream_status"]) == (status, upstream_status)
        exchanges = metric(
            client, "liveness_proxy_upstream_requests_total", endpoint="session_token", outcome=outcome
        )
        assert exchanges == 1
        record = audit_record(proxy, "faulted-1")
        assert (record["status"], record["problem"], record["upstream_status"]) == (
            status,
            slug,
            upstream_status,
        )
        # One fault is no outage: the circuit stays closed, and the next call is served.
        assert ask_session_token(client, proxy).status_code == 200
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0
        assert not proxy.log_events("unhandled_error")


def test_a_429_storm_is_passed_on_and_never_opens_the_circuit(make_proxy: MakeProxy) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200
        storm = 3 * proxy.settings.cynopsis_circuit_failure_threshold
        proxy.sandbox.inject_fault(
            Fault(target="session_token", kind="rate_limit", retry_after_seconds=7, count=storm)
        )
        for _ in range(storm):
            problem(ask_session_token(client, proxy), 429, "upstream-rate-limited", retry_after="7")
        assert metric(client, "liveness_proxy_upstream_requests_total", outcome="429") == storm
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0
        assert not proxy.log_events("upstream_circuit_opened")
        assert ask_session_token(client, proxy).status_code == 200


def test_a_401_storm_costs_one_token_request_per_backoff_and_never_opens_the_circuit(
    make_proxy: MakeProxy,
) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200
        storm = 3 * proxy.settings.cynopsis_circuit_failure_threshold
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=401, count=1000))
        for _ in range(storm):
            problem(ask_session_token(client, proxy), 502, "upstream-unavailable")
        # The first 401 replaced the token and retried once; later ones, within the backoff, not.
        assert proxy.sandbox.token_requests == 2
        assert metric(client, "liveness_proxy_upstream_requests_total", outcome="401") == storm + 1
        assert metric(client, "liveness_proxy_upstream_token_refreshes_total", outcome="ok") == 2
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0
        # The upstream accepts tokens again: the replacement token is served at once.
        proxy.sandbox.clear_faults()
        assert ask_session_token(client, proxy).status_code == 200
        assert proxy.sandbox.token_requests == 2


# -- the circuit breaker -------------------------------------------------------------------------------

STORMS = [
    pytest.param(Fault(target="session_token", kind="status", status=503, count=5), id="5xx"),
    pytest.param(Fault(target="session_token", kind="reset", count=5), id="resets"),
    pytest.param(Fault(target="session_token", kind="timeout", hang_seconds=5, count=5), id="timeouts"),
]


@pytest.mark.parametrize("storm", STORMS)
def test_a_failure_storm_opens_the_circuit_and_one_good_probe_closes_it(
    make_proxy: MakeProxy, storm: Fault
) -> None:
    overrides = {
        "CYNOPSIS_CIRCUIT_FAILURE_THRESHOLD": storm.count,
        "CYNOPSIS_CIRCUIT_OPEN_SECONDS": OPEN_SECONDS,
        "CYNOPSIS_TIMEOUT_SECONDS": 0.2,
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200
        proxy.sandbox.inject_fault(storm)
        for _ in range(storm.count):
            assert ask_session_token(client, proxy).status_code in (502, 504)
        calls = len(proxy.upstream_paths())
        # Open: refused at once, the upstream is not called.
        for index in range(3):
            problem(
                ask_session_token(client, proxy, f"open-{index}"),
                503,
                "upstream-circuit-open",
                retry_after="1",
            )
        assert len(proxy.upstream_paths()) == calls
        [opened] = proxy.log_events("upstream_circuit_opened")
        assert opened["consecutive_failures"] == storm.count
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 1
        assert metric(client, "liveness_proxy_upstream_circuit_rejections_total") == 3
        record = audit_record(proxy, "open-0")
        assert (record["status"], record["problem"], record["upstream_status"]) == (
            503,
            "upstream-circuit-open",
            None,
        )
        # The upstream is well again (the storm is over): after the interval, the probe closes it.
        time.sleep(OPEN_SECONDS)
        assert ask_session_token(client, proxy).status_code == 200
        assert len(proxy.log_events("upstream_circuit_closed")) == 1
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0
        assert [ask_session_token(client, proxy).status_code for _ in range(3)] == [200] * 3


def test_a_failed_probe_reopens_the_circuit_for_another_interval(make_proxy: MakeProxy) -> None:
    overrides = {"CYNOPSIS_CIRCUIT_FAILURE_THRESHOLD": 2, "CYNOPSIS_CIRCUIT_OPEN_SECONDS": OPEN_SECONDS}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=503, count=3))
        for _ in range(2):
            problem(ask_session_token(client, proxy), 502, "upstream-unavailable")
        problem(ask_session_token(client, proxy), 503, "upstream-circuit-open")
        time.sleep(OPEN_SECONDS)
        calls = len(proxy.upstream_paths())
        # One probe goes through, fails (the third 503), and the circuit is open again.
        problem(ask_session_token(client, proxy), 502, "upstream-unavailable")
        problem(ask_session_token(client, proxy), 503, "upstream-circuit-open")
        assert len(proxy.upstream_paths()) == calls + 1
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 1
        assert len(proxy.log_events("upstream_circuit_opened")) == 1  # one line per outage
        time.sleep(OPEN_SECONDS)
        assert ask_session_token(client, proxy).status_code == 200
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0


def test_an_open_circuit_costs_no_daily_attempt(make_proxy: MakeProxy) -> None:
    overrides = {
        "LIVENESS_PROXY_DAILY_ATTEMPTS": 1,
        "CYNOPSIS_CIRCUIT_FAILURE_THRESHOLD": 1,
        "CYNOPSIS_CIRCUIT_OPEN_SECONDS": OPEN_SECONDS,
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        session_token = ask_session_token(client, proxy).json()["session_token"]
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=503))
        problem(ask_session_token(client, proxy), 502, "upstream-unavailable")  # opens the circuit
        refused = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": session_token})
        problem(refused, 503, "upstream-circuit-open")
        time.sleep(OPEN_SECONDS)
        # The call that was refused never went out: the caller's one attempt of the day is still there.
        created = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": session_token})
        assert created.status_code == 201, created.text


# -- the token endpoint --------------------------------------------------------------------------------

TOKEN_FAULTS = [
    # (fault, what the upstream_token_failed log line says)
    pytest.param(Fault(target="token", kind="status", status=503), "token endpoint answered HTTP 503",
                 id="5xx"),
    pytest.param(Fault(target="token", kind="rate_limit"), "token endpoint answered HTTP 429", id="429"),
    pytest.param(Fault(target="token", kind="timeout", hang_seconds=5), "token endpoint timed out",
                 id="slow"),
    pytest.param(Fault(target="token", kind="malformed"), "token response is not JSON", id="garbage-json"),
    pytest.param(Fault(target="token", kind="wrong_content_type"), "token response is not JSON",
                 id="wrong-content-type"),
    pytest.param(Fault(target="token", kind="garbage"), "token endpoint unreachable", id="not-http"),
    pytest.param(Fault(target="token", kind="reset"), "token endpoint unreachable", id="resets-mid-body"),
    pytest.param(Fault(target="token", kind="oversized", size_bytes=100_000),
                 "token endpoint response too large", id="oversized"),
    pytest.param(Fault(target="token", kind="token_expires_in", expires_in=0), "non-positive expires_in",
                 id="expires-in-0"),
    pytest.param(Fault(target="token", kind="token_expires_in", expires_in=-60), "non-positive expires_in",
                 id="expires-in-negative"),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "reason"), TOKEN_FAULTS)
def test_a_token_endpoint_fault_is_a_503_until_a_token_can_be_had(
    make_proxy: MakeProxy, fault: Fault, reason: str
) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        proxy.sandbox.inject_fault(fault)
        problem(
            ask_session_token(client, proxy, "no-token-1"), 503, "upstream-token-unavailable", retry_after="5"
        )
        [failed] = proxy.log_events("upstream_token_failed")
        assert reason in failed["reason"]
        assert metric(client, "liveness_proxy_upstream_token_refreshes_total", outcome="failed") == 1
        assert audit_record(proxy, "no-token-1")["upstream_status"] is None
        assert (
            client.get("/readyz").json()["checks"]["upstream_token"] == "failed: upstream-token-unavailable"
        )
        # Within the backoff nobody asks again.
        problem(ask_session_token(client, proxy), 503, "upstream-token-unavailable")
        assert proxy.sandbox.token_requests == 1
        wait_until_served_again(client, proxy)
        assert client.get("/readyz").status_code == 200


def test_a_token_endpoint_that_refuses_connections_is_a_503_until_it_listens_again(
    make_proxy: MakeProxy,
) -> None:
    port = closed_port()
    overrides = {"CYNOPSIS_TOKEN_URL": f"http://127.0.0.1:{port}/oauth/token"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        problem(ask_session_token(client, proxy), 503, "upstream-token-unavailable", retry_after="5")
        [failed] = proxy.log_events("upstream_token_failed")
        assert failed["reason"] == "token endpoint unreachable (ConnectError)"
        assert metric(client, "liveness_proxy_upstream_token_refreshes_total", outcome="failed") == 1
        problem(client.get("/readyz"), 503, "service-unavailable")
        with serving_on(port, proxy.sandbox.app):
            wait_until_served_again(client, proxy)
            assert client.get("/readyz").status_code == 200


def test_a_huge_expires_in_is_capped_and_an_early_expiry_costs_one_retry(make_proxy: MakeProxy) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        proxy.sandbox.inject_fault(Fault(target="token", kind="token_expires_in", expires_in=10**12))
        assert ask_session_token(client, proxy).status_code == 200
        token = proxy.runtime.tokens.cached
        assert token is not None
        assert token.expires_at - proxy.clock.now() == proxy.settings.cynopsis_token_max_lifetime_seconds
        # The sandbox drops the token after its real lifetime, long before the capped one: the
        # first 401 replaces it and the call is retried once, so the caller sees nothing.
        proxy.clock.advance(SANDBOX_TOKEN_LIFETIME + 1)
        assert ask_session_token(client, proxy).status_code == 200
        assert metric(client, "liveness_proxy_upstream_requests_total", outcome="401") == 1
        assert metric(client, "liveness_proxy_upstream_token_refreshes_total", outcome="ok") == 2


def test_a_rejected_client_secret_is_a_503_until_the_credentials_match_again(make_proxy: MakeProxy) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        proxy.sandbox.rotate_client_secret("rotated-at-cynopsis-only-0123456789")
        problem(ask_session_token(client, proxy), 503, "upstream-token-unavailable", retry_after="5")
        [failed] = proxy.log_events("upstream_token_failed")
        assert (failed["reason"], failed["upstream_status"]) == (
            "token endpoint answered HTTP 401 (invalid_client)",
            401,
        )
        assert metric(client, "liveness_proxy_upstream_token_refreshes_total", outcome="failed") == 1
        # Both sides hold the same secret again (here: Cynopsis went back to it): no restart needed.
        proxy.sandbox.rotate_client_secret(CLIENT_SECRET)
        wait_until_served_again(client, proxy)


# -- the proxy's own stores ----------------------------------------------------------------------------


@contextmanager
def store_backend(name: str) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Proxy overrides for the backend, and the PostgreSQL URL (None for SQLite)."""
    if name == "sqlite":
        yield {}, None
        return
    with scratch_postgres() as url:
        yield {"LIVENESS_PROXY_DATABASE_URL": url}, url


@contextmanager
def write_locked(proxy: ProxyHarness, postgres_url: str | None) -> Iterator[None]:
    """Another connection holds the store's write lock for the block; readers are not blocked."""
    if postgres_url is None:
        locker = sqlite3.connect(proxy.settings.database_url.split("///", 1)[1], isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            locker.close()  # rolls the transaction back
        return
    loop = asyncio.new_event_loop()
    connection = loop.run_until_complete(asyncpg.connect(postgres_url))
    try:
        loop.run_until_complete(
            connection.execute("BEGIN; LOCK TABLE audit_records, liveness_sessions IN EXCLUSIVE MODE")
        )
        yield
    finally:
        loop.run_until_complete(connection.close())
        loop.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_write_locked_store_is_a_503_after_a_bounded_wait(make_proxy: MakeProxy, backend: str) -> None:
    with (
        store_backend(backend) as (overrides, postgres_url),
        # The audit write is what this measures: with bindings on, the session token's binding (a
        # write too) would meet the lock first and the answer would be refused before the audit.
        make_proxy(proxy_overrides={**overrides, "LIVENESS_PROXY_SESSION_TOKEN_BINDING": "false"}) as proxy,
        proxy.client() as client,
    ):
        assert ask_session_token(client, proxy).status_code == 200
        calls = len(proxy.upstream_paths())
        with write_locked(proxy, postgres_url):
            assert client.get("/readyz").status_code == 200  # readiness only reads
            try:
                # SQLite waits 5 s for the lock (its busy timeout), then gives up.
                locked = client.post(
                    SESSION_TOKEN, headers=proxy.auth() | {"X-Request-ID": "locked-1"}, timeout=10
                )
            except httpx.ReadTimeout:
                pytest.fail("no answer within 10 s: the wait for the store's write lock is unbounded")
        # Keys are read beside the lock, so the call went out; its audit record could not be
        # written in time, so the answer was withheld.
        problem(locked, 503, "store-unavailable", retry_after="5")
        assert len(proxy.upstream_paths()) == calls + 1
        [withheld] = proxy.log_events("audit_unavailable")
        assert withheld["status"] == 200
        assert proxy.access_line("locked-1")["status"] == 503
        assert metric(client, "liveness_proxy_http_requests_total", route=SESSION_TOKEN, status="503") == 1
        assert not proxy.log_events("unhandled_error")
        # The lock is gone: served at once, and the chain holds everything that was answered.
        assert ask_session_token(client, proxy).status_code == 200
        assert "locked-1" not in {record["request_id"] for record in proxy.audit_rows()}

        async def verify() -> bool:
            async with proxy.database() as engine:
                return (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok

        assert asyncio.run(verify())


@pytest.mark.served
def test_an_exhausted_database_pool_is_a_503_after_the_pool_timeout(make_proxy: MakeProxy) -> None:
    # PostgreSQL: one pooled connection, held by a request whose key lookup waits on a table lock.
    with scratch_postgres() as url:
        overrides = {
            "LIVENESS_PROXY_DATABASE_URL": url,
            "LIVENESS_PROXY_DATABASE_POOL_SIZE": 1,
            "LIVENESS_PROXY_DATABASE_MAX_OVERFLOW": 0,
            "LIVENESS_PROXY_DATABASE_POOL_TIMEOUT_SECONDS": 0.3,
        }
        with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
            assert ask_session_token(client, proxy).status_code == 200
            pool = proxy.runtime.engine.sync_engine.pool
            assert isinstance(pool, QueuePool)

            async def exhaust() -> tuple[httpx.Response, httpx.Response, int]:
                async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
                    locker = await asyncpg.connect(url)
                    try:
                        await locker.execute("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                        holder = asyncio.ensure_future(http.post(SESSION_TOKEN, headers=proxy.auth()))
                        while pool.checkedout() == 0:
                            await asyncio.sleep(0.01)
                        calls = len(proxy.upstream_paths())
                        refused = await http.post(
                            SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob) | {"X-Request-ID": "pool-1"}
                        )
                        assert not holder.done()  # still waiting for its key: the pool is exhausted
                    finally:
                        await locker.close()  # ends the transaction: the lock goes
                    return refused, await holder, calls

            refused, held, calls = asyncio.run(exhaust())
            problem(refused, 503, "store-unavailable", retry_after="5")
            assert len(proxy.upstream_paths()) == calls + 1  # only the held request's, once it got its key
            assert {line["reason"] for line in proxy.log_events("audit_unavailable")} == {"TimeoutError"}
            assert proxy.access_line("pool-1")["status"] == 503
            assert held.status_code == 200
            assert ask_session_token(client, proxy).status_code == 200


async def test_sqlite_waits_for_a_pooled_connection_only_as_long_as_configured(tmp_path: Path) -> None:
    # The same row on SQLite, where the pool size is the only limit: the wait must be bounded by
    # LIVENESS_PROXY_DATABASE_POOL_TIMEOUT_SECONDS too (SQLAlchemy's own default is 30 s).
    engine = create_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}", pool=PoolOptions(size=1, timeout_seconds=0.2)
    )
    try:
        async with engine.connect():
            with pytest.raises(PoolTimeout):
                async with asyncio.timeout(2), engine.connect():
                    pass
    finally:
        await engine.dispose()


# -- callers -------------------------------------------------------------------------------------------


@pytest.mark.served
def test_a_caller_that_leaves_mid_request_does_not_stop_it(make_proxy: MakeProxy) -> None:
    with make_proxy() as proxy, proxy.client() as client:
        session_token = ask_session_token(client, proxy).json()["session_token"]
        proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="latency", delay_seconds=0.5))
        body = orjson.dumps({"session_token": session_token})
        port = int(proxy.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/liveness/sessions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nX-Request-ID: gone-1\r\n".encode()
                + f"Authorization: Bearer {proxy.keys.alice}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: proxy.upstream_paths()[-1].endswith("/liveness_session"))
        # The caller is gone while the upstream works on its call. The call completes: the session
        # is bound to its creator and audited as answered, since the answer was sent (to nobody).
        wait_for(lambda: "gone-1" in {line["request_id"] for line in proxy.log_events("request")})
        [session_id] = proxy.sandbox.session_ids
        record = client.get(f"{SESSIONS}/{session_id}", headers=proxy.auth(proxy.keys.admin)).json()
        assert (record["subject"], record["request_id"]) == ("alice", "gone-1")
        assert (audit_record(proxy, "gone-1")["status"], proxy.access_line("gone-1")["status"]) == (201, 201)
        assert not proxy.log_events("unhandled_error")
        assert metric(client, "liveness_proxy_http_requests_total", status="500") == 0
        # The process keeps serving.
        assert proxy.create_session(client)


@pytest.mark.served
def test_upstream_concurrency_exhausted_is_a_503_with_retry_after(make_proxy: MakeProxy) -> None:
    overrides = {
        "LIVENESS_PROXY_UPSTREAM_CONCURRENCY": 1,
        "LIVENESS_PROXY_UPSTREAM_QUEUE_TIMEOUT_SECONDS": 0.1,
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        assert ask_session_token(client, proxy).status_code == 200
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="latency", delay_seconds=0.6))

        async def one_slow_one_refused() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
                slow = asyncio.ensure_future(http.post(SESSION_TOKEN, headers=proxy.auth()))
                while proxy.runtime.upstream_gate.in_flight == 0:
                    await asyncio.sleep(0.005)
                refused = await http.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob))
                return await slow, refused

        slow, refused = asyncio.run(one_slow_one_refused())
        assert slow.status_code == 200
        problem(refused, 503, "service-unavailable", retry_after="1")
        assert metric(client, "liveness_proxy_upstream_calls_rejected_total") == 1
        assert metric(client, "liveness_proxy_upstream_circuit_open") == 0  # our limit, not an outage
        assert ask_session_token(client, proxy).status_code == 200


# -- the document --------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([\w-]+)\])?`")


def test_every_test_the_matrix_names_exists_and_every_test_here_is_named() -> None:
    document = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    references = TEST_REFERENCE.findall(document)
    assert len(references) > 40
    for path, name, case in references:
        source = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), f"{path}::{name} does not exist"
        if case:
            assert f'id="{case}"' in source or f'"{case}"' in source, f"{path}::{name}[{case}] does not exist"
    named = {name for path, name, _ in references if path == "tests/integration/test_fault_matrix.py"}
    here = set(
        re.findall(r"^(?:async )?def (test_\w+)\(", Path(__file__).read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert here - named == {"test_every_test_the_matrix_names_exists_and_every_test_here_is_named"}
