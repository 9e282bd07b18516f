"""Per-subject rate limits, the daily attempt cap and the cap on concurrent upstream calls, through the
running proxy."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from liveness_proxy.sandbox import Fault
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]


def away_from_a_minute_edge(margin: float = 3.0) -> None:
    """Waits past the next minute boundary if it is close. The sliding window floors its weighted
    count (as `limits` does), so just after a boundary the previous minute's 2 count as 1: a third
    request made there is let through, and a test of "2/minute" would fail by the clock alone."""
    to_edge = 60.0 - time.time() % 60.0
    if to_edge < margin:
        time.sleep(to_edge + 0.1)


def test_session_token_limit_is_per_subject_with_retry_after_and_named_limit(make_proxy: MakeProxy) -> None:
    away_from_a_minute_edge()
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "2/minute"}) as proxy:
        with proxy.client() as client:
            statuses = [client.post(SESSION_TOKEN, headers=proxy.auth()).status_code for _ in range(2)]
            refused = client.post(SESSION_TOKEN, headers=proxy.auth())
            other_subject = client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob))
        upstream_calls = proxy.upstream_paths().count("/service/liveness-v2/get_session_token")
        rows = proxy.audit_rows()
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    problem = refused.json()
    assert problem["limit"] == "session_token"
    assert "2/minute" in problem["detail"]
    assert problem["request_id"] == refused.headers["x-request-id"]
    assert other_subject.status_code == 200  # bob has a budget of his own
    assert upstream_calls == 3  # the refused call never reached Cynopsis
    assert rows[2]["status"] == 429
    assert rows[2]["problem"] == "rate-limited"


def test_result_reads_have_their_own_limit(make_proxy: MakeProxy) -> None:
    overrides = {"LIVENESS_PROXY_RATE_LIMIT_RESULT": "1/minute"}
    away_from_a_minute_edge()
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        session_id = proxy.create_session(client)
        first = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
        second = client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth())
        # Session tokens and creation were not counted against the result limit.
        another = proxy.create_session(client)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["limit"] == "result"
    assert another


def test_create_session_limit(make_proxy: MakeProxy) -> None:
    overrides = {"LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "1/hour"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        proxy.create_session(client)
        token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
        refused = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
    assert refused.status_code == 429
    assert refused.json()["limit"] == "create_session"
    assert int(refused.headers["retry-after"]) <= 3600


def test_daily_attempt_cap_resets_at_utc_midnight(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_DAILY_ATTEMPTS": 2}) as proxy:
        with proxy.client() as client:
            proxy.create_session(client)
            proxy.create_session(client)
            token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
            refused = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
            bob = proxy.create_session(client, proxy.keys.bob)
        creates = proxy.upstream_paths().count("/service/liveness-v2/liveness_session")
    assert refused.status_code == 429
    assert refused.json()["limit"] == "daily_attempts"
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    assert abs(int(refused.headers["retry-after"]) - (midnight - now).total_seconds()) < 5
    assert bob
    assert creates == 3


def test_the_proxy_caps_concurrent_upstream_calls(make_proxy: MakeProxy) -> None:
    overrides = {
        "LIVENESS_PROXY_UPSTREAM_CONCURRENCY": 1,
        "LIVENESS_PROXY_UPSTREAM_QUEUE_TIMEOUT_SECONDS": 0.1,
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        client.post(SESSION_TOKEN, headers=proxy.auth())  # warm the upstream token
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="latency", delay_seconds=0.6, count=1))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(client.post, SESSION_TOKEN, headers=proxy.auth())
            deadline = time.monotonic() + 5
            while proxy.runtime.upstream_gate.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            refused = pool.submit(client.post, SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob)).result()
            assert slow.result().status_code == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"


def test_an_outage_of_ours_costs_no_daily_attempt(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_DAILY_ATTEMPTS": 1}) as proxy, proxy.client() as client:
        token = client.post(SESSION_TOKEN, headers=proxy.auth()).json()["session_token"]
        proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=100))
        proxy.clock.advance(28800 + 10)  # the access token expired; the token endpoint is down
        during_outage = client.post(SESSIONS, headers=proxy.auth(), json={"session_token": token})
        proxy.sandbox.clear_faults()
        proxy.clock.advance(60)  # past the failure backoff: the next call fetches a token again
        deadline = time.monotonic() + 5
        while client.post(SESSION_TOKEN, headers=proxy.auth()).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        session_id = proxy.create_session(client)
    assert during_outage.status_code == 503
    assert session_id  # the one daily attempt was still there
