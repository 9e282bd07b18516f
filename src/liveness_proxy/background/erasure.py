"""`ErasureFollowUp`: the job an erasure leaves behind (store/erasure.py), run once, ten minutes later."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from liveness_proxy.store import ClaimedJob, JobQueue
from liveness_proxy.store.erasure import Erasure
from liveness_proxy.store.jobs import JobKind


class ErasureFollowUp:
    def __init__(self, *, queue: JobQueue, erasure: Erasure, wall_clock: Callable[[], float]) -> None:
        self._queue = queue
        self._erasure = erasure
        self._wall_clock = wall_clock

    @property
    def kind(self) -> JobKind:
        return "erase"

    @property
    def concurrency(self) -> int:
        return 1  # rare, and each one walks tables: one at a time per process

    async def ready(self) -> bool:
        return True

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        # Idempotent: a repeat after a crash erases what is left, which is nothing.
        await self._erasure.follow_up(job.ref, request_id="erase-" + secrets.token_hex(12))
        async with self._queue.begin() as connection:
            await self._queue.settle(connection, job, owner=lease_owner, state="done", now=self._wall_clock())
