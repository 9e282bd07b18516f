"""Per-subject rate limits and the daily attempt cap: `SubjectLimits`, counting in Redis when the
counts are shared and in this process's memory otherwise (or while Redis cannot be reached)."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import limits
import limits.errors
import redis.asyncio as aioredis
import redis.exceptions
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

from liveness_proxy.errors import RateLimited
from liveness_proxy.ratelimit.windows import (
    FixedLimiter,
    LocalFixedWindows,
    LocalSlidingWindows,
    WindowLimiter,
)

LimitName = Literal["session_token", "create_session", "result", "unauthenticated"]
DAILY_ATTEMPTS = "daily_attempts"
DAILY_ATTEMPTS_TOTAL = "daily_attempts_total"
# The deployment-wide cap's counter: one key for every subject (no subject can be named this way,
# subjects are caller identities and this is not passed through from a request).
_WHOLE_DEPLOYMENT = "*"
_SECONDS_PER_DAY = 86_400
_TOTAL_GAUGE_REFRESH_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The configured limits, in the `limits` string notation ("off" disables one)."""

    session_token: str
    create_session: str
    result: str
    daily_attempts: int  # 0: no cap
    # Per client address, for requests without a valid credential (see `ratelimit/anonymous.py`).
    unauthenticated: str = "off"
    daily_attempts_total: int = 0  # 0: no cap; across all subjects and the whole fleet


def _parse(notation: str) -> tuple[limits.RateLimitItem, ...]:
    if notation == "off":
        return ()
    return tuple(limits.parse_many(notation))


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
    def local(cls, wall_clock: Callable[[], float], max_keys: int | None = None) -> _Counters:
        # Lean in-process counters with the `limits` arithmetic. The daily cap's windows follow the
        # clock that names the day in its key, so a day's count ends when its day does.
        return cls(LocalSlidingWindows(max_keys=max_keys), LocalFixedWindows(clock=wall_clock))


# What a shared storage raises when it cannot be reached (`limits` wraps the client's errors).
_STORAGE_FAILURES = (limits.errors.StorageError, redis.exceptions.RedisError, ConnectionError, TimeoutError)


class SubjectLimits:
    """Checks and consumes a subject's budget; raises `RateLimited` naming the exhausted limit.

    With a `shared` storage (Redis) every replica counts against the same budget. When it cannot be
    reached, counting continues in this process's memory for `failover_seconds` before the shared
    storage is tried again: callers keep being served and limited (per process, so a fleet of N
    allows up to N times a limit meanwhile), and `on_storage_failure` reports it.

    `local_max_keys` bounds the in-memory counters (oldest first forgotten): for counters keyed by
    something an attacker can rotate (client addresses), never for subjects, whose forgotten counts
    would be budget given back.
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
        local_max_keys: int | None = None,
    ) -> None:
        self._local = _Counters.local(wall_clock, local_max_keys)
        self._shared = None if shared is None else _Counters.over(shared)
        self._shared_down_until = -math.inf
        self._failover_seconds = failover_seconds
        self._clock = clock
        self._notation: dict[LimitName, str] = {
            "session_token": policy.session_token,
            "create_session": policy.create_session,
            "result": policy.result,
            "unauthenticated": policy.unauthenticated,
        }
        self._items: dict[LimitName, tuple[limits.RateLimitItem, ...]] = {
            name: _parse(notation) for name, notation in self._notation.items()
        }
        self._daily = limits.RateLimitItemPerDay(policy.daily_attempts) if policy.daily_attempts else None
        self._daily_total = (
            limits.RateLimitItemPerDay(policy.daily_attempts_total) if policy.daily_attempts_total else None
        )
        # (UTC day, attempts counted) as last learnt from the storage: what the gauge shows.
        self._total_used: tuple[str, int] = ("", 0)
        self._total_gauge_due = -math.inf
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
        """Counts one liveness attempt against the subject's cap and the deployment's cap for the
        current UTC day; raises RateLimited (`daily_attempts`, `daily_attempts_total`) when over."""
        if self._daily is None and self._daily_total is None:
            return
        shared = self._shared
        if shared is not None and self._clock() >= self._shared_down_until:
            try:
                await self._consume_attempt(shared, subject)
            except _STORAGE_FAILURES as exc:
                self._failed_over(exc)
            else:
                return
        await self._consume_attempt(self._local, subject)

    @property
    def attempts_total_used_ratio(self) -> float:
        """How much of today's deployment-wide cap is used, as last counted here (0 without a cap,
        and 0 again once the UTC day the count belongs to has ended)."""
        if self._daily_total is None:
            return 0.0
        day, used = self._total_used
        if day != self._utc_day(self._wall_clock()):
            return 0.0
        return min(1.0, used / self._daily_total.amount)

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
            f"Rate limit '{name}' ({self._notation[name]}) exceeded for this "
            f"{'client address' if name == 'unauthenticated' else 'caller'}.",
            retry_after_seconds=retry_after,
            limit=name,
        )

    async def _consume_attempt(self, counters: _Counters, subject: str) -> None:
        now = self._wall_clock()
        day = self._utc_day(now)
        # The day is part of the key, so the budget resets at UTC midnight for everyone alike
        # (a plain 1-day window would start at each subject's first attempt).
        daily, total = self._daily, self._daily_total
        # A subject already at its own cap must not use up the deployment's: test it first. Two
        # concurrent attempts of one subject can both pass the test; the loser of the count below
        # is refused and has used one unit of the total (over-counting the total, never under).
        if (
            daily is not None
            and total is not None
            and not await counters.fixed.test(daily, DAILY_ATTEMPTS, day, subject)
        ):
            self._refuse_attempt(DAILY_ATTEMPTS, daily, now, "for this caller")
        if total is not None:
            if not await counters.fixed.hit(total, DAILY_ATTEMPTS_TOTAL, day, _WHOLE_DEPLOYMENT):
                self._total_used = (day, total.amount)
                self._refuse_attempt(DAILY_ATTEMPTS_TOTAL, total, now, "for this service")
            # The gauge is refreshed at most every few seconds (a round trip to Redis when shared),
            # and at once when the day changed.
            if now >= self._total_gauge_due or self._total_used[0] != day:
                self._total_gauge_due = now + _TOTAL_GAUGE_REFRESH_SECONDS
                stats = await counters.fixed.get_window_stats(
                    total, DAILY_ATTEMPTS_TOTAL, day, _WHOLE_DEPLOYMENT
                )
                self._total_used = (day, total.amount - stats.remaining)
        if daily is not None and not await counters.fixed.hit(daily, DAILY_ATTEMPTS, day, subject):
            self._refuse_attempt(DAILY_ATTEMPTS, daily, now, "for this caller")

    def _refuse_attempt(self, name: str, cap: limits.RateLimitItem, now: float, whose: str) -> None:
        self._rejected(name)
        seconds_to_midnight = _SECONDS_PER_DAY - (now % _SECONDS_PER_DAY)
        raise RateLimited(
            f"The daily cap of {cap.amount} liveness attempts is reached {whose}; it resets at 00:00 UTC.",
            retry_after_seconds=math.ceil(seconds_to_midnight),
            limit=name,
        )

    @staticmethod
    def _utc_day(now: float) -> str:
        return dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()

    def _failed_over(self, exc: BaseException) -> None:
        # Requests in flight when the storage failed all land here; only the first reports it.
        was_up = self._clock() >= self._shared_down_until
        self._shared_down_until = self._clock() + self._failover_seconds
        if was_up and self._on_storage_failure is not None:
            self._on_storage_failure(f"rate-limit storage unavailable ({type(exc).__name__})")

    def _rejected(self, name: str) -> None:
        if self._on_reject is not None:
            self._on_reject(name)


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
