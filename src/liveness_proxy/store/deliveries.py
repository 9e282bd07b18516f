"""What each webhook attempt leaves behind, group-committed.

An attempt's result is recorded with what follows from it, in one transaction: `delivered` ends the
job; `gone` (410) disables the endpoint and puts the job back without counting the attempt; `failed`
queues a retry, or dead-letters the event when the schedule is over. A delivery, a dead letter and
a disabled endpoint are chain events. Like the audit log, the bindings and the verdicts, attempts
are written by group commit (`group_commit.py`): a batch shares one transaction and one chain-head
lock, instead of a commit per attempt behind the audit writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import AuditKeys, AuditRecord, column_values
from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.jobs import ClaimedJob, JobQueue, JobState
from liveness_proxy.store.outbox import disable_endpoint, mark_event_attempt

AttemptResult = Literal["delivered", "gone", "failed"]


class DeliveryRecorderClosed(RuntimeError):
    """`settle_attempt` after `close()`, or an attempt whose writer was cancelled before it was written."""


@dataclass(slots=True)
class _Settlement:
    job: ClaimedJob
    owner: str
    now: float
    result: AttemptResult
    status: int | None
    error: str | None
    retry_at: float | None
    session_id: str | None
    settled: bool = False  # set by the writer: False when the claim was no longer current


class DeliveryRecorder:
    def __init__(self, engine: AsyncEngine, keys: AuditKeys, *, batch_max: int = 256) -> None:
        self._engine = engine
        self._queue = JobQueue(engine)
        self._chain = ChainWriter.build(keys)
        self._committer: GroupCommitter[_Settlement] = GroupCommitter(
            self._write_batch,
            batch_max=batch_max,
            name="delivery writer",
            closed_error=DeliveryRecorderClosed,
        )

    async def settle_attempt(
        self,
        job: ClaimedJob,
        *,
        owner: str,
        now: float,
        result: AttemptResult,
        status: int | None,
        error: str | None,
        retry_at: float | None,
        session_id: str | None,
    ) -> bool:
        """Records one attempt (see the module docstring); `retry_at` None after a failure means a
        dead letter. False when the claim was lost meanwhile: the newer claim's outcome stands."""
        settlement = _Settlement(job, owner, now, result, status, error, retry_at, session_id)
        await self._committer.submit(settlement)
        return settlement.settled

    async def abandon(
        self,
        job: ClaimedJob,
        *,
        owner: str,
        now: float,
        state: JobState = "done",
        error: str = "event not found",
    ) -> None:
        """Ends a delivery whose event no longer exists (or was erased: `state` "cancelled"),
        without an attempt or a chain event."""
        async with self._engine.begin() as connection:
            await self._queue.settle(
                connection,
                job,
                owner=owner,
                state=state,
                now=now,
                error=error,
                count_attempt=False,
            )

    async def close(self) -> None:
        await self._committer.close()

    async def _write_batch(self, batch: list[_Settlement]) -> list[BaseException | None]:
        chain_rows: list[dict[str, Any]] = []
        async with self._engine.begin() as connection:
            for item in batch:
                job, owner, now = item.job, item.owner, item.now
                action: str | None = None
                # The job first: a claim that is no longer current writes nothing else.
                if item.result == "delivered":
                    item.settled = await self._queue.settle(
                        connection, job, owner=owner, state="done", now=now
                    )
                    action = "webhook.delivered"
                elif item.result == "gone":
                    item.settled = await self._queue.settle(
                        connection,
                        job,
                        owner=owner,
                        state="queued",
                        now=now,
                        due_at=now,
                        error=item.error,
                        count_attempt=False,
                    )
                elif item.retry_at is not None:
                    item.settled = await self._queue.settle(
                        connection,
                        job,
                        owner=owner,
                        state="queued",
                        now=now,
                        due_at=item.retry_at,
                        error=item.error,
                    )
                else:
                    item.settled = await self._queue.settle(
                        connection, job, owner=owner, state="dead", now=now, error=item.error
                    )
                    action = "webhook.dead_letter"
                if not item.settled:
                    continue
                await mark_event_attempt(
                    connection,
                    job.ref,
                    status=item.status,
                    delivered_at=now if item.result == "delivered" else None,
                )
                if item.result == "gone" and await disable_endpoint(connection, now=now):
                    action = "webhook.disabled"
                if action is not None:
                    chain_rows.append(_chain_record(item, action))
            if chain_rows:
                await self._chain.append(connection, chain_rows)
        return [None] * len(batch)


def _chain_record(item: _Settlement, action: str) -> dict[str, Any]:
    detail = {"event_id": item.job.ref, "attempts": item.job.attempts, "status": item.status}
    return column_values(
        AuditRecord(
            occurred_at=item.now,
            request_id=item.job.ref,
            subject=None,
            credential_id=None,
            action=action,
            session_id=item.session_id,
            status=200,
            upstream_status=item.status,
            latency_ms=0.0,
            problem=None,
            detail=orjson.dumps(detail, option=orjson.OPT_SORT_KEYS).decode(),
        )
    )
