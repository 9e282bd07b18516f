"""The background worker with runners of the test's own, on a real database: a runner that raises
cannot spin forever, a job outliving its lease is not run twice by its own process, and a shutdown
hands unfinished jobs back at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import insert, select

from liveness_proxy.background import BackgroundWorker
from liveness_proxy.background import worker as worker_module
from liveness_proxy.store import ClaimedJob, JobQueue, create_engine, upgrade_database
from liveness_proxy.store.jobs import JobKind, enqueue_values
from liveness_proxy.store.tables import jobs
from support import TEST_KEYS


class Runner:
    kind: JobKind = "deliver"
    concurrency = 2

    def __init__(self, queue: JobQueue, *, work: float = 0.0, fail: bool = False) -> None:
        self.queue = queue
        self.work = work
        self.fail = fail
        self.runs: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.settled: list[bool] = []

    async def ready(self) -> bool:
        return True

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        self.runs.append(job.attempts)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self.work)
            if self.fail:
                raise RuntimeError("a bug in the runner")
            async with self.queue.begin() as connection:
                self.settled.append(
                    await self.queue.settle(connection, job, owner=lease_owner, state="done", now=time.time())
                )
        finally:
            self.running -= 1


async def _worker(tmp_path: Path, runner_options: dict[str, Any], **options: Any) -> tuple[Any, Runner, Any]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await upgrade_database(engine, keys=TEST_KEYS)
    async with engine.begin() as connection:
        await connection.execute(
            insert(jobs).values(enqueue_values("deliver", "e-1", due_at=0.0, now=0.0, trace_parent=None))
        )
    queue = JobQueue(engine)
    runner = Runner(queue, **runner_options)
    worker = BackgroundWorker(
        queue,
        [runner],
        wall_clock=time.time,
        logger=structlog.get_logger(),
        interval_seconds=0.02,
        **options,
    )
    return engine, runner, worker


async def _job_row(engine: Any) -> dict[str, Any]:
    async with engine.connect() as connection:
        return dict((await connection.execute(select(jobs))).one()._mapping)


async def test_a_runner_that_keeps_raising_ends_in_a_dead_job_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "MAX_ATTEMPTS", 3)
    engine, runner, worker = await _worker(tmp_path, {"fail": True}, lease_seconds=0.1)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while (await _job_row(engine))["state"] != "dead":
            assert time.monotonic() < deadline, "the poison job never died"
            await asyncio.sleep(0.02)
        await worker.close()
        row = await _job_row(engine)
    finally:
        await engine.dispose()
    assert runner.runs == [1, 2, 3]
    assert row["last_error"] == "the deliver runner failed: RuntimeError"


async def test_a_job_that_outlives_its_lease_is_not_run_again_by_its_own_process(tmp_path: Path) -> None:
    engine, runner, worker = await _worker(tmp_path, {"work": 0.5}, lease_seconds=0.1)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while (await _job_row(engine))["state"] != "done":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await worker.close()
    finally:
        await engine.dispose()
    assert runner.most_at_once == 1
    assert runner.runs == [1]
    assert runner.settled == [True]


async def test_shutdown_hands_an_unfinished_job_back_at_once(tmp_path: Path) -> None:
    engine, runner, worker = await _worker(tmp_path, {"work": 30}, lease_seconds=60, grace_seconds=0.1)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while not runner.runs:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        leased = await _job_row(engine)
        await worker.close()
        released = await _job_row(engine)
        again = await JobQueue(engine).claim(
            "deliver", owner="other", limit=1, lease_seconds=60, now=time.time()
        )
    finally:
        await engine.dispose()
    assert leased["lease_owner"] == worker.lease_owner
    assert leased["lease_until"] > time.time() + 30
    assert released["state"] == "queued"
    assert released["lease_until"] <= time.time()  # lapsed now, not a minute from now
    assert released["attempts"] == 1  # the cut attempt may have happened: it stays counted
    assert [job.attempts for job in again] == [2]


async def test_jobs_that_end_together_are_followed_by_the_next_claim_at_once(tmp_path: Path) -> None:
    """A group commit answers a whole batch of jobs in one event-loop step. The worker must still
    see their budget free and claim again, not sleep until its timer (10 s here)."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await upgrade_database(engine, keys=TEST_KEYS)
    async with engine.begin() as connection:
        await connection.execute(
            insert(jobs),
            [
                enqueue_values("deliver", f"e-{index}", due_at=0.0, now=0.0, trace_parent=None)
                for index in range(12)
            ],
        )
    queue = JobQueue(engine)

    class TogetherRunner(Runner):
        concurrency = 4

        def __init__(self) -> None:
            super().__init__(queue)
            self.gate: asyncio.Future[None] | None = None

        async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
            if self.gate is None or self.gate.done():
                self.gate = asyncio.get_running_loop().create_future()
            gate = self.gate
            self.runs.append(job.id)
            if len(self.runs) % self.concurrency == 0:
                gate.set_result(None)  # the batch is complete: all four end in the same step
            await gate
            async with queue.begin() as connection:
                await queue.settle(connection, job, owner=lease_owner, state="done", now=time.time())

    runner = TogetherRunner()
    worker = BackgroundWorker(
        queue,
        [runner],
        lease_seconds=60,
        interval_seconds=10,
        wall_clock=time.time,
        logger=structlog.get_logger(),
    )
    try:
        started = time.monotonic()
        worker.start()
        while len(runner.runs) < 12:
            assert time.monotonic() - started < 5, f"only {len(runner.runs)} of 12 jobs ran: the worker slept"
            await asyncio.sleep(0.01)
        await worker.close()
    finally:
        await engine.dispose()


async def test_the_erasure_notices_are_polled_every_pass_and_the_gauges_every_tenth(tmp_path: Path) -> None:
    """`on_every_pass` (the erasure notices: an erasure must reach every process within about one
    interval) runs at each pass, `on_pass` (the backlog gauges) at every tenth, from the first."""
    calls = {"every": 0, "tenth": 0}

    async def count(name: str) -> None:
        calls[name] += 1

    engine, _runner, worker = await _worker(
        tmp_path,
        {},
        lease_seconds=60,
        on_pass=lambda: count("tenth"),
        on_every_pass=lambda: count("every"),
    )
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while calls["every"] < 25:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.01)
        await worker.close()
    finally:
        await engine.dispose()
    assert calls["tenth"] == (calls["every"] + 9) // 10
