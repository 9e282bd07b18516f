"""Collapsed calls: concurrent callers of one key share one call, and its value is reused briefly.

`SingleFlight.join(key, call)` either finds a value still inside its reuse window, or joins the call
in flight for `key`, or starts `call()` for it. The call runs as a task of its own: a caller that is
cancelled (its client went away, its request timed out) stops waiting, never the call, so the
other callers still get its value. Each caller awaits it shielded.

A value is reused for `reuse_seconds` from when the call returned, on the given monotonic clock; a
failed call is never reused: only the callers already waiting on it share its error, and the next
caller starts a new call. The reuse entries are bounded (expired ones are dropped first, then the
oldest), and `forget_all` drops them (an erasure: a value may hold what was erased); a call in flight
while they are dropped does not leave its value behind.

Nothing here knows what the key or value is: who may join (the ownership check), what the value
holds and how it is checked for each caller is the caller's business (api/result_reads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from liveness_proxy.errors import ServiceUnavailable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Reused(Generic[V]):
    value: V
    until: float  # on the monotonic clock


class Joined(Generic[V]):
    """A caller's place in a call: `started` is True for the one caller whose join started it."""

    __slots__ = ("_own_call", "_reused", "_task", "started")

    def __init__(
        self,
        *,
        started: bool,
        task: asyncio.Task[V] | None = None,
        reused: _Reused[V] | None = None,
        own_call: Callable[[], Awaitable[V]] | None = None,
    ) -> None:
        self.started = started
        self._task = task
        self._reused = reused
        self._own_call = own_call

    async def value(self) -> V:
        """The call's value, or its error (a copy of its own for each caller)."""
        if self._reused is not None:
            return self._reused.value
        if self._own_call is not None:
            return await self._own_call()
        assert self._task is not None
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled() and not _current_task_cancelling():
                # The call was cancelled (the service is shutting down), not this caller.
                raise ServiceUnavailable(
                    "The proxy is shutting down; retry.", retry_after_seconds=1
                ) from None
            raise
        except Exception as error:
            raise _own_copy(error) from error.__cause__


class SingleFlight(Generic[K, V]):
    def __init__(
        self,
        *,
        reuse_seconds: float,
        clock: Callable[[], float],
        max_entries: int = DEFAULT_MAX_ENTRIES,
        close_grace_seconds: float = 5.0,
    ) -> None:
        """`reuse_seconds`: how long a value is reused (0: never, each call is shared only by the
        callers that join it while it runs). `close_grace_seconds`: how long `close` lets the calls
        in flight finish before cancelling them."""
        self._reuse_seconds = reuse_seconds
        self._clock = clock
        self._max_entries = max_entries
        self._close_grace_seconds = close_grace_seconds
        self._flights: dict[K, asyncio.Task[V]] = {}
        self._reused: dict[K, _Reused[V]] = {}
        # Bumped by `forget_all`: a call that started before cannot leave its value behind.
        self._generation = 0
        self._closed = False
        # One timer while values are kept, so that they go even when no further call comes.
        self._expiry: asyncio.TimerHandle | None = None

    def join(self, key: K, call: Callable[[], Awaitable[V]]) -> Joined[V]:
        """A reused value, the call in flight for `key`, or `call()` started as a task of its own.
        Never awaits: nothing can start a second call for `key` between the look-up and the start."""
        reused = self._reused.get(key)
        if reused is not None:
            if self._clock() < reused.until:
                return Joined(started=False, reused=reused)
            del self._reused[key]
        task = self._flights.get(key)
        if task is not None:
            return Joined(started=False, task=task)
        if self._closed:
            # Shutting down: no task may outlive the service; the call runs in the caller's own task.
            return Joined(started=True, own_call=call)
        task = asyncio.get_running_loop().create_task(self._fly(key, call, self._generation))
        task.add_done_callback(_retrieve)
        self._flights[key] = task
        return Joined(started=True, task=task)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    @property
    def reused(self) -> int:
        return len(self._reused)

    def forget(self, key: K) -> None:
        """Drops `key`'s reused value (a call in flight still answers the callers waiting on it)."""
        self._reused.pop(key, None)

    def forget_all(self) -> None:
        """Drops every reused value, and keeps the calls in flight from leaving theirs."""
        self._reused.clear()
        self._generation += 1

    async def close(self) -> None:
        """Lets the calls in flight finish for a grace period, then cancels the rest; afterwards a
        join runs its call in the caller's own task."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        running = list(self._flights.values())
        if running:
            _done, pending = await asyncio.wait(running, timeout=self._close_grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._reused.clear()

    async def _fly(self, key: K, call: Callable[[], Awaitable[V]], generation: int) -> V:
        try:
            value = await call()
            if self._reuse_seconds > 0 and generation == self._generation and not self._closed:
                self._keep(key, value)
            return value
        finally:
            if self._flights.get(key) is asyncio.current_task():
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


def _retrieve(task: asyncio.Task[object]) -> None:
    """Marks a failed call's error as seen: the callers that wanted it got their own copies, and a
    call every caller left must not be reported as an error nobody retrieved."""
    if not task.cancelled():
        task.exception()


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
