"""`RetentionSweeper`: the one periodic job (kind `retention`, ref `sweep`) that runs the retention
sweep (store/retention.py) every `interval_seconds`, on one replica at a time.

The job row is created by the first process that looks for it (`schedule_sweep`, insert-if-absent
on the unique (kind, ref)), and is claimed like any job: the worker's lease lets one replica run it
while the others skip it. After each run it goes back to the queue, due an interval later, its
attempts reset (`JobQueue.settle(reset_attempts=True)`). A run is bounded by half the lease, so the
lease never lapses under a sweep that is still going (another replica would then start a second
one beside it); a run cut short is due again at once and goes on where it stopped. A run that
raises is the worker's to retry (one lease later, the error recorded on the job).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.store import ClaimedJob, JobQueue
from liveness_proxy.store.jobs import JobKind
from liveness_proxy.store.retention import Retention, schedule_sweep


@dataclass(frozen=True, slots=True)
class SweepSchedule:
    interval_seconds: float  # from the end of one run to the next
    time_budget_seconds: float  # at most this long per run (half the worker's lease)


class RetentionSweeper:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        queue: JobQueue,
        retention: Retention,
        schedule: SweepSchedule,
        wall_clock: Callable[[], float],
        metrics: ProxyMetrics,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._engine = engine
        self._queue = queue
        self._retention = retention
        self._schedule = schedule
        self._wall_clock = wall_clock
        self._metrics = metrics
        self._logger = logger
        self._scheduled = False

    @property
    def kind(self) -> JobKind:
        return "retention"

    @property
    def concurrency(self) -> int:
        return 1  # there is one job

    async def ready(self) -> bool:
        # Here rather than at start-up: a database that is down when the process starts only delays
        # this (the worker logs the failed pass and asks again), it does not stop the start.
        if not self._scheduled:
            await schedule_sweep(
                self._engine, now=self._wall_clock(), interval_seconds=self._schedule.interval_seconds
            )
            self._scheduled = True
        return True

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        result = await self._retention.run(
            request_id="retention-" + secrets.token_hex(12),
            time_budget=self._schedule.time_budget_seconds,
        )
        now = self._wall_clock()
        self._metrics.retention_swept(result.counts.as_dict(), at=now, complete=result.complete)
        if result.counts.total or not result.complete:
            self._logger.info("retention_applied", complete=result.complete, **result.counts.as_dict())
        async with self._queue.begin() as connection:
            await self._queue.settle(
                connection,
                job,
                owner=lease_owner,
                state="queued",
                now=now,
                due_at=now + self._schedule.interval_seconds if result.complete else now,
                reset_attempts=True,
            )
