"""The one background worker per process.

Each pass asks every runner how many more jobs it may run now (its concurrency budget minus what is
in flight), claims that many due jobs of its kind with a lease, and runs each in a task of its own.
A pass happens every `interval_seconds`, when a job finishes, and when `wake()` is called (the
process just wrote a job that is due now, e.g. a webhook). Claiming only what can start at once
means no lease ticks away on work waiting inside this process.

A runner settles its job in the same transaction as what the job produced. A runner that raises
(a bug, or a store outage mid-job) gets its job back in the queue one lease later, with the error
recorded, and after `MAX_ATTEMPTS` attempts the job is dead: a poison job cannot spin forever. At
shutdown the worker stops claiming, gives running jobs `grace_seconds`, then cancels them and
releases their leases, so another process takes them over at once; nothing acknowledged is lost.

A job is never claimed again by the process that still runs it, even when its lease lapsed (a
process's lease owner is the same for all its claims; the claim's attempt number fences its settle).

Each run is a span, a child of the span that caused the job (its stored `trace_parent`, see
store/jobs.py), or the root of a trace of its own when there is none. Its attributes name the kind
and the attempt, and for a delivery the event id; never a session id or a commitment (a job's ref
for other kinds): a span outlives an erasure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from liveness_proxy.store import ClaimedJob, JobQueue, is_store_outage
from liveness_proxy.store.jobs import JobKind
from liveness_proxy.tracing import Tracing, context_of, new_root

# Attempts after which a job whose runner keeps raising is dead (its runner's own schedule ends
# every healthy job long before: nine finalizer reads, ten webhook attempts by default).
MAX_ATTEMPTS = 50

SPAN_NAMES: dict[str, str] = {
    "finalize": "finalizer poll",
    "deliver": "webhook delivery",
    "erase": "erasure follow-up",
    "retention": "retention sweep",
}


class JobRunner(Protocol):
    @property
    def kind(self) -> JobKind: ...

    @property
    def concurrency(self) -> int: ...

    async def ready(self) -> bool:
        """Whether jobs of this kind may be claimed now (e.g. the webhook endpoint is enabled)."""
        ...

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        """Does the job and settles it (fenced by `lease_owner`)."""
        ...


def new_lease_owner() -> str:
    """Names this process in leases: host, pid and a random part (a pid can be reused)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"


class BackgroundWorker:
    def __init__(
        self,
        queue: JobQueue,
        runners: Sequence[JobRunner],
        *,
        lease_seconds: float,
        interval_seconds: float,
        wall_clock: Callable[[], float],
        logger: structlog.typing.FilteringBoundLogger,
        on_pass: Callable[[], Awaitable[None]] | None = None,
        on_every_pass: Callable[[], Awaitable[None]] | None = None,
        grace_seconds: float = 5.0,
        tracing: Tracing | None = None,
    ) -> None:
        """`on_pass` runs every tenth pass (the backlog gauges); `on_every_pass` every pass (the
        erasure notices, which must reach every process within about an interval). `tracing`: the
        app's (None: off)."""
        self._queue = queue
        self._runners = tuple(runners)
        self._lease_seconds = lease_seconds
        self._interval_seconds = interval_seconds
        self._wall_clock = wall_clock
        self._logger = logger
        self._on_pass = on_pass
        self._on_every_pass = on_every_pass
        self._grace_seconds = grace_seconds
        self._tracing = tracing if tracing is not None else Tracing.off()
        self.lease_owner = new_lease_owner()
        self._in_flight: dict[str, dict[int, asyncio.Task[None]]] = {
            runner.kind: {} for runner in self._runners
        }
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._loop_task is None and self._runners:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="background worker")

    def wake(self) -> None:
        """New work may be due now: look without waiting for the timer."""
        self._wakeup.set()

    @property
    def running_jobs(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = [task for tasks in self._in_flight.values() for task in tasks.values()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self._grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _run(self) -> None:
        passes = 0
        while not self._closing:
            self._wakeup.clear()
            try:
                # The backlog gauges first, on their own: when claiming fails (a slow or failing
                # database), the backlog they show must keep moving, or its alert goes quiet.
                if self._on_pass is not None and passes % 10 == 0:
                    await self._on_pass()
            except Exception as exc:
                self._logger.warning(
                    "background_pass_failed", reason=type(exc).__name__, store_outage=is_store_outage(exc)
                )
            try:
                if self._on_every_pass is not None:
                    await self._on_every_pass()
                await self._claim_and_start()
            except Exception as exc:
                # The database may be down: say so once per pass and try again after the interval.
                self._logger.warning(
                    "background_pass_failed",
                    reason=type(exc).__name__,
                    store_outage=is_store_outage(exc),
                )
            passes += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval_seconds)

    async def _claim_and_start(self) -> None:
        for runner in self._runners:
            free = runner.concurrency - len(self._in_flight[runner.kind])
            if free <= 0 or self._closing or not await runner.ready():
                continue
            running = self._in_flight[runner.kind]
            claimed = await self._queue.claim(
                runner.kind,
                owner=self.lease_owner,
                limit=free,
                lease_seconds=self._lease_seconds,
                now=self._wall_clock(),
                running=running.keys(),
            )
            for job in claimed:
                task = asyncio.get_running_loop().create_task(
                    self._run_job(runner, job), name=f"job {job.kind} {job.id}"
                )
                running[job.id] = task
                task.add_done_callback(functools.partial(_forget, running, job.id))

    async def _run_job(self, runner: JobRunner, job: ClaimedJob) -> None:
        try:
            # A runner's exception or a cancellation ends the span failed (ActiveSpan).
            with self._span_of(job):
                await runner.run(job, lease_owner=self.lease_owner)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._queue.release(job, owner=self.lease_owner, now=self._wall_clock())
            raise
        except Exception as exc:
            reason = type(exc).__name__
            self._logger.warning("background_job_failed", kind=job.kind, job_id=job.id, reason=reason)
            with contextlib.suppress(Exception):  # the store may be what failed: the lease then lapses
                await self._give_back(job, reason)
        finally:
            # Out of the count here, not only in the done callback: jobs that end together (one
            # group commit answers them all) run their callbacks only after every `finally`.
            self._in_flight[job.kind].pop(job.id, None)
            self._wakeup.set()  # a slot is free: claim again now, not at the next timer tick

    def _span_of(self, job: ClaimedJob) -> contextlib.AbstractContextManager[object]:
        if not self._tracing.enabled:  # off: not even the stored traceparent is parsed
            return contextlib.nullcontext()
        return self._tracing.span(
            SPAN_NAMES.get(job.kind, f"job {job.kind}"),
            # Never the worker's own current context: a job without a cause starts a trace.
            context=context_of(job.trace_parent) or new_root(),
            attributes=_span_attributes(job),
        )

    async def _give_back(self, job: ClaimedJob, reason: str) -> None:
        now = self._wall_clock()
        dead = job.attempts >= MAX_ATTEMPTS
        async with self._queue.begin() as connection:
            await self._queue.settle(
                connection,
                job,
                owner=self.lease_owner,
                state="dead" if dead else "queued",
                now=now,
                due_at=None if dead else now + self._lease_seconds,
                error=f"the {job.kind} runner failed: {reason}",
            )


def _span_attributes(job: ClaimedJob) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        "liveness_proxy.job.kind": job.kind,
        "liveness_proxy.job.attempt": job.attempts,
    }
    if job.kind == "deliver":  # the event id is ours, random, and what the receiver dedupes on
        attributes["liveness_proxy.webhook.event_id"] = job.ref
    return attributes


def _forget(running: dict[int, asyncio.Task[None]], job_id: int, _task: asyncio.Task[None]) -> None:
    running.pop(job_id, None)
