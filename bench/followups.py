"""S7's view of our proxy's database, through the proxy's own store API and tables: binding sessions
whose first follow-up is due at once (what the create route writes, without the upstream call),
counting the verdicts and webhook deliveries the proxy recorded, and discarding leftover background
work so that it does not run on into the next measurement.

It works on the database while our proxy runs on it: the store's engine gives every SQLite
connection WAL and a busy timeout, so the two processes' writes simply take turns.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.settings import async_database_url
from liveness_proxy.store import SessionOwner, SessionOwnership, create_engine
from liveness_proxy.store.subjects import SubjectKeys, SubjectRegistry
from liveness_proxy.store.tables import jobs, liveness_sessions, webhook_events

# The request id of every finalizer read starts with this (background/finalizer.py): a verdict with
# it was recorded by a follow-up, not by a caller's read.
FINALIZER_REQUEST_PREFIX = "fin-"


@dataclass(frozen=True, slots=True)
class FollowProgress:
    """Of the sessions with one id prefix: how many have a verdict, how many a delivered webhook."""

    verdicts: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class FollowTimeline:
    """When the proxy recorded the first and last verdict (and delivery) of one id prefix."""

    first_verdict_at: float | None
    last_verdict_at: float | None
    first_delivery_at: float | None
    last_delivery_at: float | None
    verdicts_by_finalizer: int


class ProxyDatabase:
    """One of our proxy's databases, opened from the benchmark's process. One event loop (and
    engine) for its whole life: `close()` it, or use it as a context manager."""

    def __init__(self, database_url: str, *, pepper: str) -> None:
        """`pepper`: the proxy's, from which its subject keys derive."""
        self._pepper = pepper
        self._runner = asyncio.Runner()
        self._engine: AsyncEngine = create_engine(async_database_url(database_url), pool_size=2)

    def __enter__(self) -> ProxyDatabase:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self._engine.dispose())
        finally:
            self._runner.close()

    def bind_sessions(self, prefix: str, count: int, *, first_followup_seconds: float | None = 0) -> None:
        """`count` sessions `<prefix>-<n>` of the subject `bench` (the benchmark's API keys'), bound
        by the proxy's own binding writer (group commit, as the create route binds them) with the
        finalizer's first follow-up due after `first_followup_seconds` (None: none, as a proxy with
        the finalizer off binds them)."""
        self._runner.run(self._bind_sessions(prefix, count, first_followup_seconds))

    async def _bind_sessions(self, prefix: str, count: int, first_followup_seconds: float | None) -> None:
        ownership = SessionOwnership(self._engine, first_followup_seconds=first_followup_seconds)
        # A real commitment, as the create route records it: the verdict's chain event needs it.
        keys = SubjectKeys.from_settings_values(pepper=self._pepper, subject_key="")
        commitment = (await SubjectRegistry(self._engine, keys).resolve("bench")).commitment
        created_at = time.time()
        owners = [
            SessionOwner(
                session_id=f"{prefix}-{index}",
                subject="bench",
                subject_commitment=commitment,
                credential_id="bench-seeded",
                created_at=created_at,
                reference=f"order-{prefix}-{index}",  # travels in the webhook, as a caller's would
            )
            for index in range(count)
        ]
        try:
            await asyncio.gather(*(ownership.bind(owner, f"seed-{owner.session_id}") for owner in owners))
        finally:
            await ownership.close()

    def progress(self, prefix: str) -> FollowProgress:
        return self._runner.run(self._progress(prefix))

    async def _progress(self, prefix: str) -> FollowProgress:
        sessions, events = liveness_sessions.c, webhook_events.c
        async with self._engine.connect() as connection:
            verdicts = await connection.scalar(
                select(func.count()).where(
                    sessions.session_id.startswith(f"{prefix}-", autoescape=True),
                    sessions.verdict_status.is_not(None),
                )
            )
            deliveries = await connection.scalar(
                select(func.count()).where(
                    events.session_id.startswith(f"{prefix}-", autoescape=True),
                    events.delivered_at.is_not(None),
                )
            )
        return FollowProgress(verdicts=int(verdicts or 0), deliveries=int(deliveries or 0))

    def timeline(self, prefix: str) -> FollowTimeline:
        return self._runner.run(self._timeline(prefix))

    async def _timeline(self, prefix: str) -> FollowTimeline:
        sessions, events = liveness_sessions.c, webhook_events.c
        async with self._engine.connect() as connection:
            verdict_row = (
                await connection.execute(
                    select(
                        func.min(sessions.verdict_at),
                        func.max(sessions.verdict_at),
                        func.count(sessions.verdict_request_id),
                    ).where(
                        sessions.session_id.startswith(f"{prefix}-", autoescape=True),
                        sessions.verdict_request_id.startswith(FINALIZER_REQUEST_PREFIX),
                    )
                )
            ).one()
            delivery_row = (
                await connection.execute(
                    select(func.min(events.delivered_at), func.max(events.delivered_at)).where(
                        events.session_id.startswith(f"{prefix}-", autoescape=True)
                    )
                )
            ).one()
        return FollowTimeline(
            first_verdict_at=verdict_row[0],
            last_verdict_at=verdict_row[1],
            first_delivery_at=delivery_row[0],
            last_delivery_at=delivery_row[1],
            verdicts_by_finalizer=int(verdict_row[2]),
        )

    def window_activity(self, start: float, end: float) -> dict[str, int]:
        """What happened in the background between `start` and `end` (epoch seconds), and what was
        still waiting at `end`."""
        return self._runner.run(self._window_activity(start, end))

    async def _window_activity(self, start: float, end: float) -> dict[str, int]:
        sessions, events, queue = liveness_sessions.c, webhook_events.c, jobs.c
        async with self._engine.connect() as connection:
            created = await connection.scalar(
                select(func.count()).where(sessions.created_at >= start, sessions.created_at < end)
            )
            followed = await connection.scalar(
                select(func.count()).where(
                    sessions.verdict_at >= start,
                    sessions.verdict_at < end,
                    sessions.verdict_request_id.startswith(FINALIZER_REQUEST_PREFIX),
                )
            )
            delivered = await connection.scalar(
                select(func.count()).where(events.delivered_at >= start, events.delivered_at < end)
            )
            due_unfollowed = await connection.scalar(
                select(func.count()).where(
                    queue.kind == "finalize", queue.state == "queued", queue.due_at <= end
                )
            )
        return {
            "sessions_created": int(created or 0),
            "sessions_followed_to_verdict": int(followed or 0),
            "webhooks_delivered": int(delivered or 0),
            # Follow-ups due by the end of the window and not done: how far the finalizer lagged.
            "followups_due_not_done_at_end": int(due_unfollowed or 0),
        }

    def discard_background_work(self) -> int:
        """Marks every queued job (follow-ups and deliveries) done; returns how many. A job already
        running finishes, but its settle is fenced off (the job is no longer queued)."""
        return self._runner.run(self._discard_background_work())

    async def _discard_background_work(self) -> int:
        async with self._engine.begin() as connection:
            result = await connection.execute(
                update(jobs)
                .where(jobs.c.state == "queued")
                .values(state="done", lease_owner=None, lease_until=None, updated_at=time.time())
            )
        return int(result.rowcount)
