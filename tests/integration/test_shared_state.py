"""State shared across processes: the sealed token, its lease and backoff (on Redis and on the
database), the fleet-wide single flight of `TokenManager`, limits in Redis, and what happens when
Redis is unreachable. Several managers in one event loop stand for several processes: they share
nothing but the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from liveness_proxy.errors import RateLimited, TokenUnavailable
from liveness_proxy.ratelimit import LimitPolicy, SubjectLimits, redis_limit_storage
from liveness_proxy.settings import async_database_url
from liveness_proxy.store import create_engine, upgrade_database
from liveness_proxy.store.tables import upstream_token
from liveness_proxy.upstream import (
    DatabaseTokenStore,
    FetchedToken,
    RedisTokenStore,
    SharedStateUnavailable,
    SharedToken,
    SharedTokenPolicy,
    TokenCipher,
    TokenEndpointError,
    TokenManager,
    TokenStore,
)
from services import REDIS_URL, scratch_postgres, scratch_redis
from support import TEST_KEYS, ProxyHarness

CONTEXT = "https://token.example/oauth/token\nclient\ndomain"
SECRET = b"a-client-secret-that-seals-the-token"
# A port nothing listens on: connections are refused at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"


class CountingFetcher:
    """The token endpoint's edge: counts requests, can be slow or fail. Each token is unique."""

    def __init__(self, *, delay: float = 0.0, fail: bool = False, lifetime: float = 3600.0) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self.lifetime = lifetime

    async def fetch(self) -> FetchedToken:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise TokenEndpointError("token endpoint answered HTTP 500", status=500)
        return FetchedToken(value=f"tok-{self.calls}-{time.monotonic_ns()}", lifetime_seconds=self.lifetime)


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, URL or key prefix): one scratch backend per test."""
    if request.param == "redis":
        with scratch_redis() as (_url, prefix):
            yield "redis", prefix
    elif request.param == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'token.db'}"
        yield "database", database_url
    else:
        with scratch_postgres() as url:
            yield "database", async_database_url(url)


@pytest.fixture
async def store_factory(backend: tuple[str, str]) -> AsyncIterator[Callable[[], TokenStore]]:
    """Builds stores that share one backend, each with its own connections, as processes of one
    deployment would."""
    kind, where = backend
    cipher = TokenCipher(SECRET, context=CONTEXT)
    closers: list[Callable[[], Awaitable[None]]] = []
    if kind == "database":
        migrate = create_engine(where, pool_size=1)
        await upgrade_database(migrate, keys=TEST_KEYS)
        await migrate.dispose()

    def build() -> TokenStore:
        if kind == "redis":
            client = aioredis.Redis.from_url(REDIS_URL)
            closers.append(client.aclose)
            return RedisTokenStore(client, key_prefix=where, cipher=cipher)
        engine = create_engine(where, pool_size=2)
        closers.append(engine.dispose)
        return DatabaseTokenStore(engine, cipher=cipher)

    yield build
    for close in closers:
        await close()


_OPEN_MANAGERS: list[TokenManager] = []


def manager(store: TokenStore, fetcher: CountingFetcher, **policy: float) -> TokenManager:
    failures: list[str] = []
    made = TokenManager(
        fetcher,
        refresh_margin=lambda lifetime: min(300.0, lifetime / 3),
        failure_backoff_seconds=policy.pop("backoff", 2.0),
        shared=SharedTokenPolicy(store=store, unavailable=failures.append, **policy),
    )
    _OPEN_MANAGERS.append(made)
    return made


@pytest.fixture
async def redis_client() -> AsyncIterator[Callable[..., aioredis.Redis]]:
    """Opens Redis clients for a test and closes them afterwards, whether it passed or not."""
    opened: list[aioredis.Redis] = []

    def open_client(url: str, *, timeout: float | None = None) -> aioredis.Redis:
        client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        await client.aclose()


# -- the store primitives -----------------------------------------------------------------------


async def test_only_one_owner_holds_the_lease_until_it_lapses_or_is_released(
    store_factory: Callable[[], TokenStore],
) -> None:
    first, second = store_factory(), store_factory()
    assert await first.acquire_lease("owner-a", 0.3)
    assert not await second.acquire_lease("owner-b", 0.3)
    assert not await second.renew_lease("owner-b", 5)  # not the owner: no effect
    await second.release_lease("owner-b")  # not the owner: no effect
    assert not await second.acquire_lease("owner-b", 0.3)
    assert await first.renew_lease("owner-a", 0.3)
    await asyncio.sleep(0.45)  # lapsed: a crashed holder blocks nobody for longer than its lease
    assert await second.acquire_lease("owner-b", 5)
    assert not await first.renew_lease("owner-a", 5)  # the old owner cannot take it back
    await second.release_lease("owner-b")
    assert await first.acquire_lease("owner-a", 5)


async def test_the_token_is_stored_sealed_and_shared(store_factory: Callable[[], TokenStore]) -> None:
    first, second = store_factory(), store_factory()
    assert await second.load() is None
    token = SharedToken("sbx_shared-token-value", expires_at=time.time() + 60, refresh_at=time.time() + 30)
    await first.save(token)
    assert await second.load() == token
    assert await second.backoff_remaining() == 0
    await first.start_backoff(1.5)
    assert 1.0 < await second.backoff_remaining() <= 1.5


async def test_redis_holds_the_token_only_sealed(redis_client: Callable[..., aioredis.Redis]) -> None:
    with scratch_redis() as (url, prefix):
        client = redis_client(url)
        store = RedisTokenStore(client, key_prefix=prefix, cipher=TokenCipher(SECRET, context=CONTEXT))
        await store.save(SharedToken("sbx_plain-token-123", expires_at=time.time() + 60, refresh_at=0))
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 1
        assert keys[0].startswith(f"{prefix}upstream-token:".encode())  # then the account's hash
        raw = await client.get(keys[0])
        assert raw is not None
        assert b"sbx_plain-token-123" not in raw
        assert 0 < await client.pttl(keys[0]) <= 60_000  # gone when it expires


async def test_the_database_holds_the_token_only_sealed(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'sealed.db'}")
    await upgrade_database(engine, keys=TEST_KEYS)
    store = DatabaseTokenStore(engine, cipher=TokenCipher(SECRET, context=CONTEXT))
    await store.save(SharedToken("sbx_plain-token-456", expires_at=time.time() + 60, refresh_at=0))
    async with engine.connect() as connection:
        row = (await connection.execute(select(upstream_token))).one()
    assert row.sealed.startswith("v1.")
    assert "sbx_plain-token-456" not in row.sealed
    await engine.dispose()


# -- the fleet-wide single flight ---------------------------------------------------------------


async def test_five_processes_with_sixty_callers_each_make_one_token_request(
    store_factory: Callable[[], TokenStore],
) -> None:
    fetcher = CountingFetcher(delay=0.2)
    managers = [manager(store_factory(), fetcher) for _ in range(5)]
    tokens = await asyncio.gather(*(m.get() for m in managers for _ in range(60)))
    assert fetcher.calls == 1
    assert len({token.value for token in tokens}) == 1


async def test_the_lease_is_renewed_while_a_slow_token_request_runs(
    store_factory: Callable[[], TokenStore],
) -> None:
    # The request takes more than three lease lifetimes; renewal keeps every other process out
    # meanwhile. The lease is long enough that only a renewal stalled for 0.6 s (two renewal periods)
    # lets a second process in: a CI machine under load stalled a 0.3 s lease's renewal once.
    fetcher = CountingFetcher(delay=3.0)
    managers = [manager(store_factory(), fetcher, lease_seconds=0.9, poll_seconds=0.02) for _ in range(3)]
    tokens = await asyncio.gather(*(m.get() for m in managers))
    assert fetcher.calls == 1
    assert len({token.value for token in tokens}) == 1


async def test_a_crashed_lease_holder_delays_the_others_only_until_its_lease_lapses(
    store_factory: Callable[[], TokenStore],
) -> None:
    store = store_factory()
    assert await store.acquire_lease("a-process-that-died", 0.5)
    fetcher = CountingFetcher()
    started = time.monotonic()
    token = await manager(store_factory(), fetcher, lease_seconds=0.5, poll_seconds=0.02).get()
    assert token.value.startswith("tok-1-")
    assert fetcher.calls == 1
    assert 0.4 < time.monotonic() - started < 3


async def test_a_failed_token_request_pauses_the_whole_fleet(store_factory: Callable[[], TokenStore]) -> None:
    failing = CountingFetcher(fail=True)
    with pytest.raises(TokenUnavailable):
        await manager(store_factory(), failing, backoff=2.0).get()
    assert failing.calls == 1
    healthy = CountingFetcher()
    other_process = manager(store_factory(), healthy, backoff=2.0)
    with pytest.raises(TokenUnavailable) as refused:
        await other_process.get()
    assert healthy.calls == 0  # it did not ask during the other process's pause
    assert refused.value.headers["Retry-After"] in ("1", "2")


async def test_a_token_the_upstream_rejected_is_never_taken_back_from_the_store(
    store_factory: Callable[[], TokenStore],
) -> None:
    fetcher = CountingFetcher()
    one = manager(store_factory(), fetcher, backoff=0.01)
    first = await one.get()
    one.invalidate(first)
    second = await one.get()
    assert second.value != first.value
    assert fetcher.calls == 2
    # Another process that still had the old token adopts the new one from the store.
    other = manager(store_factory(), fetcher)
    assert (await other.get()).value == second.value
    assert fetcher.calls == 2


async def test_a_refresh_due_everywhere_is_made_once(redis_client: Callable[..., aioredis.Redis]) -> None:
    with scratch_redis() as (url, prefix):
        cipher = TokenCipher(SECRET, context=CONTEXT)
        clients = [redis_client(url) for _ in range(3)]
        stores = [RedisTokenStore(c, key_prefix=prefix, cipher=cipher) for c in clients]
        # Lifetime 1.5 s: due for refresh after 1 s (a third is the margin).
        fetcher = CountingFetcher(lifetime=1.5, delay=0.05)
        managers = [manager(store, fetcher, recheck_seconds=0.05, poll_seconds=0.01) for store in stores]
        await asyncio.gather(*(m.get() for m in managers))
        assert fetcher.calls == 1
        await asyncio.sleep(1.1)
        await asyncio.gather(*(m.get() for m in managers))  # each starts a background refresh
        await asyncio.sleep(0.3)
        # The two that found it being refreshed elsewhere look again, and take the new one.
        await asyncio.gather(*(m.get() for m in managers))
        await asyncio.sleep(0.2)
        values = {(await m.get()).value for m in managers}
        assert fetcher.calls == 2
        assert len(values) == 1


# -- Redis unreachable ----------------------------------------------------------------------------


async def test_with_redis_down_each_process_falls_back_to_a_token_of_its_own(
    redis_client: Callable[..., aioredis.Redis],
) -> None:
    client = redis_client(DEAD_REDIS_URL, timeout=0.5)
    store = RedisTokenStore(client, key_prefix="x:", cipher=TokenCipher(SECRET, context=CONTEXT))
    with pytest.raises(SharedStateUnavailable) as failure:
        await store.load()
    assert "redis unavailable" in str(failure.value)
    fetcher = CountingFetcher()
    reported: list[str] = []
    fallback = TokenManager(
        fetcher,
        refresh_margin=lambda lifetime: 1.0,
        failure_backoff_seconds=1.0,
        shared=SharedTokenPolicy(store=store, unavailable=reported.append),
    )
    token = await fallback.get()
    assert token.value.startswith("tok-1-")
    assert reported == ["redis unavailable (ConnectionError)"]


async def test_limits_in_redis_are_shared_and_fall_back_to_memory_when_redis_is_down(
    redis_client: Callable[..., aioredis.Redis],
) -> None:
    policy = LimitPolicy(session_token="4/minute", create_session="off", result="off", daily_attempts=3)
    with scratch_redis() as (url, prefix):
        clients = [redis_client(url) for _ in range(2)]
        replicas = [SubjectLimits(policy, shared=redis_limit_storage(c, key_prefix=prefix)) for c in clients]
        outcomes = []
        for attempt in range(8):
            try:
                await replicas[attempt % 2].check("session_token", "alice")
                outcomes.append("ok")
            except RateLimited:
                outcomes.append("refused")
        assert outcomes == ["ok"] * 4 + ["refused"] * 4
        for attempt in range(3):
            await replicas[attempt % 2].consume_attempt("alice")
        with pytest.raises(RateLimited):
            await replicas[1].consume_attempt("alice")

    dead = redis_client(DEAD_REDIS_URL, timeout=0.5)
    reported: list[str] = []
    alone = SubjectLimits(
        policy, shared=redis_limit_storage(dead, key_prefix="x:"), on_storage_failure=reported.append
    )
    for _ in range(4):
        await alone.check("session_token", "bob")  # served, and still counted (in memory)
    with pytest.raises(RateLimited):
        await alone.check("session_token", "bob")
    assert not alone.shared
    assert reported == ["rate-limit storage unavailable (StorageError)"]  # once per failover period


@pytest.fixture
def proxy_without_redis(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> Iterator[ProxyHarness]:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_REDIS_URL": DEAD_REDIS_URL}) as running:
        yield running


@pytest.mark.served
async def test_a_proxy_whose_redis_is_down_serves_and_reports_degraded_readiness(
    proxy_without_redis: ProxyHarness,
) -> None:
    proxy = proxy_without_redis
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "degraded"
        assert body["checks"]["redis"] == "degraded: ConnectionError"
        assert body["checks"]["upstream_token"] == "ok"
        # Authentication and ownership still hold: they never depend on Redis.
        assert (await http.post("/v1/liveness/session-token")).status_code == 401
        # Session tokens are bound in Redis when it is configured: that check fails closed, never a
        # per-process guess another replica could not confirm.
        session = await http.post("/v1/liveness/session-token", headers=proxy.auth())
        assert session.status_code == 503
        assert session.json()["type"].endswith(":store-unavailable")
        assert "Redis" in session.json()["detail"]
        metrics = (await http.get("/metrics")).text
    assert 'liveness_proxy_shared_state_failures_total{component="rate_limits"} 1.0' in metrics
    assert 'liveness_proxy_shared_state_failures_total{component="token_cache"} 1.0' in metrics
    assert "shared_state_unavailable" in proxy.log_text()


class InvalidatingStore:
    """A real store, plus a hook that runs while a refresh is between its reads: the moment a
    caller's request comes back 401 in production."""

    def __init__(self, store: TokenStore, on_lease: Callable[[], None]) -> None:
        self._store = store
        self._on_lease = on_lease
        self.kind = store.kind

    async def load(self) -> SharedToken | None:
        return await self._store.load()

    async def save(self, token: SharedToken) -> None:
        await self._store.save(token)

    async def acquire_lease(self, owner: str, ttl_seconds: float) -> bool:
        self._on_lease()
        return await self._store.acquire_lease(owner, ttl_seconds)

    async def renew_lease(self, owner: str, ttl_seconds: float) -> bool:
        return await self._store.renew_lease(owner, ttl_seconds)

    async def release_lease(self, owner: str) -> None:
        await self._store.release_lease(owner)

    async def backoff_remaining(self) -> float:
        return await self._store.backoff_remaining()

    async def start_backoff(self, seconds: float) -> None:
        await self._store.start_backoff(seconds)


async def test_a_token_rejected_during_a_refresh_is_not_adopted_again(
    store_factory: Callable[[], TokenStore],
) -> None:
    # A due token is in the store and another process holds the lease. While this process's
    # refresh waits on the store, a request comes back 401 with that very token.
    due = SharedToken("tok-due", expires_at=time.time() + 60, refresh_at=time.time() - 1)
    await store_factory().save(due)
    assert await store_factory().acquire_lease("another-process", 30)
    holder: list[TokenManager] = []

    def reject_current() -> None:
        current = holder[0].cached
        if current is not None:
            holder[0].invalidate(current)

    fetcher = CountingFetcher()
    one = manager(
        InvalidatingStore(store_factory(), reject_current), fetcher, poll_seconds=0.02, wait_seconds=0.5
    )
    holder.append(one)
    one._token = one._local(due)  # what it had been using
    with pytest.raises(TokenUnavailable):
        await one._refresh()
    assert one.cached is None or one.cached.value != "tok-due"


async def test_waiting_on_a_lease_that_never_ends_is_bounded_and_not_repeated(
    store_factory: Callable[[], TokenStore],
) -> None:
    assert await store_factory().acquire_lease("a-stuck-process", 60)
    fetcher = CountingFetcher()
    waiting = manager(store_factory(), fetcher, wait_seconds=0.3, poll_seconds=0.02)
    started = time.monotonic()
    with pytest.raises(TokenUnavailable):
        await waiting.get()
    assert 0.3 <= time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(TokenUnavailable):
        await waiting.get()  # answered at once: nobody queues behind the same stuck lease again
    assert time.monotonic() - started < 0.1
    assert fetcher.calls == 0


async def test_many_requests_failing_over_at_once_report_it_once(
    redis_client: Callable[..., aioredis.Redis],
) -> None:
    policy = LimitPolicy(session_token="100/minute", create_session="off", result="off", daily_attempts=0)
    dead = redis_client(DEAD_REDIS_URL, timeout=0.5)
    reported: list[str] = []
    limits = SubjectLimits(
        policy, shared=redis_limit_storage(dead, key_prefix="x:"), on_storage_failure=reported.append
    )
    await asyncio.gather(*(limits.check("session_token", f"user-{n}") for n in range(20)))
    assert len(reported) == 1
