"""The admin's questions about sessions: a filtered list, newest first, read a page at a time.

Pages are keyset-paginated on (created_at, session_id), both descending: a page starts strictly
after the last row of the one before it, so a session created meanwhile neither shifts a page nor
repeats a row, and a deep page costs what the first one does (the `ix_liveness_sessions_created_at`
index serves the order; the subject and reference indexes serve their filters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.repositories import SessionOwner, owner_from_row
from liveness_proxy.store.tables import liveness_sessions

# What `status` filters on: a recorded verdict, or where a session without one stands.
VerdictStatus = Literal["SUCCEEDED", "FAILED", "EXPIRED"]
OpenState = Literal["following", "unresolved", "pending"]
SessionStatus = VerdictStatus | OpenState
SESSION_STATUSES: tuple[str, ...] = (*get_args(VerdictStatus), *get_args(OpenState))


@dataclass(frozen=True, slots=True)
class SessionPosition:
    """Where a page ends: the last row's sort key. The next page starts strictly after it."""

    created_at: float
    session_id: str


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """Every given criterion must hold. `created_after` is inclusive and `created_before`
    exclusive (epoch seconds), so consecutive windows tile time without overlap."""

    subject: str | None = None
    reference: str | None = None
    status: SessionStatus | None = None
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[SessionOwner]
    # The position to continue from; None on the last page.
    next_position: SessionPosition | None


class SessionQueries:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def page(
        self, criteria: SessionFilter, *, after: SessionPosition | None, limit: int
    ) -> SessionPage:
        """Up to `limit` sessions matching `criteria`, newest first, starting after `after`."""
        sessions = liveness_sessions.c
        query = (
            select(liveness_sessions)
            .where(*_conditions(criteria))
            .order_by(sessions.created_at.desc(), sessions.session_id.desc())
            # One row more than asked: whether another page follows, without counting.
            .limit(limit + 1)
        )
        if after is not None:
            query = query.where(
                tuple_(sessions.created_at, sessions.session_id) < tuple_(after.created_at, after.session_id)
            )
        async with self._engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        owners = [owner_from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        last = owners[-1] if owners else None
        position = SessionPosition(last.created_at, last.session_id) if more and last else None
        return SessionPage(owners, position)


def _conditions(criteria: SessionFilter) -> list[Any]:
    sessions = liveness_sessions.c
    conditions: list[Any] = []
    if criteria.subject is not None:
        conditions.append(sessions.subject == criteria.subject)
    if criteria.reference is not None:
        conditions.append(sessions.reference == criteria.reference)
    if criteria.created_after is not None:
        conditions.append(sessions.created_at >= criteria.created_after)
    if criteria.created_before is not None:
        conditions.append(sessions.created_at < criteria.created_before)
    status = criteria.status
    if status in ("following", "unresolved"):
        conditions += [sessions.verdict_status.is_(None), sessions.finalizer_state == status]
    elif status == "pending":
        conditions.append(sessions.verdict_status.is_(None))
    elif status is not None:
        conditions.append(sessions.verdict_status == status)
    return conditions
