"""Bounded work for anonymous traffic: the per-address limit before authentication, failed
authentications audited in aggregate, every authenticated outcome counted, the deployment-wide
attempt cap, and the cached readiness check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import limits
import orjson
import pytest
import redis.asyncio as aioredis
import structlog

from liveness_proxy.api.operational import CachedCheck
from liveness_proxy.errors import RateLimited
from liveness_proxy.ratelimit import (
    AddressGate,
    LimitPolicy,
    LocalSlidingWindows,
    SubjectLimits,
    redis_limit_storage,
)
from liveness_proxy.store import AuditLog, create_engine, upgrade_database
from liveness_proxy.store.failed_authentications import FailedAuthentications
from services import REDIS_URL, require_redis
from support import TEST_AUDIT_KEYS, TEST_KEYS, ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
BAD_KEY = "Bearer lpk_0123456789abcdef_" + "x" * 40


def _aggregates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The aggregate records' facts, with their personal values (the client address, kept beside
    its commitment and never in the hashed detail) merged in."""
    return [
        {
            **orjson.loads(row["detail"]),
            **({} if row["personal"] is None else orjson.loads(row["personal"])["values"]),
            "action": row["action"],
            "request_id": row["request_id"],
        }
        for row in rows
        if row["action"].startswith("auth.failed")
    ]


def test_failures_from_an_address_are_limited_before_authentication(make_proxy: MakeProxy) -> None:
    overrides = {
        "LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED": "5/minute",
        "LIVENESS_PROXY_API_KEY_CACHE_SECONDS": "60",
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        # Routes around the liveness calls are never counted, with or without a credential.
        for path in ("/healthz", "/readyz", "/openapi.json", "/client/liveness-proxy-client.js"):
            for _ in range(3):
                assert client.get(path, headers={"Authorization": BAD_KEY}).status_code in (200, 503)
        # An API key this process has verified, before the flood.
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        failures = [client.post(SESSION_TOKEN, headers={"Authorization": BAD_KEY}) for _ in range(5)]
        failures.append(client.get(f"{SESSIONS}/abc/result"))
        refused = client.post(SESSION_TOKEN, headers={"Authorization": BAD_KEY})
        admin_refused = client.get(SESSIONS)
        # The known key is still served from the blocked address; a key not verified yet is not.
        known = client.post(SESSION_TOKEN, headers=proxy.auth())
        unverified = client.post(SESSION_TOKEN, headers=proxy.auth(proxy.keys.bob))
        health = client.get("/healthz")
        proxy.flush_failed_authentications()
        rows = proxy.audit_rows()
    assert [response.status_code for response in failures] == [401] * 5 + [429]
    assert refused.status_code == 429
    assert admin_refused.status_code == 429
    problem = refused.json()
    assert problem["limit"] == "unauthenticated"
    assert problem["request_id"] == refused.headers["x-request-id"]
    assert "client address" in problem["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert known.status_code == 200
    assert unverified.status_code == 429
    assert unverified.json()["limit"] == "unauthenticated"
    assert health.status_code == 200
    # One aggregate record per credential kind and address, with every failure counted, and no
    # record per refused request.
    aggregates = {row["credential"]: row for row in _aggregates(rows)}
    assert set(aggregates) == {"api_key", "none"}
    assert aggregates["api_key"]["failures"] == 7  # 5 x 401, then 429 twice (bob's unverified key)
    assert aggregates["api_key"]["refused_by_limit"] == 2
    assert aggregates["none"]["failures"] == 2
    assert aggregates["none"]["refused_by_limit"] == 2
    assert aggregates["api_key"]["request_id"] == failures[0].headers["x-request-id"]
    assert {row["client_address"] for row in aggregates.values()} == {"127.0.0.1"}
    request_rows = [row for row in rows if not row["action"].startswith("auth.failed")]
    assert [row["status"] for row in request_rows] == [200, 200]


def test_a_blocked_address_keeps_serving_known_keys_and_nothing_else(make_proxy: MakeProxy) -> None:
    """A backend behind the same address as an attacker keeps being served for as long as the
    block lasts (its key's row is read again once the cache has aged), but only with one
    credential; everything refused while blocked is counted in the metric and costs no count."""
    overrides = {
        "LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED": "2/hour",
        "LIVENESS_PROXY_API_KEY_CACHE_SECONDS": "10",
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        statuses = [
            client.post(SESSION_TOKEN, headers={"Authorization": BAD_KEY}).status_code for _ in range(3)
        ]
        proxy.clock.advance(30)  # the key's cached row is stale now; the block is not over
        known = client.post(SESSION_TOKEN, headers=proxy.auth())
        repeated = client.post(
            SESSION_TOKEN, headers=[("X-API-Key", proxy.keys.alice), ("X-API-Key", proxy.keys.bob)]
        )
        both = client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-API-Key": proxy.keys.alice})
        metrics = client.get("/metrics").text
    assert statuses == [401, 401, 429]
    assert known.status_code == 200
    assert (repeated.status_code, repeated.json()["limit"]) == (429, "unauthenticated")
    assert (both.status_code, both.json()["limit"]) == (429, "unauthenticated")
    # Every 429 of the limit is in the metric: the one that tipped the address over and the three
    # refused while it was blocked.
    [counted] = [
        line
        for line in metrics.splitlines()
        if line.startswith('liveness_proxy_rate_limited_requests_total{limit="unauthenticated"}')
    ]
    assert counted.endswith(" 3.0"), counted


def test_failed_authentications_are_answered_late_and_nothing_else_is(make_proxy: MakeProxy) -> None:
    overrides = {
        "LIVENESS_PROXY_FAILED_AUTH_DELAY_SECONDS": "0.4",
        "LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED": "1/hour",
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:

        def timed(headers: dict[str, str]) -> tuple[int, float]:
            started = time.monotonic()
            status = client.post(SESSION_TOKEN, headers=headers).status_code
            return status, time.monotonic() - started

        authenticated = timed(proxy.auth())
        unauthenticated = timed({"Authorization": BAD_KEY})
        refused = timed({"Authorization": BAD_KEY})  # the address is over its limit now
    assert authenticated[0] == 200
    assert authenticated[1] < 0.4
    assert unauthenticated[0] == 401
    assert refused[0] == 429
    assert unauthenticated[1] >= 0.4
    assert refused[1] >= 0.4


@pytest.mark.served
def test_the_limit_is_per_client_address_as_the_server_resolves_it(make_proxy: MakeProxy) -> None:
    """Through a trusted proxy (loopback, uvicorn's default `--forwarded-allow-ips`), the forwarded
    address is the client's: one address over the limit does not block another."""
    overrides = {"LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED": "3/minute"}
    with make_proxy(proxy_overrides=overrides) as proxy, httpx.Client(base_url=proxy.url) as client:

        def attempt(address: str) -> int:
            headers = {"Authorization": BAD_KEY, "X-Forwarded-For": address}
            return client.post(SESSION_TOKEN, headers=headers).status_code

        first = [attempt("203.0.113.7") for _ in range(4)]
        other = [attempt("203.0.113.8") for _ in range(3)]
        blocked = client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-Forwarded-For": "203.0.113.7"})
        elsewhere = client.post(SESSION_TOKEN, headers={**proxy.auth(), "X-Forwarded-For": "203.0.113.8"})
    assert first == [401, 401, 401, 429]
    assert other == [401, 401, 401]
    # The blocked address is refused even with a valid key this process has not verified yet (no
    # key lookup for it); the other address is served.
    assert blocked.status_code == 429
    assert elsewhere.status_code == 200


def test_every_authenticated_outcome_counts_against_the_subject(make_proxy: MakeProxy) -> None:
    overrides = {"LIVENESS_PROXY_RATE_LIMIT_RESULT": "3/minute"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        malformed = [client.get(f"{SESSIONS}/not%20an%20id/result", headers=proxy.auth()) for _ in range(4)]
        forbidden = [client.get(SESSIONS, headers=proxy.auth(proxy.keys.bob)) for _ in range(4)]
        rows = proxy.audit_rows()
    assert [response.status_code for response in malformed] == [400, 400, 400, 429]
    assert [response.status_code for response in forbidden] == [403, 403, 403, 429]
    assert malformed[-1].json()["limit"] == forbidden[-1].json()["limit"] == "result"
    assert [row["status"] for row in rows] == [400, 400, 400, 429, 403, 403, 403, 429]


def test_the_daily_total_caps_attempts_across_subjects_and_shows_how_close_it_is(
    make_proxy: MakeProxy,
) -> None:
    overrides = {"LIVENESS_PROXY_DAILY_ATTEMPTS_TOTAL": "3", "LIVENESS_PROXY_DAILY_ATTEMPTS": "1"}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:

        def create(key: str) -> httpx.Response:
            headers = proxy.auth(key)
            token = client.post(SESSION_TOKEN, headers=headers).json()["session_token"]
            return client.post(SESSIONS, headers=headers, json={"session_token": token})

        def used_ratio() -> float:
            text = client.get("/metrics").text
            [line] = [
                line
                for line in text.splitlines()
                if line.startswith("liveness_proxy_daily_attempts_total_used_ratio ")
            ]
            return float(line.split()[1])

        before = used_ratio()
        alice = [create(proxy.keys.alice).status_code for _ in range(2)]
        # Alice's own cap refused her second attempt before it used any of the total.
        after_alice = used_ratio()
        bob = create(proxy.keys.bob).status_code
        carol = create(proxy.keys.revocable).status_code
        admin = create(proxy.keys.admin)
    assert before == 0.0
    assert alice == [201, 429]
    assert after_alice == pytest.approx(1 / 3)
    assert (bob, carol) == (201, 201)
    assert admin.status_code == 429
    problem = admin.json()
    assert problem["limit"] == "daily_attempts_total"
    assert "for this service" in problem["detail"]
    assert int(admin.headers["retry-after"]) <= 86400


async def test_the_unauthenticated_limit_is_fleet_wide_through_redis() -> None:
    require_redis()
    client = aioredis.Redis.from_url(REDIS_URL, protocol=2)
    prefix = f"test-{time.monotonic_ns()}:"
    policy = LimitPolicy(
        session_token="off", create_session="off", result="off", daily_attempts=0, unauthenticated="4/minute"
    )
    try:
        replicas = [
            AddressGate(SubjectLimits(policy, shared=redis_limit_storage(client, key_prefix=prefix)))
            for _ in range(2)
        ]
        for gate in replicas:
            await gate.failed("198.51.100.1")
            await gate.failed("198.51.100.1")
        with pytest.raises(RateLimited) as refused:
            await replicas[0].failed("198.51.100.1")
        assert refused.value.limit == "unauthenticated"
        assert replicas[0].refusal("198.51.100.1") is not None
        assert replicas[1].refusal("198.51.100.1") is None  # it learns on its own next failure
        with pytest.raises(RateLimited):
            await replicas[1].failed("198.51.100.1")
        await replicas[1].failed("198.51.100.2")
    finally:
        await client.aclose()


def test_blocked_addresses_are_bounded_in_memory() -> None:
    policy = LimitPolicy(
        session_token="off", create_session="off", result="off", daily_attempts=0, unauthenticated="1/minute"
    )
    gate = AddressGate(SubjectLimits(policy), max_blocked=10)

    async def flood() -> None:
        for number in range(50):
            address = f"10.0.0.{number}"
            await gate.failed(address)
            with pytest.raises(RateLimited):
                await gate.failed(address)

    asyncio.run(flood())
    blocked = [f"10.0.0.{number}" for number in range(50) if gate.refusal(f"10.0.0.{number}") is not None]
    assert blocked == [f"10.0.0.{number}" for number in range(40, 50)]


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    """An audit log of its own, on a migrated SQLite database."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", pool_size=1)
    await upgrade_database(engine, keys=TEST_KEYS)
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    try:
        yield log
    finally:
        await log.close()
        await engine.dispose()


async def test_rows_per_window_are_bounded_however_addresses_rotate(audit: AuditLog) -> None:
    now = [1_000_000.0]
    counted: list[str] = []
    failed = FailedAuthentications(
        audit,
        logger=structlog.get_logger(),
        new_request_id=lambda: "fresh",
        window_seconds=60,
        max_addresses=5,
        wall_clock=lambda: now[0],
        on_failure=counted.append,
    )
    for number in range(40):  # 40 addresses, 3 failures each, in one window
        for attempt in range(3):
            failed.count("jwt", f"10.1.0.{number}", f"r{number}-{attempt}", refused_by_limit=attempt == 2)
    now[0] += 60  # the next window: the first one is written
    failed.count("none", "10.1.0.1", "next", refused_by_limit=False)
    await failed.flush()
    rows = [row async for row in audit.iterate()]
    verdict = await audit.verify()
    aggregates = _aggregates(rows)
    assert len(rows) == 7  # 5 addresses + 1 overflow in the first window, 1 in the next
    first_window = [row for row in aggregates if row["window_start"] == 999_960.0]
    assert [row["action"] for row in first_window] == ["auth.failed"] * 5 + ["auth.failed.overflow"]
    assert sum(row["failures"] for row in first_window) == 120
    assert sum(row["refused_by_limit"] for row in first_window) == 40
    overflow = first_window[-1]
    assert (overflow["addresses"], overflow["failures"]) == (35, 105)
    assert first_window[0]["request_id"] == "r0-0"
    assert len(counted) == 121
    assert verdict.ok


async def test_a_window_is_written_when_it_ends_without_further_traffic(audit: AuditLog) -> None:
    failed = FailedAuthentications(
        audit,
        logger=structlog.get_logger(),
        new_request_id=lambda: "fresh",
        window_seconds=0.2,
        flush_delay_seconds=0.05,
    )
    try:
        failed.count("api_key", "192.0.2.1", "only", refused_by_limit=False)
        deadline = time.monotonic() + 5
        while not (rows := [row async for row in audit.iterate()]):
            assert time.monotonic() < deadline, "the window's record was not written by its timer"
            await asyncio.sleep(0.05)
    finally:
        await failed.flush()
    [record] = _aggregates(rows)
    assert (record["action"], record["failures"], record["request_id"]) == ("auth.failed", 1, "only")


async def test_readiness_checks_the_database_at_most_once_per_interval() -> None:
    now = [0.0]
    pings: list[float] = []

    async def ping() -> None:
        pings.append(now[0])
        await asyncio.sleep(0.01)

    check = CachedCheck(ping, seconds=1.0, clock=lambda: now[0])
    assert await asyncio.gather(*(check.outcome() for _ in range(20))) == ["ok"] * 20
    now[0] = 0.9
    assert await check.outcome() == "ok"
    now[0] = 1.1
    assert await check.outcome() == "ok"
    assert pings == [0.0, 1.1]


async def test_counters_keyed_by_rotating_addresses_stay_bounded() -> None:
    windows = LocalSlidingWindows(max_keys=100)
    item = limits.parse("5/minute")
    for number in range(10_000):
        assert await windows.hit(item, "unauthenticated", f"10.2.{number // 256}.{number % 256}")
    assert len(windows._windows) == 100
    # The newest addresses are the ones still counted: the last one has used 1 of its 5.
    newest = await windows.get_window_stats(item, "unauthenticated", "10.2.39.15")
    oldest = await windows.get_window_stats(item, "unauthenticated", "10.2.0.0")
    assert (newest.remaining, oldest.remaining) == (4, 5)
