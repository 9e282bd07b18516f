"""`subjects export SUBJECT`: everything the proxy holds about one subject, as one JSON document
(the data-subject access request of GDPR Art. 15)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import api_keys, audit_records, liveness_sessions, webhook_events


def _plain(row: Any) -> dict[str, Any]:
    return {str(key): value for key, value in row._mapping.items()}


async def export_subject(
    engine: AsyncEngine,
    registry: SubjectRegistry,
    subject: str,
    audit_view: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """`audit_view` shapes an audit record as `audit export` prints it. API keys are listed without
    their secret hashes; the idempotency records and session-token bindings, which hold only keyed
    hashes and expire within hours, are not listed."""
    found = await registry.find(subject)
    commitment = None if found is None else found.commitment
    async with engine.connect() as connection:
        matches = [liveness_sessions.c.subject == subject]
        if commitment is not None:
            matches.append(liveness_sessions.c.subject_commitment == commitment)
        sessions = [
            _plain(row)
            for row in await connection.execute(
                select(liveness_sessions).where(or_(*matches)).order_by(liveness_sessions.c.created_at)
            )
        ]
        keys = [
            {name: value for name, value in _plain(row).items() if name != "secret_hash"}
            for row in await connection.execute(select(api_keys).where(api_keys.c.subject == subject))
        ]
        events: list[dict[str, Any]] = []
        session_ids = [str(session["session_id"]) for session in sessions]
        for start in range(0, len(session_ids), 500):
            for row in await connection.execute(
                select(webhook_events)
                .where(webhook_events.c.session_id.in_(session_ids[start : start + 500]))
                .order_by(webhook_events.c.created_at)
            ):
                event = _plain(row)
                event["body"] = None if event["body"] is None else orjson.loads(event["body"])
                events.append(event)
        records: list[dict[str, Any]] = []
        if commitment is not None:
            records = [
                audit_view(_plain(row))
                for row in await connection.execute(
                    select(audit_records)
                    .where(audit_records.c.subject_commitment == commitment)
                    .order_by(audit_records.c.seq)
                )
            ]
        erased_records = 0
        if commitment is not None:
            erased_records = int(
                (
                    await connection.execute(
                        select(func.count())
                        .select_from(audit_records)
                        .where(
                            audit_records.c.subject_commitment == commitment,
                            audit_records.c.erased_at.is_not(None),
                        )
                    )
                ).scalar_one()
            )
    return {
        "subject": subject,
        "commitment": commitment,
        "sessions": sessions,
        "api_keys": keys,
        "webhook_events": events,
        "audit_records": records,
        "audit_records_erased": erased_records,
    }
