"""The webhook outbox: events written in the same transaction as the fact they announce, and the
state of the one endpoint they go to. Their delivery is a `deliver` job (store/jobs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.jobs import enqueue_values
from liveness_proxy.store.tables import WEBHOOK_ENDPOINT_ROW_ID, jobs, webhook_endpoint, webhook_events


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event as it is signed and sent: `body` is the exact bytes of every attempt."""

    event_id: str
    type: str
    session_id: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class StoredEvent:
    event_id: str
    type: str
    session_id: str | None
    body: bytes | None  # None once erased (store/erasure.py): there is nothing left to send
    created_at: float
    state: str  # queued, done (delivered) or dead
    attempts: int
    due_at: float
    last_status: int | None
    last_error: str | None
    delivered_at: float | None


def event_values(event: OutboxEvent, *, now: float) -> dict[str, Any]:
    """The columns of an outbox row, for an INSERT in the caller's transaction."""
    return {
        "event_id": event.event_id,
        "type": event.type,
        "session_id": event.session_id,
        "body": event.body.decode(),
        "created_at": now,
    }


async def add_event(
    connection: AsyncConnection, event: OutboxEvent, *, now: float, due_at: float, trace_parent: str | None
) -> None:
    """Writes the event and its delivery job, first due at `due_at`, in the caller's transaction;
    the delivery joins the trace of `trace_parent` (store/jobs.py)."""
    await connection.execute(insert(webhook_events).values(event_values(event, now=now)))
    await connection.execute(
        insert(jobs).values(
            enqueue_values("deliver", event.event_id, due_at=due_at, now=now, trace_parent=trace_parent)
        )
    )


class WebhookOutbox:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def event(self, event_id: str) -> StoredEvent | None:
        rows = await self._events(webhook_events.c.event_id == event_id, limit=1)
        return rows[0] if rows else None

    async def events(
        self, *, failed_only: bool = False, session_id: str | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        """Newest first. `failed_only`: dead letters, and queued events that have failed an attempt."""
        conditions: list[Any] = []
        if session_id is not None:
            conditions.append(webhook_events.c.session_id == session_id)
        if failed_only:
            conditions.append(
                (jobs.c.state == "dead") | ((jobs.c.state == "queued") & jobs.c.last_error.is_not(None))
            )
        return await self._events(*conditions, limit=limit)

    async def _events(self, *conditions: Any, limit: int) -> list[StoredEvent]:
        query = (
            select(
                webhook_events,
                jobs.c.state,
                jobs.c.attempts,
                jobs.c.due_at,
                jobs.c.last_error,
            )
            .join(jobs, (jobs.c.kind == "deliver") & (jobs.c.ref == webhook_events.c.event_id))
            .where(*conditions)
            .order_by(webhook_events.c.created_at.desc(), webhook_events.c.event_id.desc())
            .limit(limit)
        )
        async with self._engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [
            StoredEvent(
                event_id=row.event_id,
                type=row.type,
                session_id=row.session_id,
                body=None if row.body is None else str(row.body).encode(),
                created_at=row.created_at,
                state=row.state,
                attempts=row.attempts,
                due_at=row.due_at,
                last_status=row.last_status,
                last_error=row.last_error,
                delivered_at=row.delivered_at,
            )
            for row in rows
        ]

    async def endpoint_disabled_at(self) -> float | None:
        async with self._engine.connect() as connection:
            value = (
                await connection.execute(
                    select(webhook_endpoint.c.disabled_at).where(
                        webhook_endpoint.c.id == WEBHOOK_ENDPOINT_ROW_ID
                    )
                )
            ).scalar_one_or_none()
        return None if value is None else float(value)

    async def enable_endpoint(self) -> bool:
        """Re-enables the endpoint; False when it was not disabled."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(webhook_endpoint)
                .where(
                    webhook_endpoint.c.id == WEBHOOK_ENDPOINT_ROW_ID,
                    webhook_endpoint.c.disabled_at.is_not(None),
                )
                .values(disabled_at=None)
            )
        return bool(result.rowcount)


async def disable_endpoint(connection: AsyncConnection, *, now: float) -> bool:
    """Disables the endpoint (it answered 410 Gone); False when it already was."""
    result = await connection.execute(
        update(webhook_endpoint)
        .where(webhook_endpoint.c.id == WEBHOOK_ENDPOINT_ROW_ID, webhook_endpoint.c.disabled_at.is_(None))
        .values(disabled_at=now)
    )
    return bool(result.rowcount)


async def mark_event_attempt(
    connection: AsyncConnection, event_id: str, *, status: int | None, delivered_at: float | None
) -> None:
    values: dict[str, Any] = {"last_status": status}
    if delivered_at is not None:
        values["delivered_at"] = delivered_at
    await connection.execute(
        update(webhook_events).where(webhook_events.c.event_id == event_id).values(**values)
    )
