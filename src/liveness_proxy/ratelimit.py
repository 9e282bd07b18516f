"""Per-subject rate limits, the daily attempt cap, and the global cap on concurrent upstream calls.

Limits are per *subject* (the authenticated caller), not per IP: one end user behind a carrier NAT
must not exhaust another's budget, and one user with many IPs must not escape theirs. Counting is
done by the `limits` library, whose storages update counters atomically (in memory here; Redis
when several replicas must share the counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import limits
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

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


class ThrottledMemoryStorage(MemoryStorage):
    """The `limits` memory storage, sweeping expired keys at most once per `sweep_interval`.

    The stock storage starts a sweep over every key after nearly every count; with one key per
    subject and limit (a day's worth for the attempt cap) that is O(subjects) event-loop time per
    request: ~25 ms at 100,000 subjects. Expiry is also checked on every read, so sweeping less often
    only delays when memory is given back, never what a limit allows.
    """

    def __init__(self, *, sweep_interval: float = 5.0) -> None:
        super().__init__()
        self._sweep_interval = sweep_interval
        self._last_sweep = -math.inf

    # Overrides the parent's private hook (name-mangled); a test fails if a `limits` upgrade renames it.
    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < self._sweep_interval:
            return
        self._last_sweep = now
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


class SubjectLimits:
    """Checks and consumes a subject's budget; raises `RateLimited` naming the exhausted limit."""

    def __init__(
        self,
        policy: LimitPolicy,
        *,
        storage: Storage | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._storage = storage or ThrottledMemoryStorage()
        # Sliding-window counters: smooth (no burst of 2x at a window edge) and O(1) per key, in
        # memory and in Redis alike.
        self._window = SlidingWindowCounterRateLimiter(self._storage)
        self._fixed = FixedWindowRateLimiter(self._storage)
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

    async def check(self, name: LimitName, subject: str) -> None:
        """Counts one request of `subject` against limit `name`; raises RateLimited when over."""
        items = self._items[name]
        # Test every limit before counting against any, so a request refused by one limit does not
        # use up the others ("100/hour;10/minute": a burst must not drain the hourly budget).
        for item in items:
            if not await self._window.test(item, name, subject):
                await self._refuse(name, item, subject)
        for item in items:
            if not await self._window.hit(item, name, subject):  # lost a race since the test
                await self._refuse(name, item, subject)

    async def _refuse(self, name: LimitName, item: limits.RateLimitItem, subject: str) -> None:
        stats = await self._window.get_window_stats(item, name, subject)
        self._rejected(name)
        raise RateLimited(
            f"Rate limit '{name}' ({self._notation[name]}) exceeded for this caller.",
            retry_after_seconds=math.ceil(max(0.0, stats.reset_time - time.time())),
            limit=name,
        )

    async def consume_attempt(self, subject: str) -> None:
        """Counts one liveness attempt against the subject's cap for the current UTC day."""
        if self._daily is None:
            return
        now = self._wall_clock()
        day = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        # The day is part of the key, so the budget resets at UTC midnight for everyone alike
        # (a plain 1-day window would start at each subject's first attempt).
        if not await self._fixed.hit(self._daily, DAILY_ATTEMPTS, day, subject):
            self._rejected(DAILY_ATTEMPTS)
            seconds_to_midnight = _SECONDS_PER_DAY - (now % _SECONDS_PER_DAY)
            raise RateLimited(
                f"The daily cap of {self._daily.amount} liveness attempts is reached for this caller; "
                "it resets at 00:00 UTC.",
                retry_after_seconds=math.ceil(seconds_to_midnight),
                limit=DAILY_ATTEMPTS,
            )

    def _rejected(self, name: str) -> None:
        if self._on_reject is not None:
            self._on_reject(name)


class UpstreamGate:
    """At most `capacity` upstream calls in flight in this process. Excess callers wait up to
    `wait_seconds` for a slot, then get 503: a traffic spike queues briefly instead of multiplying
    the load (and the bill) on the customer's Cynopsis quota."""

    def __init__(
        self,
        capacity: int,
        *,
        wait_seconds: float,
        on_change: Callable[[int, int], None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self._capacity = capacity
        self._wait_seconds = wait_seconds
        self._waiting = 0
        self._in_flight = 0
        self._on_change = on_change
        self._on_reject = on_reject

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self._waiting += 1
        self._changed()
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
            self._changed()
        self._in_flight += 1
        self._changed()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._slots.release()
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._in_flight, self._waiting)
