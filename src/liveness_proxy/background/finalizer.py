"""The finalizer: the proxy follows every session it created to its end, on its own.

Each binding schedules a `finalize` job (in the binding's transaction). When it is due, the
finalizer reads the session's result upstream, through the token manager and the circuit breaker
like any call, but within a concurrency budget of its own (the worker's), never the callers'.

- A terminal status is recorded by the verdict ledger (chain event, webhook), which ends the job.
- Otherwise the job is due again at the next offset of the schedule after the session's creation;
  a failed read (timeout, 5xx, open circuit) counts the same as a pending one.
- Past the deadline, one last read; if that is not terminal either, the session is `unresolved`
  (announced, but not a verdict: a later terminal read still records one).

A caller's read that sees a terminal status records the verdict first; the job is then done, and
no further poll is made.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from liveness_proxy.errors import ProblemError
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.store import ClaimedJob, JobQueue, SessionOwnership, SessionVerdict, VerdictLedger
from liveness_proxy.store.jobs import JobKind, JobState
from liveness_proxy.store.verdicts import verdict_of
from liveness_proxy.upstream import CynopsisClient


@dataclass(frozen=True, slots=True)
class FinalizerSchedule:
    """When to read a session's result: `offsets` seconds after its creation, then once at
    `deadline_seconds`, after which it is unresolved."""

    offsets: tuple[float, ...]
    deadline_seconds: float

    def next_read(self, created_at: float, now: float) -> float | None:
        """The next read time after `now`, or None when the deadline has passed."""
        deadline = created_at + self.deadline_seconds
        if now >= deadline:
            return None
        upcoming = [created_at + offset for offset in self.offsets if created_at + offset > now]
        return min(min(upcoming, default=deadline), deadline)

    @property
    def first_offset(self) -> float:
        return min(self.offsets[0], self.deadline_seconds)


class Finalizer:
    kind: JobKind = "finalize"

    def __init__(
        self,
        *,
        queue: JobQueue,
        ownership: SessionOwnership,
        ledger: VerdictLedger,
        cynopsis: CynopsisClient,
        schedule: FinalizerSchedule,
        concurrency: int,
        wall_clock: Callable[[], float],
        metrics: ProxyMetrics,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._queue = queue
        self._ownership = ownership
        self._ledger = ledger
        self._cynopsis = cynopsis
        self._schedule = schedule
        self.concurrency = concurrency
        self._wall_clock = wall_clock
        self._metrics = metrics
        self._logger = logger

    async def ready(self) -> bool:
        return True

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        # The binding is read only when an outcome is to be recorded: most reads find the session
        # still pending, and the job itself knows when the session was created.
        request_id = "fin-" + secrets.token_hex(12)
        try:
            answer = await self._cynopsis.get_result(job.ref, request_id)
        except ProblemError as exc:
            self._metrics.finalizer_polled("failed")
            self._logger.info(
                "finalizer_read_failed", session_id=job.ref, request_id=request_id, problem=exc.slug
            )
        else:
            verdict = verdict_of(answer.payload, recorded_at=self._wall_clock(), request_id=request_id)
            if verdict is not None:
                self._metrics.finalizer_polled("terminal")
                await self._record(job, lease_owner, verdict)
                return
            self._metrics.finalizer_polled("pending")
        due = self._schedule.next_read(job.created_at, self._wall_clock())
        if due is not None:
            await self._settle(job, lease_owner, state="queued", due_at=due)
            return
        binding = await self._ownership.owner_of(job.ref, fresh=True)
        if binding is not None and await self._ledger.mark_unresolved(binding, request_id=request_id):
            self._metrics.finalizer_ended("unresolved")
            self._logger.info("finalizer_unresolved", session_id=job.ref, reads=job.attempts)
        await self._settle(job, lease_owner, state="done")

    async def _record(self, job: ClaimedJob, lease_owner: str, verdict: SessionVerdict) -> None:
        binding = await self._ownership.owner_of(job.ref, fresh=True)
        if binding is None or binding.verdict is not None:
            # The binding is gone, or a caller's read recorded the verdict after this was claimed
            # (its transaction ended the job already; this settle is then a no-op).
            if binding is not None:
                self._metrics.finalizer_ended("already_final")
            await self._settle(job, lease_owner, state="done")
            return
        stored = await self._ledger.record(binding, verdict, read_by="finalizer")
        # The ledger ended the job in the verdict's transaction, whoever's verdict stands.
        won = stored.verdict is not None and stored.verdict.request_id == verdict.request_id
        self._metrics.finalizer_ended("final" if won else "already_final")

    async def _settle(
        self, job: ClaimedJob, lease_owner: str, *, state: JobState, due_at: float | None = None
    ) -> None:
        async with self._queue.begin() as connection:
            await self._queue.settle(
                connection,
                job,
                owner=lease_owner,
                state=state,
                now=self._wall_clock(),
                due_at=due_at,
            )
