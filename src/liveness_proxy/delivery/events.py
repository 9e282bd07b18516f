"""The webhook events and their bodies.

    {"type": "liveness.session.completed", "timestamp": "2026-12-04T10:00:00.000Z",
     "data": {"session_id", "subject", "reference", "status", "confidence", "passed",
              "created_at", "completed_at"}}

`timestamp` is when the event was recorded; `completed_at` is when the proxy recorded the verdict
(null for `unresolved`); `passed` is null without a pass threshold. The body is built once and
stored: every attempt sends the same bytes, under the same `webhook-id`, signed afresh.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import orjson

from liveness_proxy.privacy import derived_pass
from liveness_proxy.store import OutboxEvent, SessionOwner, SessionVerdict

COMPLETED = "liveness.session.completed"
EXPIRED = "liveness.session.expired"
UNRESOLVED = "liveness.session.unresolved"
PING_EVENT = "liveness.ping"
EVENT_TYPES = (COMPLETED, EXPIRED, UNRESOLVED)


def new_event_id() -> str:
    """`msg_` and 24 random base32 characters (120 bits): unique without coordination."""
    return "msg_" + secrets.token_hex(15)


def iso_utc(epoch_seconds: float) -> str:
    return (
        dt.datetime.fromtimestamp(epoch_seconds, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class VerdictEvents:
    """Builds the event of a session's outcome (the verdict ledger's `EventFactory`)."""

    def __init__(self, *, pass_threshold: float | None) -> None:
        self._pass_threshold = pass_threshold

    def __call__(
        self, owner: SessionOwner, verdict: SessionVerdict | None, recorded_at: float
    ) -> OutboxEvent:
        if verdict is None:
            event_type, status, confidence, passed, completed_at = UNRESOLVED, None, None, None, None
        else:
            event_type = EXPIRED if verdict.status == "EXPIRED" else COMPLETED
            status, confidence = verdict.status, verdict.confidence
            passed = (
                None
                if self._pass_threshold is None
                else derived_pass({"status": status, "confidence": confidence}, self._pass_threshold)
            )
            completed_at = iso_utc(verdict.recorded_at)
        data = {
            "session_id": owner.session_id,
            "subject": owner.subject,
            "reference": owner.reference,
            "status": status,
            "confidence": confidence,
            "passed": passed,
            "created_at": iso_utc(owner.created_at),
            "completed_at": completed_at,
        }
        return OutboxEvent(
            event_id=new_event_id(),
            type=event_type,
            session_id=owner.session_id,
            body=event_body(event_type, recorded_at, data),
        )


def event_body(event_type: str, recorded_at: float, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": event_type, "timestamp": iso_utc(recorded_at), "data": data})
