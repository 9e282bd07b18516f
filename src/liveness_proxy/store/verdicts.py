"""The verdict ledger: recording a session's outcome, its audit event and its webhook in one
transaction.

The first terminal verdict wins, across a fleet: the record is a conditional UPDATE
(`… WHERE verdict_status IS NULL`), and only the writer whose UPDATE changed the row goes on, in the
same transaction, to append the `verdict.record` event to the audit chain, to write the webhook
event and its delivery job (when webhooks are configured), and to end the session's finalizer
follow-up. A caller's read and a finalizer poll that race on two replicas therefore produce exactly
one chain event and one webhook between them, and a crash leaves all of it or none of it.

`unresolved` (the finalizer's deadline passed without a terminal status) is recorded the same way,
but it is not a verdict: a later terminal read still records one, and announces it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import orjson
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.privacy import is_terminal
from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import AuditRecord, column_values
from liveness_proxy.store.jobs import finish_job
from liveness_proxy.store.outbox import OutboxEvent, add_event
from liveness_proxy.store.repositories import SessionOwner, SessionOwnership, SessionVerdict
from liveness_proxy.store.tables import liveness_sessions

ReadBy = Literal["request", "finalizer"]
# Builds the webhook event of an outcome: (owner, verdict or None for unresolved, recorded at).
EventFactory = Callable[[SessionOwner, SessionVerdict | None, float], OutboxEvent]


class VerdictLedger:
    def __init__(
        self,
        engine: AsyncEngine,
        ownership: SessionOwnership,
        *,
        events: EventFactory | None,
        wall_clock: Callable[[], float],
    ) -> None:
        """`events`: None when no webhook endpoint is configured (nothing to announce to)."""
        self._engine = engine
        self._ownership = ownership
        self._events = events
        self._wall_clock = wall_clock
        self._chain = ChainWriter.build()

    async def record(self, owner: SessionOwner, verdict: SessionVerdict, *, read_by: ReadBy) -> SessionOwner:
        """Stores `verdict` unless one is already stored; returns the binding with the verdict that
        stands. A session whose verdict this process already knows costs no write."""
        if owner.verdict is not None:
            return owner
        now = verdict.recorded_at
        sessions = liveness_sessions.c
        async with self._engine.begin() as connection:
            won = await connection.execute(
                update(liveness_sessions)
                .where(sessions.session_id == owner.session_id, sessions.verdict_status.is_(None))
                .values(
                    verdict_status=verdict.status,
                    verdict_confidence=verdict.confidence,
                    verdict_at=now,
                    verdict_request_id=verdict.request_id,
                    finalizer_state="final",
                )
            )
            if won.rowcount:
                detail: dict[str, object] = {
                    "status": verdict.status,
                    "confidence": verdict.confidence,
                    "read_by": read_by,
                }
                event = await self._announce(connection, owner, verdict, now)
                if event is not None:
                    detail["event_id"] = event
                await self._chain.append(
                    connection,
                    [self._system_record(owner, "verdict.record", verdict.request_id, detail, now)],
                )
                await finish_job(connection, "finalize", owner.session_id, now=now)
        # Read back: another process may have stored its verdict first.
        stored = await self._ownership.owner_of(owner.session_id, fresh=True)
        return stored or owner

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
        await add_event(connection, event, now=now)
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
    that is not a finite number is recorded as unknown (None), never guessed."""
    status = payload.get("status")
    if not is_terminal(status):
        return None
    confidence = payload.get("confidence")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
    ):
        confidence = None
    return SessionVerdict(
        status=str(status), confidence=confidence, recorded_at=recorded_at, request_id=request_id
    )
