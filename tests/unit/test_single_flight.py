"""SingleFlight (upstream/single_flight.py) on its own: one call per key however many join, a value
reused for the window on the given clock and never after, errors shared only by the callers waiting
(each its own copy) and never reused, a cancelled caller that cancels nothing, erasure and close."""

from __future__ import annotations

import asyncio

import pytest

from liveness_proxy.errors import UpstreamRateLimited
from liveness_proxy.sandbox import ManualClock
from liveness_proxy.upstream import SingleFlight


class Calls:
    """A call that waits for `release` and counts how often it was made."""

    def __init__(self) -> None:
        self.made = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> str:
        self.made += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"answer {self.made}"


def flights(clock: ManualClock, reuse: float = 0.3, **options: int) -> SingleFlight[str, str]:
    return SingleFlight(reuse_seconds=reuse, clock=clock.now, **options)


async def test_concurrent_callers_share_one_call_and_only_the_first_started_it() -> None:
    clock, call = ManualClock(), Calls()
    flight = flights(clock)
    joined = [flight.join("s1", call) for _ in range(10)]
    other = flight.join("s2", call)
    call.release.set()
    values = await asyncio.gather(*(place.value() for place in joined))
    assert values == ["answer 1"] * 10
    assert [place.started for place in joined] == [True] + [False] * 9
    assert (await other.value(), other.started) == ("answer 2", True)
    assert call.made == 2


async def test_a_value_is_reused_for_the_window_only() -> None:
    clock, call = ManualClock(), Calls()
    call.release.set()
    flight = flights(clock, reuse=0.3)
    assert await flight.join("s", call).value() == "answer 1"
    clock.advance(0.29)
    reused = flight.join("s", call)
    assert (await reused.value(), reused.started) == ("answer 1", False)
    clock.advance(0.02)
    assert await flight.join("s", call).value() == "answer 2"
    assert call.made == 2


async def test_with_no_window_each_sequential_call_is_made() -> None:
    clock, call = ManualClock(), Calls()
    call.release.set()
    flight = flights(clock, reuse=0)
    assert [await flight.join("s", call).value() for _ in range(3)] == ["answer 1", "answer 2", "answer 3"]
    assert flight.reused == 0


async def test_an_error_reaches_each_waiting_caller_as_its_own_copy_and_is_never_reused() -> None:
    clock, call = ManualClock(), Calls()
    call.error = UpstreamRateLimited("slow down", retry_after_seconds=7)
    flight = flights(clock, reuse=5)
    joined = [flight.join("s", call) for _ in range(3)]
    call.release.set()
    errors = await asyncio.gather(*(place.value() for place in joined), return_exceptions=True)
    assert all(isinstance(error, UpstreamRateLimited) for error in errors)
    assert len({id(error) for error in errors}) == 3
    assert {error.headers["Retry-After"] for error in errors if isinstance(error, UpstreamRateLimited)} == {
        "7"
    }
    call.error = None
    assert await flight.join("s", call).value() == "answer 2"


async def test_a_cancelled_joiner_cancels_nothing_else() -> None:
    clock, call = ManualClock(), Calls()
    flight = flights(clock)
    starter = asyncio.ensure_future(flight.join("s", call).value())
    await asyncio.sleep(0)
    leaving = asyncio.ensure_future(flight.join("s", call).value())
    staying = flight.join("s", call)
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    call.release.set()
    assert (await starter, await staying.value(), staying.started) == ("answer 1", "answer 1", False)
    assert call.made == 1


async def test_when_the_starter_leaves_its_joiners_make_the_call_themselves() -> None:
    """The call runs in the starter's own task: cancelled with it (its client went away), the call
    is made again by one of the callers still waiting, and the others join that one."""
    clock, call = ManualClock(), Calls()
    flight = flights(clock)
    starter = asyncio.ensure_future(flight.join("s", call).value())
    await asyncio.sleep(0)
    joined = [flight.join("s", call) for _ in range(3)]
    waiting = [asyncio.ensure_future(place.value()) for place in joined]
    await asyncio.sleep(0)
    starter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starter
    call.release.set()
    assert await asyncio.gather(*waiting) == ["answer 2"] * 3
    assert [place.started for place in joined] == [True, False, False]
    assert call.made == 2
    assert flight.in_flight == 0


async def test_forget_all_drops_reused_values_and_keeps_a_call_in_flight_from_leaving_its_own() -> None:
    clock, call = ManualClock(), Calls()
    flight = flights(clock, reuse=5)
    call.release.set()
    await flight.join("done", call).value()
    call.release.clear()
    in_flight = flight.join("flying", call)
    flight.forget_all()
    assert flight.reused == 0
    call.release.set()
    assert await in_flight.value() == "answer 2"
    assert flight.reused == 0  # its waiting caller got it; nobody after does


async def test_the_reused_values_are_bounded() -> None:
    clock, call = ManualClock(), Calls()
    call.release.set()
    flight = flights(clock, reuse=5, max_entries=3)
    for key in "abcd":
        await flight.join(key, call).value()
    assert flight.reused == 3
    assert flight.join("a", call).started  # the oldest went first


async def test_after_close_nothing_is_kept_and_calls_still_answer() -> None:
    clock, call = ManualClock(), Calls()
    flight = flights(clock, reuse=5)
    waiting = flight.join("s", call)
    await flight.close()
    call.release.set()
    assert await waiting.value() == "answer 1"
    assert flight.reused == 0
    late = flight.join("s", call)
    assert (await late.value(), late.started) == ("answer 2", True)


async def test_no_value_outlives_its_window_by_more_than_the_next_calls_return() -> None:
    """A value is an answer: expired ones go as soon as any call returns, not when the bound is hit."""
    clock = ManualClock()
    flight = flights(clock)
    for number in range(50):

        async def answer(number: int = number) -> str:
            return f"answer {number}"

        await flight.join(f"s{number}", answer).value()
    assert flight.reused == 50
    clock.advance(0.31)

    async def later() -> str:
        return "later"

    await flight.join("s-late", later).value()
    assert flight.reused == 1


async def test_values_go_after_their_window_even_when_no_call_comes() -> None:
    clock = ManualClock()
    flight = flights(clock, reuse=0.05)

    async def answer() -> str:
        return "answer"

    await flight.join("s1", answer).value()
    assert flight.reused == 1
    clock.advance(0.06)
    await asyncio.sleep(0.15)  # the expiry timer runs on the loop's own time
    assert flight.reused == 0
    await flight.close()
