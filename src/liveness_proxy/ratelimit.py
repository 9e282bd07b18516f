"""Per-subject rate limits, the daily attempt cap, and the global cap on concurrent upstream calls.

Limits are per *subject* (the authenticated caller), not per IP: one end user behind a carrier NAT
must not exhaust another's budget, and one user with many IPs must not escape theirs. When several
replicas must share the counts, the `limits` library counts them atomically in Redis
(`redis_limit_storage`); in this process's memory, lean counters with its arithmetic do
(`LocalSlidingWindows`, `LocalFixedWindows`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import limits
import limits.errors
import redis.asyncio as aioredis
import redis.exceptions
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.util import WindowStats

from liveness_proxy.errors import RateLimited, ServiceUnavailable

LimitName = Literal["session_token", "create_session", "result"]
DAILY_ATTEMPTS = "daily_attempts"
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The configured limits, in the `limits` string notation ("off" disables one)."""

    session_token: str
    create_session: str
    result: str
    daily_attempts: int  # 0: no cap


def _parse(notation: str) -> tuple[limits.RateLimitItem, ...]:
    if notation == "off":
        return ()
    return tuple(limits.parse_many(notation))


class WindowLimiter(Protocol):
    """What SubjectLimits needs of a sliding-window limiter (the `limits` strategy has this shape)."""

    async def test(self, item: limits.RateLimitItem, *identifiers: str) -> bool: ...

    async def hit(self, item: limits.RateLimitItem, *identifiers: str) -> bool: ...

    async def get_window_stats(self, item: limits.RateLimitItem, *identifiers: str) -> WindowStats: ...


class LocalSlidingWindows:
    """Sliding-window counters in this process's memory, with the arithmetic of `limits`'
    SlidingWindowCounterRateLimiter (the previous window's count, weighted by how much of it still
    overlaps the sliding window, plus the current window's count) but without its storage layer.

    Every request is checked here when Redis is not in use, and the stock memory storage cost several
    awaits, key formatting and expiry bookkeeping per check (profiled: ~7% of a result read). Here a
    check is one dict lookup. Windows older than the previous one are swept at most once per
    `sweep_interval`, so memory follows the active subjects.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, sweep_interval: float = 5.0) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = -math.inf
        # (amount, window seconds, identifiers) -> [window index, previous count, current count]
        self._windows: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}

    async def test(self, item: limits.RateLimitItem, *identifiers: str) -> bool:
        now = self._clock()
        state = self._windows.get((item.amount, item.get_expiry(), identifiers))
        return state is None or self._weighted(state, item.get_expiry(), now) < item.amount

    async def hit(self, item: limits.RateLimitItem, *identifiers: str) -> bool:
        now = self._clock()
        expiry = item.get_expiry()
        key = (item.amount, expiry, identifiers)
        state = self._windows.get(key)
        if state is None:
            state = self._windows[key] = [int(now // expiry), 0, 0]
            if now >= self._next_sweep:
                self._sweep(now)
        if math.floor(self._weighted(state, expiry, now)) + 1 > item.amount:
            return False
        state[2] += 1
        return True

    async def get_window_stats(self, item: limits.RateLimitItem, *identifiers: str) -> WindowStats:
        now = self._clock()
        expiry = item.get_expiry()
        state = self._windows.get((item.amount, expiry, identifiers))
        if state is None:
            return WindowStats(now, item.amount)
        weighted = self._weighted(state, expiry, now)
        remaining = max(0, item.amount - math.floor(weighted))
        previous, current = state[1], state[2]
        if not (previous or current):
            return WindowStats(now, remaining)
        # As `limits` computes it: when the next unit of the budget comes back.
        previous_reset_in, current_reset_in = math.inf, math.inf
        into_window = now % expiry
        if previous:
            previous_reset_in = (expiry - into_window) % (expiry / previous)
        if current:
            current_reset_in = (2 * expiry - into_window) % expiry
        return WindowStats(now + min(previous_reset_in, current_reset_in), remaining)

    @staticmethod
    def _weighted(state: list[int], expiry: int, now: float) -> float:
        index = int(now // expiry)
        if state[0] != index:
            # The window moved on: the current count becomes the previous one (or both lapse).
            state[1] = state[2] if state[0] == index - 1 else 0
            state[2] = 0
            state[0] = index
        previous_overlap = (expiry - now % expiry) / expiry
        return state[1] * previous_overlap + state[2]

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_interval
        stale = [key for key, state in self._windows.items() if state[0] < int(now // key[1]) - 1]
        for key in stale:
            del self._windows[key]


class FixedLimiter(Protocol):
    """What SubjectLimits needs of a fixed-window limiter (the `limits` strategy has this shape)."""

    async def hit(self, item: limits.RateLimitItem, *identifiers: str) -> bool: ...


class LocalFixedWindows:
    """Fixed-window counters in this process's memory, for the daily attempt cap when Redis is not in
    use (or not reachable). Windows are aligned to the epoch (`now // window`): UTC days for a day.

    The `limits` memory storage counted these before, but it starts a sweep over every key after
    nearly every count, and the cap keeps one key per subject for a whole day: O(subjects) of blocked
    event loop per attempt (measured: 25-40 ms at 100,000 subjects); bounding that sweep meant
    overriding a private, name-mangled method of the library. Here a count is one dict lookup, and
    windows that have ended are swept at most once per `sweep_interval`, so memory follows the
    subjects counted in the current window.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, sweep_interval: float = 5.0) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = -math.inf
        # (amount, window seconds, identifiers) -> [window index, count]
        self._windows: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}

    async def hit(self, item: limits.RateLimitItem, *identifiers: str) -> bool:
        now = self._clock()
        expiry = item.get_expiry()
        index = int(now // expiry)
        key = (item.amount, expiry, identifiers)
        state = self._windows.get(key)
        if state is None or state[0] != index:
            state = self._windows[key] = [index, 0]
            if now >= self._next_sweep:
                self._sweep(now)
        if state[1] >= item.amount:
            return False
        state[1] += 1
        return True

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_interval
        ended = [key for key, state in self._windows.items() if state[0] < int(now // key[1])]
        for key in ended:
            del self._windows[key]


@dataclass(frozen=True, slots=True)
class _Counters:
    window: WindowLimiter
    fixed: FixedLimiter

    @classmethod
    def over(cls, storage: Storage) -> _Counters:
        # Sliding-window counters: smooth (no burst of 2x at a window edge) and O(1) per key, in
        # memory and in Redis alike. The daily cap is a fixed window keyed by the UTC day.
        return cls(SlidingWindowCounterRateLimiter(storage), FixedWindowRateLimiter(storage))

    @classmethod
    def local(cls, wall_clock: Callable[[], float]) -> _Counters:
        # Lean in-process counters with the `limits` arithmetic. The daily cap's windows follow the
        # clock that names the day in its key, so a day's count ends when its day does.
        return cls(LocalSlidingWindows(), LocalFixedWindows(clock=wall_clock))


# What a shared storage raises when it cannot be reached (`limits` wraps the client's errors).
_STORAGE_FAILURES = (limits.errors.StorageError, redis.exceptions.RedisError, ConnectionError, TimeoutError)


class SubjectLimits:
    """Checks and consumes a subject's budget; raises `RateLimited` naming the exhausted limit.

    With a `shared` storage (Redis) every replica counts against the same budget. When it cannot be
    reached, counting continues in this process's memory for `failover_seconds` before the shared
    storage is tried again: callers keep being served and limited (per process, so a fleet of N
    allows up to N times a limit meanwhile), and `on_storage_failure` reports it.
    """

    def __init__(
        self,
        policy: LimitPolicy,
        *,
        shared: Storage | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_reject: Callable[[str], None] | None = None,
        on_storage_failure: Callable[[str], None] | None = None,
        failover_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._local = _Counters.local(wall_clock)
        self._shared = None if shared is None else _Counters.over(shared)
        self._shared_down_until = -math.inf
        self._failover_seconds = failover_seconds
        self._clock = clock
        self._notation: dict[LimitName, str] = {
            "session_token": policy.session_token,
            "create_session": policy.create_session,
            "result": policy.result,
        }
        self._items: dict[LimitName, tuple[limits.RateLimitItem, ...]] = {
            name: _parse(notation) for name, notation in self._notation.items()
        }
        self._daily = limits.RateLimitItemPerDay(policy.daily_attempts) if policy.daily_attempts else None
        self._wall_clock = wall_clock
        self._on_reject = on_reject
        self._on_storage_failure = on_storage_failure

    @property
    def shared(self) -> bool:
        """Whether counts go to the shared storage right now."""
        return self._shared is not None and self._clock() >= self._shared_down_until

    async def check(self, name: LimitName, subject: str) -> None:
        """Counts one request of `subject` against limit `name`; raises RateLimited when over."""
        if not self._items[name]:
            return
        shared = self._shared
        if shared is not None and self._clock() >= self._shared_down_until:
            # If the storage fails between two limits' counts, the request is counted again in
            # memory: over-counting once, at the moment of failure, never under-counting.
            try:
                await self._check(shared, name, subject)
            except _STORAGE_FAILURES as exc:
                self._failed_over(exc)
            else:
                return
        await self._check(self._local, name, subject)

    async def consume_attempt(self, subject: str) -> None:
        """Counts one liveness attempt against the subject's cap for the current UTC day."""
        if self._daily is None:
            return
        shared = self._shared
        if shared is not None and self._clock() >= self._shared_down_until:
            try:
                await self._consume_attempt(shared, self._daily, subject)
            except _STORAGE_FAILURES as exc:
                self._failed_over(exc)
            else:
                return
        await self._consume_attempt(self._local, self._daily, subject)

    async def _check(self, counters: _Counters, name: LimitName, subject: str) -> None:
        items = self._items[name]
        if len(items) == 1:
            # One limit (the usual case): a hit is itself an atomic test-and-count that counts
            # nothing when it refuses, so the separate test is skipped (half the storage calls, and
            # half the Redis round trips when the counts are shared).
            if not await counters.window.hit(items[0], name, subject):
                await self._refuse(counters, name, items[0], subject)
            return
        # Test every limit before counting against any, so a request refused by one limit does not
        # use up the others ("100/hour;10/minute": a burst must not drain the hourly budget).
        for item in items:
            if not await counters.window.test(item, name, subject):
                await self._refuse(counters, name, item, subject)
        for item in items:
            if not await counters.window.hit(item, name, subject):  # lost a race since the test
                await self._refuse(counters, name, item, subject)

    async def _refuse(
        self, counters: _Counters, name: LimitName, item: limits.RateLimitItem, subject: str
    ) -> None:
        try:
            stats = await counters.window.get_window_stats(item, name, subject)
            retry_after = math.ceil(max(0.0, stats.reset_time - time.time()))
        except _STORAGE_FAILURES:
            # The storage already said no; failing to learn when the window resets must not turn
            # that into a yes in a fresh per-process counter. The window length is an upper bound.
            retry_after = item.get_expiry()
        self._rejected(name)
        raise RateLimited(
            f"Rate limit '{name}' ({self._notation[name]}) exceeded for this caller.",
            retry_after_seconds=retry_after,
            limit=name,
        )

    async def _consume_attempt(self, counters: _Counters, daily: limits.RateLimitItem, subject: str) -> None:
        now = self._wall_clock()
        day = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        # The day is part of the key, so the budget resets at UTC midnight for everyone alike
        # (a plain 1-day window would start at each subject's first attempt).
        if not await counters.fixed.hit(daily, DAILY_ATTEMPTS, day, subject):
            self._rejected(DAILY_ATTEMPTS)
            seconds_to_midnight = _SECONDS_PER_DAY - (now % _SECONDS_PER_DAY)
            raise RateLimited(
                f"The daily cap of {daily.amount} liveness attempts is reached for this caller; "
                "it resets at 00:00 UTC.",
                retry_after_seconds=math.ceil(seconds_to_midnight),
                limit=DAILY_ATTEMPTS,
            )

    def _failed_over(self, exc: BaseException) -> None:
        # Requests in flight when the storage failed all land here; only the first reports it.
        was_up = self._clock() >= self._shared_down_until
        self._shared_down_until = self._clock() + self._failover_seconds
        if was_up and self._on_storage_failure is not None:
            self._on_storage_failure(f"rate-limit storage unavailable ({type(exc).__name__})")

    def _rejected(self, name: str) -> None:
        if self._on_reject is not None:
            self._on_reject(name)


class UpstreamGate:
    """At most `capacity` upstream calls in flight in this process. Excess callers wait up to
    `wait_seconds` for a slot, then get 503: a traffic spike queues briefly instead of multiplying
    the load (and the bill) on the customer's Cynopsis quota.

    Every liveness request passes through here, so the common case costs no timer and no generator:
    a free slot is taken at once; only a caller that has to wait arms the timeout. The in-flight and
    waiting counts are read by the metrics at scrape time, not pushed on every change."""

    def __init__(
        self,
        capacity: int,
        *,
        wait_seconds: float,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self._capacity = capacity
        self._wait_seconds = wait_seconds
        self._waiting = 0
        self._in_flight = 0
        self._on_reject = on_reject

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    def slot(self) -> _GateSlot:
        """`async with gate.slot(): ...` holds one slot for the duration of the block."""
        return _GateSlot(self)

    async def _acquire(self) -> None:
        if not self._slots.locked():
            # Free and nobody queued ahead: the semaphore grants it without suspending.
            await self._slots.acquire()
        else:
            self._waiting += 1
            try:
                async with asyncio.timeout(self._wait_seconds):
                    await self._slots.acquire()
            except TimeoutError:
                if self._on_reject is not None:
                    self._on_reject()
                raise ServiceUnavailable(
                    "Too many liveness calls are in progress; retry shortly.", retry_after_seconds=1
                ) from None
            finally:
                self._waiting -= 1
        self._in_flight += 1

    def _release(self) -> None:
        self._in_flight -= 1
        self._slots.release()


class _GateSlot:
    __slots__ = ("_gate",)

    def __init__(self, gate: UpstreamGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        await self._gate._acquire()

    async def __aexit__(self, *_exc_info: object) -> None:
        self._gate._release()


def redis_limit_storage(client: aioredis.Redis, *, key_prefix: str) -> RedisStorage:
    """The `limits` Redis storage over the deployment's Redis connection pool (redis-py), with
    client errors wrapped in `limits.errors.StorageError`."""
    # The URI only selects the storage class: connections (and TLS) come from the pool.
    return RedisStorage(
        "async+redis://",
        implementation="redispy",
        connection_pool=client.connection_pool,  # type: ignore[arg-type]  # typed as if only scalars
        key_prefix=f"{key_prefix}limits",
        wrap_exceptions=True,
    )
