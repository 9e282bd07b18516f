"""Failed authentications, audited in aggregate: one chained record per window, credential kind and
client address, instead of one per request.

A flood of bad credentials would otherwise write one audit row per request (2,000 requests, 2,000
rows). Here a window's failures are counted in memory and written when the window ends: at most
`max_addresses` records of action `auth.failed` per window and process (one per credential kind and
address, with its count), and beyond that one `auth.failed.overflow` record with the count of
everything that did not fit. Rows per window are bounded whatever the attacker rotates, and every
failure is still counted, in a record and in the metric.

A window's counts are written by a timer shortly after it ends (and on shutdown). A crash loses the
counts of the window in progress, never a record of an authenticated request: those are still one
per request, written before the answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson
import structlog

from liveness_proxy.store.audit import AuditLog
from liveness_proxy.store.audit_chain import AUTH_FAILED, AUTH_FAILED_OVERFLOW, AuditRecord, personal_values

# A window's records are written this long after it ends, so failures counted at its very end
# (by requests that started in it) are in.
FLUSH_DELAY_SECONDS = 1.0


@dataclass(slots=True)
class _Tally:
    failures: int = 0
    refused_by_limit: int = 0  # of which answered 429 by the unauthenticated limit
    first_request_id: str = ""


@dataclass(slots=True)
class _Window:
    start: float
    tallies: dict[tuple[str, str], _Tally] = field(default_factory=dict)
    overflow: _Tally = field(default_factory=_Tally)
    overflow_keys: set[tuple[str, str]] = field(default_factory=set)
    overflow_keys_capped: bool = False


class FailedAuthentications:
    """Counts failed authentications per window and writes their aggregate records."""

    def __init__(
        self,
        audit_log: AuditLog,
        *,
        logger: structlog.typing.FilteringBoundLogger,
        new_request_id: Callable[[], str],
        window_seconds: float = 60.0,
        max_addresses: int = 100,
        wall_clock: Callable[[], float] = time.time,
        on_failure: Callable[[str], None] | None = None,
        flush_delay_seconds: float = FLUSH_DELAY_SECONDS,
        answer_delay_seconds: float = 0.0,
    ) -> None:
        self._audit_log = audit_log
        self._logger = logger
        self._new_request_id = new_request_id
        self._window_seconds = window_seconds
        self._max_addresses = max_addresses
        self._wall_clock = wall_clock
        self._on_failure = on_failure
        self._flush_delay_seconds = flush_delay_seconds
        # How long the answer to a failed authentication is held back (LIVENESS_PROXY_FAILED_AUTH_
        # DELAY_SECONDS): a client that waits for each answer, as floods do, is slowed to one
        # failure per delay and connection, whatever it costs us to refuse it.
        self.answer_delay_seconds = answer_delay_seconds
        self._window: _Window | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def count(self, credential: str, address: str, request_id: str, *, refused_by_limit: bool) -> None:
        """One failed authentication (`credential`: the kind presented: none, api_key, jwt, other)."""
        if self._on_failure is not None:
            self._on_failure(credential)
        now = self._wall_clock()
        start = math.floor(now / self._window_seconds) * self._window_seconds
        window = self._window
        if window is None or window.start != start:
            if window is not None:
                self._write_later(window)
            window = self._window = _Window(start)
            self._arm_flush(start)
        key = (credential, address)
        tally = window.tallies.get(key)
        if tally is None:
            if len(window.tallies) < self._max_addresses:
                tally = window.tallies[key] = _Tally(first_request_id=request_id)
            else:
                tally = window.overflow
                # The distinct pairs that did not fit, up to a bound of their own (it is a count
                # for the record, not a second unbounded table).
                if len(window.overflow_keys) < 100 * self._max_addresses:
                    window.overflow_keys.add(key)
                else:
                    window.overflow_keys_capped = True
                if not tally.first_request_id:
                    tally.first_request_id = request_id
        tally.failures += 1
        if refused_by_limit:
            tally.refused_by_limit += 1

    async def flush(self) -> None:
        """Writes the window in progress now (shutdown), and waits for earlier windows' writes."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        window, self._window = self._window, None
        if window is not None:
            self._write_later(window)
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _arm_flush(self, start: float) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        delay = max(0.0, start + self._window_seconds - self._wall_clock()) + self._flush_delay_seconds
        self._flush_timer = asyncio.get_running_loop().call_later(delay, self._window_ended, start)

    def _window_ended(self, start: float) -> None:
        self._flush_timer = None
        window = self._window
        if window is not None and window.start == start:
            self._window = None
            self._write_later(window)

    def _write_later(self, window: _Window) -> None:
        # A context of its own: the window's record is nobody's request (and no span's child).
        task = asyncio.get_running_loop().create_task(self._write(window), context=contextvars.Context())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, window: _Window) -> None:
        records = [self._record(window, key, tally) for key, tally in window.tallies.items()]
        if window.overflow.failures:
            records.append(self._overflow_record(window))
        try:
            await asyncio.gather(*(self._audit_log.append(record) for record in records))
        except Exception as exc:
            # The counts are in the metric and this line; the chain misses them (the store is out).
            self._logger.error(  # noqa: TRY400 - the reason is the class name; no traceback in logs
                "auth_failures_not_audited",
                reason=type(exc).__name__,
                failures=sum(tally.failures for tally in window.tallies.values()) + window.overflow.failures,
            )

    def _record(self, window: _Window, key: tuple[str, str], tally: _Tally) -> AuditRecord:
        credential, address = key
        facts = {
            "window_start": window.start,
            "window_seconds": self._window_seconds,
            "credential": credential,
            "failures": tally.failures,
            "refused_by_limit": tally.refused_by_limit,
        }
        # The address is personal data: kept beside its commitment, erased by the plain-text
        # retention (`audit_chain.personal_values`), never in the hashed detail.
        return self._aggregate(AUTH_FAILED, window, tally, facts, personal={"client_address": address})

    def _overflow_record(self, window: _Window) -> AuditRecord:
        tally = window.overflow
        facts = {
            "window_start": window.start,
            "window_seconds": self._window_seconds,
            "addresses": len(window.overflow_keys),
            "addresses_at_least": window.overflow_keys_capped,
            "failures": tally.failures,
            "refused_by_limit": tally.refused_by_limit,
        }
        return self._aggregate(AUTH_FAILED_OVERFLOW, window, tally, facts)

    def _aggregate(
        self,
        action: str,
        window: _Window,
        tally: _Tally,
        facts: Mapping[str, object],
        personal: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        plain, commitment = personal_values(personal) if personal else (None, None)
        return AuditRecord(
            # The window's end, or now when it is written early (on shutdown).
            occurred_at=min(window.start + self._window_seconds, self._wall_clock()),
            # The first failure's id, to find its access-log line; the later ones share the record.
            request_id=tally.first_request_id or self._new_request_id(),
            subject=None,
            credential_id=None,
            action=action,
            session_id=None,
            status=401,
            upstream_status=None,
            latency_ms=0.0,
            problem="unauthenticated",
            detail=orjson.dumps(facts, option=orjson.OPT_SORT_KEYS).decode(),
            personal=plain,
            personal_commitment=commitment,
        )
