"""The global cap on concurrent upstream calls in this process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from liveness_proxy.errors import ServiceUnavailable


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
