"""Clocks for the sandbox: real time in a demo, hand-driven time in tests."""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
    """A source of wall-clock time in seconds since the epoch."""

    def now(self) -> float: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to, so expiry can be tested without sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = _finite(start, "start")

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        # Time running backwards would let expired tokens come back to life; refuse it.
        if _finite(seconds, "seconds") < 0:
            raise ValueError("a ManualClock only moves forward; use set() to jump")
        self._now += seconds

    def set(self, t: float) -> None:
        self._now = _finite(t, "t")


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
