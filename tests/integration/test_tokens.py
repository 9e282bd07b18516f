"""The upstream access token: cached, refreshed ahead of expiry, single-flight, resilient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import pytest

from liveness_proxy.sandbox import Fault
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"


def test_token_is_fetched_once_and_reused(proxy: ProxyHarness, client: httpx.Client) -> None:
    for _ in range(5):
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    assert proxy.sandbox.tokens_issued == 1
    token_requests = [r for r in proxy.sandbox.request_log if r.path == "/oauth/token"]
    assert token_requests[0].headers["content-type"] == "application/x-www-form-urlencoded"


async def _burst(proxy: ProxyHarness, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=proxy.url, limits=limits, timeout=30) as http:
        responses = await asyncio.gather(
            *(http.post(SESSION_TOKEN, headers=proxy.auth()) for _ in range(count))
        )
    return [response.status_code for response in responses]


@pytest.mark.served
async def test_200_concurrent_first_requests_cause_one_token_request(proxy: ProxyHarness) -> None:
    proxy.sandbox.inject_fault(Fault(target="token", kind="latency", delay_seconds=0.3))
    statuses = await _burst(proxy, 200)
    assert statuses == [200] * 200
    assert proxy.sandbox.token_requests == 1


def test_token_is_refreshed_ahead_of_expiry(proxy: ProxyHarness, client: httpx.Client) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    first = proxy.runtime.tokens.cached
    assert first is not None
    # Into the refresh window (the default margin is 300 s of an 8-hour token), not past expiry.
    proxy.clock.advance(28800 - 200)
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    _wait_for(lambda: proxy.sandbox.tokens_issued == 2)
    # The sandbox counts the token when it answers; the proxy stores it a moment later (on
    # PostgreSQL + Redis after a round trip to the shared store).
    _wait_for(lambda: (cached := proxy.runtime.tokens.cached) is not None and cached.value != first.value)
    second = proxy.runtime.tokens.cached
    assert second is not None
    assert second.value != first.value
    assert second.expires_at > first.expires_at


def test_rejected_token_is_replaced_once_and_the_call_retried(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.revoke_tokens()
    response = client.post(SESSION_TOKEN, headers=proxy.auth())
    assert response.status_code == 200
    assert proxy.sandbox.tokens_issued == 2
    liveness_calls = [r for r in proxy.sandbox.request_log if r.path.endswith("get_session_token")]
    assert len(liveness_calls) == 3  # first call, the rejected one, its single retry


def test_upstream_that_keeps_rejecting_gets_no_retry_loop(proxy: ProxyHarness, client: httpx.Client) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=401, count=10))
    response = client.post(SESSION_TOKEN, headers=proxy.auth())
    assert response.status_code == 502
    assert response.json()["type"].endswith("upstream-unavailable")
    assert proxy.sandbox.tokens_issued == 2  # exactly one refresh


def test_cached_token_is_used_while_the_token_endpoint_is_down(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=503, count=1000))
    proxy.clock.advance(28800 - 100)  # in the refresh window: refreshes fail, the token still works
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    _wait_for(lambda: proxy.sandbox.token_requests == 2)  # the background refresh was tried, and failed
    for _ in range(3):
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    assert proxy.sandbox.token_requests == 2  # no new attempt within the failure backoff
    proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 0.1)
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    _wait_for(lambda: proxy.sandbox.token_requests == 3)  # after it, the refresh is tried again
    assert proxy.sandbox.tokens_issued == 1
    assert "upstream_token_failed" in proxy.log_text()


def test_past_expiry_with_the_endpoint_down_callers_get_503_fast(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=503, count=1000))
    proxy.clock.advance(28800 + 1)
    first = client.post(SESSION_TOKEN, headers=proxy.auth())
    assert first.status_code == 503
    assert first.headers["content-type"] == "application/problem+json"
    assert int(first.headers["retry-after"]) >= 1
    attempts_after_first = proxy.sandbox.token_requests
    started = time.perf_counter()
    for _ in range(20):
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 503
    elapsed = time.perf_counter() - started
    # The failure is remembered for a short backoff: no new token request, no waiting on the endpoint.
    assert proxy.sandbox.token_requests == attempts_after_first
    assert elapsed < 2.0


def test_failure_is_remembered_only_briefly(proxy: ProxyHarness, client: httpx.Client) -> None:
    proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=1))
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 503
    proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 0.1)
    # After the backoff one new attempt starts in the background; this caller is not held for it.
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 503
    _wait_for(lambda: proxy.sandbox.tokens_issued == 1)
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200


def test_token_without_expires_in_gets_the_default_lifetime(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    with make_proxy(sandbox_config={"token_lifetime_seconds": None}) as running, running.client() as http:
        assert http.post(SESSION_TOKEN, headers=running.auth()).status_code == 200
        token = running.runtime.tokens.cached
        assert token is not None
        lifetime = token.expires_at - running.clock.now()
        assert lifetime == running.settings.cynopsis_token_default_lifetime_seconds


def test_garbage_token_response_is_a_503_not_a_crash(proxy: ProxyHarness, client: httpx.Client) -> None:
    proxy.sandbox.inject_fault(Fault(target="token", kind="malformed"))
    response = client.post(SESSION_TOKEN, headers=proxy.auth())
    assert response.status_code == 503
    assert response.json()["type"].endswith("upstream-token-unavailable")


def test_wrong_client_secret_is_a_503_and_the_log_names_invalid_client(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    with make_proxy(proxy_overrides={"CYNOPSIS_CLIENT_SECRET": "not-the-right-secret-123"}) as running:
        with running.client() as http:
            assert http.post(SESSION_TOKEN, headers=running.auth()).status_code == 503
        assert "invalid_client" in running.log_text()
        assert "not-the-right-secret-123" not in running.log_text()


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_token_with_non_positive_lifetime_is_refused(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    with make_proxy(sandbox_config={"token_lifetime_seconds": 0}) as running, running.client() as http:
        response = http.post(SESSION_TOKEN, headers=running.auth())
        assert response.status_code == 503
        assert "non-positive expires_in" in running.log_text()


def test_huge_lifetime_is_capped(make_proxy: Callable[..., AbstractContextManager[ProxyHarness]]) -> None:
    with make_proxy(sandbox_config={"token_lifetime_seconds": 10**9}) as running, running.client() as http:
        assert http.post(SESSION_TOKEN, headers=running.auth()).status_code == 200
        token = running.runtime.tokens.cached
        assert token is not None
        assert token.expires_at - running.clock.now() == running.settings.cynopsis_token_max_lifetime_seconds


@pytest.mark.served
def test_hanging_token_endpoint_never_queues_callers_past_the_token_timeout(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    token_timeout = 1.5  # long enough that "waited for it" and "answered at once" cannot be confused
    with make_proxy(proxy_overrides={"CYNOPSIS_TOKEN_TIMEOUT_SECONDS": token_timeout}) as proxy:

        async def timed_burst() -> tuple[list[int], float]:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
                started = time.perf_counter()
                answers = await asyncio.gather(
                    *(http.post(SESSION_TOKEN, headers=proxy.auth()) for _ in range(20))
                )
                return [answer.status_code for answer in answers], time.perf_counter() - started

        with proxy.client() as http:
            assert http.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        proxy.sandbox.inject_fault(Fault(target="token", kind="timeout", hang_seconds=10, count=1000))
        proxy.clock.advance(28800 + 1)
        # The first burst shares one token request, which gives up after the token timeout.
        statuses, elapsed = asyncio.run(timed_burst())
        assert statuses == [503] * 20
        assert token_timeout <= elapsed < token_timeout + 2.0
        assert proxy.sandbox.token_requests == 2
        # From then on nobody waits: within the backoff, and after it (a background attempt runs).
        statuses, elapsed = asyncio.run(timed_burst())
        assert statuses == [503] * 20
        assert elapsed < token_timeout / 2
        proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 0.1)
        statuses, elapsed = asyncio.run(timed_burst())
        assert statuses == [503] * 20
        assert elapsed < token_timeout / 2
        _wait_for(lambda: proxy.sandbox.token_requests == 3)


def test_an_upstream_rejecting_every_token_does_not_cause_a_token_request_per_call(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
    proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=401, count=1000))
    for _ in range(20):
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 502
    assert proxy.sandbox.token_requests == 2  # one replacement per backoff interval, not one per call
    proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 0.1)
    assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 502
    assert proxy.sandbox.token_requests == 3


@pytest.mark.served
async def test_a_late_rejection_of_an_old_token_does_not_drop_its_replacement(proxy: ProxyHarness) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        assert (await http.post(SESSION_TOKEN, headers=proxy.auth())).status_code == 200
        tokens = proxy.runtime.tokens
        old = tokens.cached
        assert old is not None
        proxy.clock.advance(28800 - 100)  # refresh window: the next call refreshes in the background
        assert (await http.post(SESSION_TOKEN, headers=proxy.auth())).status_code == 200
        _wait_for(lambda: proxy.sandbox.tokens_issued == 2)
        new = tokens.cached
        assert new is not None
        assert new is not old
        tokens.invalidate(old)  # a request that used the old token comes back with 401 only now
        assert tokens.cached is new
