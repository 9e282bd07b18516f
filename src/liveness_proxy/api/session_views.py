"""What the admin routes tell about a session (the `SessionSummary` and `SessionRecord` schemas):
who created it, when, for which business reference, where the finalizer stands, the verdict the
proxy itself read from Cynopsis (never anything the frontend claimed) and its webhooks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from liveness_proxy.privacy import derived_pass
from liveness_proxy.store import SessionOwner, StoredEvent

# The job states of a delivery, as the record names them.
_DELIVERY_STATES = {"queued": "queued", "done": "delivered", "dead": "dead"}


def session_summary(owner: SessionOwner, pass_threshold: float | None) -> dict[str, Any]:
    verdict: dict[str, Any] | None = None
    if owner.verdict is not None:
        verdict = {
            "status": owner.verdict.status,
            "confidence": owner.verdict.confidence,
            "recorded_at": iso_time(owner.verdict.recorded_at),
            "request_id": owner.verdict.request_id,
        }
        if pass_threshold is not None:
            verdict["passed"] = derived_pass(
                {"status": owner.verdict.status, "confidence": owner.verdict.confidence}, pass_threshold
            )
    return {
        "session_id": owner.session_id,
        "subject": owner.subject,
        "reference": owner.reference,
        "credential_id": owner.credential_id,
        "created_at": iso_time(owner.created_at),
        "request_id": owner.request_id,
        "finalizer": finalizer_state(owner),
        "verdict": verdict,
    }


def session_record(
    owner: SessionOwner, pass_threshold: float | None, events: Sequence[StoredEvent]
) -> dict[str, Any]:
    return {**session_summary(owner, pass_threshold), "webhooks": [webhook_delivery(e) for e in events]}


def finalizer_state(owner: SessionOwner) -> str:
    """`final` whenever a verdict is stored (a caller's read may have recorded it while the finalizer
    was off), else the finalizer's own state, or `off` when it never followed the session."""
    if owner.verdict is not None:
        return "final"
    return owner.finalizer_state or "off"


def webhook_delivery(event: StoredEvent) -> dict[str, Any]:
    state = _DELIVERY_STATES.get(event.state, event.state)
    return {
        "event_id": event.event_id,
        "type": event.type,
        "state": state,
        "attempts": event.attempts,
        "created_at": iso_time(event.created_at),
        "next_attempt_at": iso_time(event.due_at) if state == "queued" else None,
        "last_status": event.last_status,
        "last_error": event.last_error,
        "delivered_at": None if event.delivered_at is None else iso_time(event.delivered_at),
    }


def iso_time(epoch_seconds: float) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat(timespec="milliseconds")
