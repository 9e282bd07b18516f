"""Rate limits on their own: the daily cap by the wall clock, switching limits off, several limits in
one setting, the upstream gate, the memory storage and its sweep (through the proxy:
integration/test_limits.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time

import limits as limits_lib
import pytest
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

from liveness_proxy.errors import RateLimited, ServiceUnavailable
from liveness_proxy.ratelimit import (
    DAILY_ATTEMPTS,
    LimitPolicy,
    LocalFixedWindows,
    LocalSlidingWindows,
    SubjectLimits,
    UpstreamGate,
)


async def test_daily_cap_counts_per_utc_day_by_the_wall_clock() -> None:
    now = [dt.datetime(2026, 11, 26, 23, 59, 0, tzinfo=dt.UTC).timestamp()]
    limits = SubjectLimits(
        LimitPolicy(session_token="off", create_session="off", result="off", daily_attempts=1),
        wall_clock=lambda: now[0],
    )
    await limits.consume_attempt("alice")
    with pytest.raises(RateLimited) as refused:
        await limits.consume_attempt("alice")
    assert refused.value.retry_after_seconds == 60
    now[0] += 120  # past midnight: a new day, a new budget
    await limits.consume_attempt("alice")


async def test_off_disables_a_limit_and_zero_disables_the_daily_cap() -> None:
    limits = SubjectLimits(
        LimitPolicy(session_token="off", create_session="off", result="off", daily_attempts=0)
    )
    for _ in range(500):
        await limits.check("result", "alice")
        await limits.consume_attempt("alice")


async def test_several_limits_in_one_setting_all_apply() -> None:
    rejected: list[str] = []
    limits = SubjectLimits(
        LimitPolicy(session_token="3/hour;1/second", create_session="off", result="off", daily_attempts=0),
        on_reject=rejected.append,
    )
    await limits.check("session_token", "alice")
    with pytest.raises(RateLimited):
        await limits.check("session_token", "alice")
    assert rejected == ["session_token"]


async def test_upstream_gate_lets_excess_wait_briefly_then_refuses() -> None:
    rejections: list[None] = []
    gate = UpstreamGate(2, wait_seconds=0.05, on_reject=lambda: rejections.append(None))
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.slot():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert gate.in_flight == 2
    with pytest.raises(ServiceUnavailable) as refused:
        async with gate.slot():
            pass
    assert refused.value.headers["Retry-After"] == "1"
    assert len(rejections) == 1
    # A waiter that gets a slot within the wait is served.
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    assert gate.waiting == 1
    release.set()
    await asyncio.gather(*holders, waiter)
    assert gate.in_flight == 0
    assert gate.waiting == 0


async def test_a_request_refused_by_one_limit_uses_up_none_of_the_others() -> None:
    policy = LimitPolicy(
        session_token="20/hour;2/minute", create_session="off", result="off", daily_attempts=0
    )
    storage = MemoryStorage()
    limits = SubjectLimits(policy, shared=storage)
    outcomes = []
    for _ in range(5):
        try:
            await limits.check("session_token", "alice")
            outcomes.append("ok")
        except RateLimited:
            outcomes.append("refused")
    assert outcomes == ["ok", "ok", "refused", "refused", "refused"]
    hourly = limits_lib.parse("20/hour")
    stats = await SlidingWindowCounterRateLimiter(storage).get_window_stats(hourly, "session_token", "alice")
    assert stats.remaining == 18


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_local_daily_counts_agree_with_the_limits_library(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily cap's in-process counters replace the `limits` memory storage: for the same attempts
    at the same instants, keyed by the UTC day as SubjectLimits keys them, both allow and refuse alike."""
    rng = random.Random(seed)
    now = [dt.datetime(2026, 11, 26, 22, 0, tzinfo=dt.UTC).timestamp()]
    monkeypatch.setattr(time, "time", lambda: now[0])  # the clock `limits` reads
    reference = FixedWindowRateLimiter(MemoryStorage())
    local = LocalFixedWindows(clock=lambda: now[0], sweep_interval=600)
    daily = limits_lib.RateLimitItemPerDay(3)
    for _ in range(400):
        now[0] += rng.choice([0.0, 1.0, 60.0, 900.0, 7200.0]) * rng.random()
        day = dt.datetime.fromtimestamp(now[0], dt.UTC).date().isoformat()
        subject = rng.choice(["alice", "bob", "carol"])
        ours = await local.hit(daily, DAILY_ATTEMPTS, day, subject)
        assert ours == await reference.hit(daily, DAILY_ATTEMPTS, day, subject)
    assert now[0] > dt.datetime(2026, 11, 28, tzinfo=dt.UTC).timestamp()  # several days were crossed


async def test_local_daily_counts_of_past_days_are_dropped_at_most_once_per_interval() -> None:
    def at(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
        return dt.datetime(2026, 11, day, hour, minute, second, tzinfo=dt.UTC).timestamp()

    now = [at(26, 12)]
    local = LocalFixedWindows(clock=lambda: now[0], sweep_interval=60)
    daily = limits_lib.RateLimitItemPerDay(1)

    async def attempt(subject: str) -> bool:
        day = dt.datetime.fromtimestamp(now[0], dt.UTC).date().isoformat()
        return await local.hit(daily, DAILY_ATTEMPTS, day, subject)

    for index in range(1000):
        assert await attempt(f"subject-{index}")
    assert not await attempt("subject-0")
    now[0] = at(27, 23, 59, 50)
    assert await attempt("alice")  # a new key, past the interval: yesterday's 1,000 counts go
    assert not await attempt("alice")
    assert len(local._windows) == 1
    now[0] = at(28, 0, 0, 5)
    assert await attempt("bob")  # a new day, but within the interval of the last sweep: no sweep
    assert len(local._windows) == 2
    now[0] = at(28, 0, 1, 0)
    assert await attempt("carol")  # the interval has passed: the 27th's count goes
    assert len(local._windows) == 2
    assert await attempt("alice")  # a new day, a new budget


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_local_windows_count_exactly_like_the_limits_library(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-process counters replace the `limits` memory storage on the hot path: for the same
    calls at the same instants, both must allow, refuse and report the same."""
    rng = random.Random(seed)
    now = [1_000_000.0 + rng.random() * 60]
    monkeypatch.setattr(time, "time", lambda: now[0])  # the clock `limits` reads
    reference = SlidingWindowCounterRateLimiter(MemoryStorage())
    local = LocalSlidingWindows(clock=lambda: now[0], sweep_interval=30)
    items = [limits_lib.parse("5/second"), limits_lib.parse("7/minute"), limits_lib.parse("3/10 seconds")]
    for _ in range(600):
        now[0] += rng.choice([0.0, 0.01, 0.3, 1.7, 4.0, 13.0, 61.0]) * rng.random()
        item = rng.choice(items)
        subject = rng.choice(["alice", "bob"])
        assert await local.test(item, "result", subject) == await reference.test(item, "result", subject)
        assert await local.hit(item, "result", subject) == await reference.hit(item, "result", subject)
        ours = await local.get_window_stats(item, "result", subject)
        theirs = await reference.get_window_stats(item, "result", subject)
        assert ours.remaining == theirs.remaining
        assert ours.reset_time == pytest.approx(theirs.reset_time, abs=1e-6)
