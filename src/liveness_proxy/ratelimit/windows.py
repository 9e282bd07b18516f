"""Window counters in this process's memory, with the arithmetic of the `limits` strategies: sliding
windows for the per-route limits, fixed windows for the daily attempt cap. The protocols name what
`SubjectLimits` needs of a limiter, so the `limits` strategies over Redis fit the same slots."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import limits
from limits.util import WindowStats


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

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 5.0,
        max_keys: int | None = None,
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._next_sweep = -math.inf
        self._max_keys = max_keys
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
            if self._max_keys is not None and len(self._windows) >= self._max_keys:
                # Full (a flood of rotating keys): the oldest counter goes, after a sweep if one is
                # due (at most one per interval: a sweep per new key would be quadratic).
                if now >= self._next_sweep:
                    self._sweep(now)
                if len(self._windows) >= self._max_keys:
                    del self._windows[next(iter(self._windows))]
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

    async def test(self, item: limits.RateLimitItem, *identifiers: str) -> bool: ...

    async def hit(self, item: limits.RateLimitItem, *identifiers: str) -> bool: ...

    async def get_window_stats(self, item: limits.RateLimitItem, *identifiers: str) -> WindowStats: ...


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

    async def test(self, item: limits.RateLimitItem, *identifiers: str) -> bool:
        return self._count(item, identifiers) < item.amount

    async def get_window_stats(self, item: limits.RateLimitItem, *identifiers: str) -> WindowStats:
        expiry = item.get_expiry()
        reset = (int(self._clock() // expiry) + 1) * expiry
        return WindowStats(reset, max(0, item.amount - self._count(item, identifiers)))

    def _count(self, item: limits.RateLimitItem, identifiers: tuple[str, ...]) -> int:
        expiry = item.get_expiry()
        state = self._windows.get((item.amount, expiry, identifiers))
        if state is None or state[0] != int(self._clock() // expiry):
            return 0
        return state[1]

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
