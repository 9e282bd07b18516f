"""Collapsed calls: concurrent callers of one key share one call, and its value is reused briefly.

`SingleFlight.join(key, call)` either finds a value still inside its reuse window, or joins the call
in flight for `key`, or makes the caller the one that makes `call()`. The call runs in the task of
the caller that started it, which awaits it directly: the common case, a read nobody else shares,
costs no task, no shield and no future of its own (profiled: a task per call cost the uncached
result read about a tenth of its CPU). The callers who joined wait on futures of their own, so one
of them that is cancelled cancels nothing else. If the starter is cancelled (its client went away,
the server is shutting down) before the call answered, its joiners are told and start over: one of
them makes the call again, and nobody is failed by someone else's departure.

A value is reused for `reuse_seconds` from when the call returned, on the given monotonic clock; a
failed call is never reused: only the callers already waiting on it share its error (each its own
copy), and the next caller starts a new call. The reuse entries are bounded and go once their window
has passed (when a call returns, and on a timer while any is kept); `forget_all` drops them (an
erasure: a value may hold what was erased), and a call in flight while they are dropped does not
leave its value behind.

Nothing here knows what the key or value is: who may join (the ownership check), what the value
holds and how it is checked for each caller is the caller's business (api/result_reads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Reused(Generic[V]):
    value: V
    until: float  # on the monotonic clock


class _StarterLeft(Exception):
    """Set on the joiners' futures when the caller making the call was cancelled before it answered."""


class _Flight(Generic[V]):
    """A call in flight: the futures of the callers who joined it."""

    __slots__ = ("generation", "joiners")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.joiners: list[asyncio.Future[V]] = []


class Joined(Generic[V]):
    """A caller's place: `started` is True when this caller makes the call (also when it had joined
    another's call and had to make it itself after that caller left). Await `value()` at once."""

    __slots__ = ("_call", "_flight", "_flights", "_key", "_reused", "_waiter", "started")

    def __init__(
        self,
        flights: SingleFlight[K, V],
        key: K,
        call: Callable[[], Awaitable[V]],
        *,
        flight: _Flight[V] | None = None,
        waiter: asyncio.Future[V] | None = None,
        reused: _Reused[V] | None = None,
    ) -> None:
        self._flights = flights
        self._key = key
        self._call = call
        self._flight = flight
        self._waiter = waiter
        self._reused = reused
        self.started = flight is not None

    async def value(self) -> V:
        """The call's value, or its error (a joiner gets a copy of its own)."""
        if self._reused is not None:
            return self._reused.value
        if self._flight is not None:
            return await self._flights._fly(self._key, self._call, self._flight)
        waiter = self._waiter
        if waiter is None:  # a place is a reused value, the call's maker or a joiner: never none
            raise RuntimeError("a place in a single flight with nothing to wait for")
        try:
            return await waiter
        except _StarterLeft:
            again = self._flights.join(self._key, self._call)
            value = await again.value()
            self.started = again.started
            return value


class SingleFlight(Generic[K, V]):
    def __init__(
        self, *, reuse_seconds: float, clock: Callable[[], float], max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        """`reuse_seconds`: how long a value is reused (0: never, each call is shared only by the
        callers that join it while it runs)."""
        self._reuse_seconds = reuse_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._flights: dict[K, _Flight[V]] = {}
        self._reused: dict[K, _Reused[V]] = {}
        # Bumped by `forget_all`: a call that started before cannot leave its value behind.
        self._generation = 0
        self._closed = False
        # One timer while values are kept, so that they go even when no further call comes.
        self._expiry: asyncio.TimerHandle | None = None

    def join(self, key: K, call: Callable[[], Awaitable[V]]) -> Joined[V]:
        """A reused value, a place among the callers of the call in flight for `key`, or the making
        of `call()`. Never awaits: nothing can start a second call for `key` in between."""
        reused = self._reused.get(key)
        if reused is not None:
            if self._clock() < reused.until:
                return Joined(self, key, call, reused=reused)
            del self._reused[key]
        flight = self._flights.get(key)
        if flight is not None:
            waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
            flight.joiners.append(waiter)
            return Joined(self, key, call, waiter=waiter)
        flight = self._flights[key] = _Flight(self._generation)
        return Joined(self, key, call, flight=flight)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    @property
    def reused(self) -> int:
        return len(self._reused)

    def forget_all(self) -> None:
        """Drops every reused value, and keeps the calls in flight from leaving theirs."""
        self._reused.clear()
        self._generation += 1

    async def close(self) -> None:
        """Keeps nothing from now on (the calls in flight still answer their callers, in their own
        tasks, which the server ends)."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._reused.clear()

    async def _fly(self, key: K, call: Callable[[], Awaitable[V]], flight: _Flight[V]) -> V:
        try:
            value = await call()
        except Exception as error:
            self._land(key, flight)
            for joiner in flight.joiners:
                if not joiner.done():
                    joiner.set_exception(_own_copy(error))
            raise
        except BaseException:
            # Cancelled (or worse) before the call answered: its joiners make it again themselves.
            self._land(key, flight)
            for joiner in flight.joiners:
                if not joiner.done():
                    joiner.set_exception(_StarterLeft())
            raise
        self._land(key, flight)
        if self._reuse_seconds > 0 and flight.generation == self._generation and not self._closed:
            self._keep(key, value)
        for joiner in flight.joiners:
            if not joiner.done():
                joiner.set_result(value)
        return value

    def _land(self, key: K, flight: _Flight[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _keep(self, key: K, value: V) -> None:
        now = self._clock()
        self._reused.pop(key, None)  # re-inserted last: the dict stays in expiry order
        self._drop_expired(now)
        reused = self._reused
        if len(reused) >= self._max_entries:
            del reused[next(iter(reused))]
        reused[key] = _Reused(value, now + self._reuse_seconds)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self._reuse_seconds, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._drop_expired(self._clock())
        if self._reused and not self._closed:
            self._expiry = asyncio.get_running_loop().call_later(self._reuse_seconds, self._expire)

    def _drop_expired(self, now: float) -> None:
        """Drops every value past its window (the oldest are first): a value is an answer, which
        is not kept beyond it, whether or not another call comes."""
        reused = self._reused
        while reused:
            oldest = next(iter(reused))
            if reused[oldest].until > now:
                break
            del reused[oldest]


def _own_copy(error: Exception) -> Exception:
    """The error as a new object for one caller: one object raised in many tasks would collect all
    their tracebacks (and a handler that changes it would change it for everyone)."""
    try:
        copy = type(error).__new__(type(error), *error.args)
        copy.__dict__.update(vars(error))
    except (TypeError, AttributeError):
        return error
    with contextlib.suppress(AttributeError):
        copy.__suppress_context__ = error.__suppress_context__
    return copy
