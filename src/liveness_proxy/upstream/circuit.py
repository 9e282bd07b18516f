"""A circuit breaker in front of the liveness API: stop hammering an upstream that is down.

Closed: calls go through; consecutive failures are counted, any answer resets the count. At
`failure_threshold` consecutive failures the circuit opens: for `open_seconds` every call is refused
at once (`UpstreamCircuitOpen`, 503 with Retry-After) without touching the network, which spares the
upstream while it recovers and spares callers a timeout each. Then it is half-open: exactly one call
(the probe) goes through while others are still refused; the probe's success closes the circuit, its
failure opens it for another interval.

Only a sign that the upstream is unavailable counts as a failure (`client.signals_outage`): it could
not be reached, the connection broke, it sent something that is not HTTP, it did not answer in time,
or it answered 502, 503 or 504. A 4xx (including 429 and a rejected token), a 500, or an unusable
body is an answer from a working upstream and counts as a success: the bodies come from callers, and
a caller sending bad input must never be able to open the circuit for everybody.

The state is per process. Each replica learns on its own that the upstream is down, after at most
`failure_threshold` calls; sharing it through Redis would put a network round trip on every call to
save a handful of failed ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from liveness_proxy.errors import UpstreamCircuitOpen


class CircuitObserver(Protocol):
    """Told when the circuit opens or closes and when it refuses a call; must not raise or block."""

    def circuit_changed(self, is_open: bool, consecutive_failures: int) -> None: ...

    def circuit_rejected(self) -> None: ...


class CircuitBreaker:
    """See the module docstring. Not thread-safe: one per event loop, like everything upstream."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        observer: CircuitObserver | None = None,
    ) -> None:
        if failure_threshold < 1 or open_seconds <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_seconds > 0")
        self._failure_threshold = failure_threshold
        self._open_seconds = open_seconds
        self._clock = clock
        self._observer = observer
        self._consecutive_failures = 0
        self._open_until: float | None = None  # None: closed
        self._probe_in_flight = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open, or half-open with its probe in flight)."""
        return self._open_until is not None

    def admit(self) -> bool:
        """Admits a call, or raises UpstreamCircuitOpen. Returns True when the call is the probe.
        Every admitted call must end in exactly one of `succeeded`, `failed` or `abandoned`."""
        open_until = self._open_until
        if open_until is None:
            return False
        now = self._clock()
        if now >= open_until and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        raise self._refusal(open_until, now)

    def _refusal(self, open_until: float, now: float) -> UpstreamCircuitOpen:
        if self._observer is not None:
            self._observer.circuit_rejected()
        # While a probe runs, its answer is at most a timeout away: ask callers back in a second.
        wait = open_until - now if now < open_until else 1.0
        return UpstreamCircuitOpen(
            "The liveness service is failing; calls are paused briefly to let it recover.",
            retry_after_seconds=max(1, math.ceil(wait)),
        )

    def succeeded(self, probe: bool) -> None:
        self._consecutive_failures = 0
        if probe or self._open_until is not None:
            # A call admitted before the circuit opened may answer late: an answer is an answer.
            self._probe_in_flight = False
            was_open = self._open_until is not None
            self._open_until = None
            if was_open and self._observer is not None:
                self._observer.circuit_changed(False, 0)

    def failed(self, probe: bool) -> None:
        self._consecutive_failures += 1
        if probe:
            self._probe_in_flight = False
        if self._open_until is not None:
            if probe:
                self._open(reopened=True)  # the probe failed: another whole interval
        elif self._consecutive_failures >= self._failure_threshold:
            # Also when a late answer closed the circuit while the probe was out: this reopening
            # is signalled like the first one.
            self._open(reopened=False)

    def abandoned(self, probe: bool) -> None:
        """The call ended without telling anything about the upstream (cancelled, no token)."""
        if probe:
            self._probe_in_flight = False  # the next caller becomes the probe

    def _open(self, *, reopened: bool) -> None:
        self._open_until = self._clock() + self._open_seconds
        if not reopened and self._observer is not None:
            self._observer.circuit_changed(True, self._consecutive_failures)
