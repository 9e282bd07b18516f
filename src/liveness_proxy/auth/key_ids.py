"""Every API key id in the store, in memory: an id that is not among them is unknown without a
database read.

The negative cache of `ApiKeyAuthenticator` remembers ids it looked up and did not find, which
helps against a flood that repeats one id; a flood of random ids (each new) would still cost one
read each. Here the set of ids is read whole, at most once per `max_age_seconds` and only when an
id missing from it is presented, so such a flood costs one query per interval. Keys are never
deleted (revoked keys keep their row), so an id in the set exists; an id created since the last
read is found at the next one. The set is read again once it is older than a second plus a second
per READ_IDS_PER_SECOND ids it holds, at most `max_age_seconds` (the negative cache's bound): a key
made with `keys create` is refused as unknown for about a second at most on a deployment with a few
thousand keys, and a flood of random ids costs at most that many ids read per second.

Beyond `max_ids` keys (or with `max_ids` 0) the set is not kept (its memory would not pay): every
unknown id is then read, as before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

# How many ids a second of refresh interval pays for: the set is read again at most once per
# 1 s + len(ids) / READ_IDS_PER_SECOND (and per max_age_seconds).
READ_IDS_PER_SECOND = 10_000


class KnownKeyIds:
    def __init__(
        self,
        read_ids: Callable[[], Awaitable[list[str]]],
        *,
        max_age_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_ids: int = 200_000,
    ) -> None:
        self._read_ids = read_ids
        self._max_age_seconds = max_age_seconds
        self._clock = clock
        self._max_ids = max_ids
        self._ids: frozenset[str] = frozenset()
        self._read_at = -math.inf
        self._kept = max_age_seconds > 0 and max_ids > 0
        self._reading: asyncio.Task[None] | None = None

    async def may_exist(self, key_id: str) -> bool:
        """False only when the store surely has no such id (as of at most `max_age_seconds` ago)."""
        if not self._kept or key_id in self._ids:
            return True
        max_age = min(self._max_age_seconds, 1.0 + len(self._ids) / READ_IDS_PER_SECOND)
        if self._clock() - self._read_at >= max_age:
            if self._reading is None:
                self._reading = asyncio.get_running_loop().create_task(self._read())
                self._reading.add_done_callback(self._read_done)
            # Shielded: one caller giving up must not cancel the read the others wait for.
            await asyncio.shield(self._reading)
        return not self._kept or key_id in self._ids

    async def _read(self) -> None:
        started = self._clock()
        ids = await self._read_ids()
        if len(ids) > self._max_ids:
            self._kept = False
            self._ids = frozenset()
            return
        self._ids = frozenset(ids)
        self._read_at = started

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reading = None
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter has gone
