"""The verdict ledger: recording a session's outcome, its audit event and its webhook in one
transaction.

The first terminal verdict wins, across a fleet: the record is a conditional UPDATE
(`… WHERE verdict_status IS NULL`), and only the writer whose UPDATE changed the row goes on, in the
same transaction, to append the `verdict.record` event to the audit chain, to write the webhook
event and its delivery job (when webhooks are configured), and to end the session's finalizer
follow-up. A caller's read and a finalizer poll that race on two replicas therefore produce exactly
one chain event and one webhook between them, and a crash leaves all of it or none of it.

Verdicts are written by group commit (`group_commit.py`), like the audit log and the bindings: one
transaction records a batch of verdicts and appends all their chain events at once. A commit per
verdict, each holding the chain-head lock through its own commit, halved the request path of a
process whose finalizer was busy (bench S7).

`unresolved` (the finalizer's deadline passed without a terminal status) is recorded the same way,
but it is not a verdict: a later terminal read still records one, and announces it.

A caller's read also hands over the answer it was given (`final_result`, see api/final_results.py):
it is written by the same UPDATE as the verdict, so a stored answer never exists without the verdict
it shows. A verdict recorded without one (by the finalizer, or before migration 0010) gets it from a
later caller's read, by `keep_final_result`: one conditional UPDATE that writes it only beside the
same verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import bindparam, func, insert, or_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.privacy import is_confidence, is_terminal
from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import AuditKeys, AuditRecord, column_values
from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.outbox import OutboxEvent, add_event, event_values
from liveness_proxy.store.repositories import SessionOwner, SessionOwnership, SessionVerdict
from liveness_proxy.store.tables import jobs, liveness_sessions, webhook_events
from liveness_proxy.tracing import current_traceparent

ReadBy = Literal["request", "finalizer"]
# Builds the webhook event of an outcome: (owner, verdict or None for unresolved, recorded at).
EventFactory = Callable[[SessionOwner, SessionVerdict | None, float], OutboxEvent]


class VerdictLedgerClosed(RuntimeError):
    """`record` after `close()`, or a verdict whose writer was cancelled before it was written."""


@dataclass(slots=True)
class _Recording:
    owner: SessionOwner
    verdict: SessionVerdict
    read_by: ReadBy
    # The span that read the verdict (a caller's request, a finalizer poll), read when it is
    # submitted: the writer task's current span is not the caller's. Its webhook joins that trace.
    trace_parent: str | None
    # The answer its caller was given, stored with the verdict (None: nothing to store).
    final_result: str | None = None
    won: bool = False  # set by the writer: this verdict is the one that stands


class VerdictLedger:
    def __init__(
        self,
        engine: AsyncEngine,
        ownership: SessionOwnership,
        keys: AuditKeys,
        *,
        events: EventFactory | None,
        wall_clock: Callable[[], float],
        first_delivery_delay: float = 0.0,
        batch_max: int = 256,
    ) -> None:
        """`events`: None when no webhook endpoint is configured (nothing to announce to).
        `first_delivery_delay`: seconds from an event to its first delivery attempt (the first entry
        of the retry schedule)."""
        self._engine = engine
        self._first_delivery_delay = first_delivery_delay
        self._ownership = ownership
        self._events = events
        self._wall_clock = wall_clock
        self._chain = ChainWriter.build(keys)
        sessions = liveness_sessions.c
        self._record_statement = (
            update(liveness_sessions)
            .where(sessions.session_id == bindparam("id"), sessions.verdict_status.is_(None))
            .values(
                verdict_status=bindparam("status"),
                verdict_confidence=bindparam("confidence"),
                verdict_at=bindparam("at"),
                verdict_request_id=bindparam("read_by_request"),
                finalizer_state="final",
                final_result=bindparam("final_result"),
            )
        )
        self._committer: GroupCommitter[_Recording] = GroupCommitter(
            self._write_batch, batch_max=batch_max, name="verdict writer", closed_error=VerdictLedgerClosed
        )

    async def record(
        self,
        owner: SessionOwner,
        verdict: SessionVerdict,
        *,
        read_by: ReadBy,
        final_result: str | None = None,
    ) -> SessionOwner:
        """Stores `verdict` (and `final_result`, the answer it was read from, in the same UPDATE)
        unless a verdict is already stored; returns the binding with the verdict that stands. A
        session whose verdict this process already knows costs no write."""
        if owner.verdict is not None:
            return owner
        recording = _Recording(owner, verdict, read_by, current_traceparent(), final_result)
        await self._committer.submit(recording)
        if recording.won:
            stored = dataclasses.replace(
                owner, verdict=verdict, finalizer_state="final", final_result=final_result
            )
            self._ownership.remember(stored)
            return stored
        # Another writer (here or on another replica) stored its verdict first: read it back.
        return await self._ownership.owner_of(owner.session_id, fresh=True) or owner

    async def keep_final_result(self, owner: SessionOwner, final_result: str, *, policy: str) -> SessionOwner:
        """Stores `final_result` beside the verdict that stands, when the row holds none or one
        that does not begin with `policy` (made under another answer-shaping policy); `owner.verdict`
        must be the verdict the answer shows: the UPDATE only writes beside that same verdict. Returns
        the binding as it now stands (read back when nothing was written: another process may have
        stored its own copy, or erased the session)."""
        verdict = owner.verdict
        if verdict is None:
            raise ValueError("a final result is only kept beside a verdict")
        sessions = liveness_sessions.c
        async with self._engine.begin() as connection:
            written = await connection.execute(
                update(liveness_sessions)
                .where(
                    sessions.session_id == owner.session_id,
                    sessions.verdict_status == verdict.status,
                    sessions.verdict_confidence.is_not_distinct_from(verdict.confidence),
                    or_(
                        sessions.final_result.is_(None),
                        func.substr(sessions.final_result, 1, len(policy)) != policy,
                    ),
                )
                .values(final_result=final_result)
            )
        if written.rowcount:
            kept = dataclasses.replace(owner, final_result=final_result)
            self._ownership.remember(kept)
            return kept
        return await self._ownership.owner_of(owner.session_id, fresh=True) or owner

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        await self._committer.close()

    async def _write_batch(self, batch: list[_Recording]) -> list[BaseException | None]:
        chain_rows: list[dict[str, Any]] = []
        events: list[tuple[OutboxEvent, str | None]] = []  # and the trace context of its delivery
        followed_up: list[str] = []
        async with self._engine.begin() as connection:
            # In session-id order: replicas that record verdicts of the same sessions then take
            # the row locks in the same order, and cannot deadlock (the sort is stable, so within
            # the batch the first claim on a session still wins).
            for recording in sorted(batch, key=lambda recording: recording.owner.session_id):
                owner, verdict = recording.owner, recording.verdict
                # Within the batch too, the first claim on a session wins: a later UPDATE of the same
                # transaction sees the first one's verdict and changes nothing.
                won = await connection.execute(
                    self._record_statement,
                    {
                        "id": owner.session_id,
                        "status": verdict.status,
                        "confidence": verdict.confidence,
                        "at": verdict.recorded_at,
                        "read_by_request": verdict.request_id,
                        "final_result": recording.final_result,
                    },
                )
                recording.won = bool(won.rowcount)
                if not recording.won:
                    continue
                detail: dict[str, object] = {
                    "status": verdict.status,
                    "confidence": verdict.confidence,
                    "read_by": recording.read_by,
                }
                if self._events is not None:
                    event = self._events(owner, verdict, verdict.recorded_at)
                    events.append((event, recording.trace_parent))
                    detail["event_id"] = event.event_id
                chain_rows.append(
                    self._system_record(
                        owner, "verdict.record", verdict.request_id, detail, verdict.recorded_at
                    )
                )
                followed_up.append(owner.session_id)
            if events:
                now = self._wall_clock()
                await connection.execute(
                    insert(webhook_events), [event_values(event, now=now) for event, _ in events]
                )
                await connection.execute(
                    insert(jobs),
                    [
                        enqueue_values(
                            "deliver",
                            event.event_id,
                            due_at=now + self._first_delivery_delay,
                            now=now,
                            trace_parent=trace_parent,
                        )
                        for event, trace_parent in events
                    ],
                )
            if followed_up:
                # The follow-ups have nothing left to wait for: no further poll is made. Before the
                # chain append, so that the chain-head lock is held for the append alone.
                await connection.execute(
                    update(jobs)
                    .where(jobs.c.kind == "finalize", jobs.c.ref.in_(followed_up), jobs.c.state == "queued")
                    .values(state="done", lease_owner=None, lease_until=None, updated_at=self._wall_clock())
                )
            if chain_rows:
                await self._chain.append(connection, chain_rows)
        return [None] * len(batch)

    async def mark_unresolved(self, owner: SessionOwner, *, request_id: str) -> bool:
        """The finalizer gave up: records `unresolved` and announces it, unless a verdict is stored.
        False when nothing changed."""
        now = self._wall_clock()
        sessions = liveness_sessions.c
        async with self._engine.begin() as connection:
            won = await connection.execute(
                update(liveness_sessions)
                .where(
                    sessions.session_id == owner.session_id,
                    sessions.verdict_status.is_(None),
                    sessions.finalizer_state == "following",
                )
                .values(finalizer_state="unresolved")
            )
            if not won.rowcount:
                return False
            detail: dict[str, object] = {"read_by": "finalizer"}
            event = await self._announce(connection, owner, None, now)
            if event is not None:
                detail["event_id"] = event
            await self._chain.append(
                connection, [self._system_record(owner, "session.unresolved", request_id, detail, now)]
            )
        self._ownership.forget(owner.session_id)
        return True

    async def _announce(
        self, connection: AsyncConnection, owner: SessionOwner, verdict: SessionVerdict | None, now: float
    ) -> str | None:
        if self._events is None:
            return None
        event = self._events(owner, verdict, now)
        # Called in the finalizer poll's own task (not a group commit): its span is the current one.
        await add_event(
            connection,
            event,
            now=now,
            due_at=now + self._first_delivery_delay,
            trace_parent=current_traceparent(),
        )
        return event.event_id

    @staticmethod
    def _system_record(
        owner: SessionOwner, action: str, request_id: str | None, detail: dict[str, object], now: float
    ) -> dict[str, object]:
        return column_values(
            AuditRecord(
                occurred_at=now,
                request_id=request_id or "finalizer",
                subject=owner.subject,
                subject_commitment=owner.subject_commitment,
                credential_id=owner.credential_id,
                action=action,
                session_id=owner.session_id,
                status=200,
                upstream_status=None,
                latency_ms=0.0,
                problem=None,
                detail=orjson.dumps(detail, option=orjson.OPT_SORT_KEYS).decode(),
            )
        )


def verdict_of(payload: dict[str, Any], *, recorded_at: float, request_id: str) -> SessionVerdict | None:
    """The verdict in an upstream result, or None while the session is not finished. A confidence
    that is not a number on the 0-100 scale is recorded as unknown (None), never guessed: the
    caller's answer drops it by the same rule (`privacy.is_confidence`)."""
    status = payload.get("status")
    if not is_terminal(status):
        return None
    confidence = payload.get("confidence")
    if not is_confidence(confidence):
        confidence = None
    return SessionVerdict(
        status=str(status), confidence=confidence, recorded_at=recorded_at, request_id=request_id
    )
