"""When each API key was last used, for `keys list`: recorded off the request's path and throttled.

A request only looks its key up in a dict. At most once per key per `interval_seconds` (per
process) that lookup finds the last record too old; the use is then queued, and one background
task writes every queued use in one statement. So the table sees at most (keys in use) x
(processes) writes per interval, whatever the request rate, and a database that is slow or down
never delays or fails a request: a failed write is reported and skipped (the next use after the
interval tries again). The recorded time is therefore late by up to the interval.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

from liveness_proxy.store import ApiKeyStore

DEFAULT_USE_INTERVAL_SECONDS = 300.0


class KeyUseRecorder:
    def __init__(
        self,
        store: ApiKeyStore,
        *,
        wall_clock: Callable[[], float],
        interval_seconds: float = DEFAULT_USE_INTERVAL_SECONDS,
        on_failure: Callable[[BaseException], None] | None = None,
        capacity: int = 10_000,
    ) -> None:
        self._store = store
        self._wall_clock = wall_clock
        self._interval = interval_seconds
        self._on_failure = on_failure
        self._capacity = capacity
        self._recorded: dict[str, float] = {}  # key id -> (caller's clock) when its use was last queued
        self._pending: dict[str, float] = {}  # key id -> epoch seconds of a use not written yet
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def used(self, key_id: str, now: float) -> None:
        """Notes a use of `key_id` at `now` (the authenticator's clock). Never waits, never raises."""
        last = self._recorded.get(key_id)
        if (last is not None and now - last < self._interval) or self._closed:
            return
        if last is None and len(self._recorded) >= self._capacity:
            # Bounded like the key cache: forgetting the oldest only means one write sooner.
            self._recorded.pop(next(iter(self._recorded)))
        self._recorded[key_id] = now
        self._pending[key_id] = self._wall_clock()
        if self._writer is None:
            # A context of its own: not the span of whichever request started the writer.
            self._writer = asyncio.get_running_loop().create_task(
                self._write_pending(), context=contextvars.Context()
            )

    async def close(self) -> None:
        """Writes what is queued; later uses are no longer recorded."""
        self._closed = True
        if self._writer is not None:
            await self._writer

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    await self._store.record_use(batch)
                except Exception as exc:  # informational data: a failed write must never fail a request
                    if self._on_failure is not None:
                        self._on_failure(exc)
        finally:
            self._writer = None
