"""Request and response models: the source of the OpenAPI document.

The request bodies and the three proxied answers are closed: exactly the declared members (the
assumed contract of the upstream notes), plus the extra members an operator lists, which
`api/openapi.py` adds to the document it serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _ClosedObject(BaseModel):
    """A body the proxy writes itself: exactly these members (`additionalProperties: false`), so a
    member added by accident fails the response-schema check of the API fuzz tests."""

    model_config = ConfigDict(extra="forbid")


_REDACTED_FIELDS_DESCRIPTION = (
    "What the proxy dropped from the upstream answer: members outside the declared shape (and "
    "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS), declared members of the wrong type or out of bounds, and "
    "image-like values. At most 8 names, identifiers only; `...` stands for any other."
)


class SessionTokenRequest(_ClosedObject):
    """No member is declared: send `{}` or no body. Members listed in
    LIVENESS_PROXY_EXTRA_BODY_FIELDS are forwarded as they are; any other is refused (422)."""


class SessionTokenResponse(_ClosedObject):
    session_token: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[!-~]+$",
        description="One-time token for the Cynopsis frontend SDK, bound to the caller that obtained "
        "it: only that caller can create a session with it, once, before it expires.",
    )
    expires_in: int | None = Field(
        default=None, ge=0, le=10_000_000, description="Seconds until the token expires."
    )
    redacted_fields: list[str] | None = Field(default=None, description=_REDACTED_FIELDS_DESCRIPTION)


class CreateSessionRequest(_ClosedObject):
    """Members listed in LIVENESS_PROXY_EXTRA_BODY_FIELDS are forwarded as they are; any other is
    refused (422)."""

    session_token: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[!-~]+$",
        description="The token from POST /v1/liveness/session-token, obtained by this same caller.",
    )


class SessionResponse(_ClosedObject):
    session_id: str = Field(description="Upstream liveness session id, now bound to the caller.")
    status: str | None = Field(default=None, pattern=r"^[A-Za-z_]{1,32}$")
    expires_in: int | None = Field(default=None, ge=0, le=10_000_000)
    redacted_fields: list[str] | None = Field(default=None, description=_REDACTED_FIELDS_DESCRIPTION)


class LivenessResult(_ClosedObject):
    session_id: str | None = Field(default=None, description="Always the session asked for.")
    status: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_]{1,32}$",
        description="CREATED, IN_PROGRESS, SUCCEEDED, FAILED or EXPIRED.",
    )
    confidence: float | None = Field(
        default=None, ge=0, le=100, description="0-100; the integrator sets the pass threshold."
    )
    redacted_fields: list[str] | None = Field(default=None, description=_REDACTED_FIELDS_DESCRIPTION)
    passed: bool | None = Field(
        default=None,
        description="Only with LIVENESS_PROXY_PASS_THRESHOLD: SUCCEEDED and confidence at or above it; "
        "null while the session is not finished.",
    )


class SessionVerdict(_ClosedObject):
    status: str = Field(description="The terminal status the proxy itself read from Cynopsis.")
    confidence: float | None
    recorded_at: str = Field(description="ISO 8601, UTC.")
    request_id: str | None = Field(
        description="The request whose upstream read gave this verdict: a caller's request id (a "
        "result read, or this route with refresh=true), or the finalizer's poll; null for verdicts "
        "recorded before version 0005 of the schema. The audit chain's `verdict.record` event says "
        "which of the two it was."
    )
    passed: bool | None = Field(default=None, description="Only with LIVENESS_PROXY_PASS_THRESHOLD.")


class WebhookDelivery(_ClosedObject):
    """One webhook event announcing this session's outcome, and how its delivery stands."""

    event_id: str = Field(pattern=r"^msg_", description="Sent as the webhook-id header.")
    type: Literal["liveness.session.completed", "liveness.session.expired", "liveness.session.unresolved"]
    state: Literal["queued", "delivered", "dead"] = Field(
        description="queued: not delivered yet (waiting for its next attempt, or for the endpoint to "
        "be re-enabled after a 410); delivered: the receiver answered 2xx; dead: every attempt of "
        "the retry schedule failed (an operator can queue it again)."
    )
    attempts: int = Field(ge=0, description="Attempts made so far (a 410 answer is not counted).")
    created_at: str = Field(description="When the event was recorded; ISO 8601, UTC.")
    next_attempt_at: str | None = Field(description="While queued: when it is due; ISO 8601, UTC.")
    last_status: int | None = Field(description="The receiver's HTTP status at the last attempt.")
    last_error: str | None = Field(
        description="Why the last attempt failed: a status or an error class, never a body."
    )
    delivered_at: str | None = Field(description="ISO 8601, UTC.")


class SessionSummary(_ClosedObject):
    """What the proxy knows about a session: its owner, its reference, where the finalizer stands and
    the verdict the proxy itself read upstream. In the session list; the single-session route adds
    the webhook deliveries (`SessionRecord`)."""

    session_id: str
    subject: str
    reference: str | None = Field(
        description="The customer's business id, from the creating caller's credential (a JWT "
        "claim, or the host in library mode); never from a request body."
    )
    credential_id: str
    created_at: str = Field(description="ISO 8601, UTC.")
    request_id: str
    finalizer: Literal["following", "final", "unresolved", "off"] = Field(
        description="final: a verdict is recorded; following: the finalizer still reads the result "
        "on its schedule; unresolved: its deadline passed without a terminal status (a later read "
        "still records the verdict); off: the session is not followed (LIVENESS_PROXY_FINALIZER was "
        "off when it was created) and has no verdict yet."
    )
    verdict: SessionVerdict | None


class SessionRecord(SessionSummary):
    """A session's summary and the webhook events announcing its outcome, newest first (none when
    no webhook endpoint is configured, or before there is an outcome to announce)."""

    webhooks: list[WebhookDelivery]


class SessionList(_ClosedObject):
    """One page of sessions, newest first. The list leaves out each session's webhooks (one query per
    page, not per session): ask the single-session route for them."""

    sessions: list[SessionSummary]
    next_cursor: str | None = Field(
        description="Pass as `cursor` (with the same filters) for the next page; null on the last page."
    )


class EraseSubjectRequest(_ClosedObject):
    """Closed: any other member is refused (422), whatever LIVENESS_PROXY_EXTRA_BODY_FIELDS lists
    (nothing of this body goes upstream)."""

    subject: str = Field(
        min_length=1,
        max_length=255,
        description="The subject to forget, as the proxy knows it: an API key's subject, a JWT's "
        "`sub`, or the host's caller in library mode. In the body, never in a URL, where access "
        "logs would keep it.",
    )
    dry_run: bool = Field(default=False, description="true: count what would be erased, erase nothing.")

    @field_validator("subject")
    @classmethod
    def _storable(cls, value: str) -> str:
        # No subject can hold NUL (PostgreSQL cannot store it): refused here, not by the database.
        if "\x00" in value:
            raise ValueError("must not contain NUL")
        return value


class ErasedCounts(_ClosedObject):
    """What an erasure removed (or, with dry_run, would remove); all zeros when there was nothing."""

    sessions: int = Field(ge=0, description="Session bindings, with their verdicts and stored results.")
    audit_records: int = Field(
        ge=0,
        description="Audit records whose plain values were erased; their commitments stay, and the chain.",
    )
    webhook_events_cancelled: int = Field(
        ge=0, description="Webhook events not delivered yet: cancelled, their payloads erased."
    )
    webhook_payloads_erased: int = Field(ge=0, description="Payloads of webhook events already delivered.")
    idempotency_records: int = Field(ge=0, description="Stored create answers, replayed for a repeated key.")
    session_tokens: int = Field(ge=0, description="Session-token bindings (in the database or Redis).")
    api_keys_revoked: int = Field(
        ge=0, description="API keys of the subject: revoked, their subject replaced by its commitment."
    )
    redis_keys: int = Field(
        ge=0, description="Redis keys named after the subject's commitment (limit counters)."
    )
    subject_secrets: int = Field(
        ge=0,
        description="The subject's secret (0 or 1): once it is gone, nothing links the remaining "
        "commitments to the subject.",
    )


class ErasureResult(_ClosedObject):
    commitment: str | None = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="The commitment of the subject whose data this was, as the chained "
        "`subject.erased` or `session.erased` event records it (never the subject itself); null "
        "when the proxy holds no secret for the subject (it never made a request, or was erased "
        "already) or, for a session, when the session is unknown.",
    )
    dry_run: bool
    erased: ErasedCounts


class _WebhookBody(BaseModel):
    """A webhook body: what each member means is fixed, but members may be added in a later
    version, so a receiver should ignore the ones it does not know (no `additionalProperties`)."""


class _WebhookSession(_WebhookBody):
    session_id: str
    subject: str = Field(description="The caller that created the session.")
    reference: str | None = Field(
        description="The customer's business id, from the creating caller's credential; null when "
        "it carried none."
    )
    created_at: str = Field(description="When the session was created; ISO 8601, UTC (`Z`).")


class CompletedSessionData(_WebhookSession):
    status: Literal["SUCCEEDED", "FAILED"] = Field(description="The verdict the proxy read upstream.")
    confidence: float | None = Field(description="0-100; null when Cynopsis sent no usable number.")
    passed: bool | None = Field(
        description="With LIVENESS_PROXY_PASS_THRESHOLD: SUCCEEDED and confidence at or above it; "
        "null without a threshold."
    )
    completed_at: str = Field(description="When the proxy recorded the verdict; ISO 8601, UTC.")


class ExpiredSessionData(_WebhookSession):
    status: Literal["EXPIRED"] = Field(description="The session ended without a liveness check.")
    confidence: float | None
    passed: bool | None = Field(
        description="With LIVENESS_PROXY_PASS_THRESHOLD: false; null without a threshold."
    )
    completed_at: str = Field(description="When the proxy recorded the verdict; ISO 8601, UTC.")


class UnresolvedSessionData(_WebhookSession):
    status: None = Field(description="No terminal status was read before the finalizer's deadline.")
    confidence: None
    passed: None
    completed_at: None


class SessionCompletedEvent(_WebhookBody):
    """The session finished: it SUCCEEDED or FAILED. Sent once per session, whoever read the verdict
    first (a caller's result read or the finalizer)."""

    type: Literal["liveness.session.completed"]
    timestamp: str = Field(description="When the event was recorded; ISO 8601, UTC.")
    data: CompletedSessionData


class SessionExpiredEvent(_WebhookBody):
    """The session expired before the user finished it."""

    type: Literal["liveness.session.expired"]
    timestamp: str = Field(description="When the event was recorded; ISO 8601, UTC.")
    data: ExpiredSessionData


class SessionUnresolvedEvent(_WebhookBody):
    """The finalizer's deadline (LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS) passed without a terminal
    status. Not a verdict: if one is read later, `completed` or `expired` follows, under another
    webhook-id."""

    type: Literal["liveness.session.unresolved"]
    timestamp: str = Field(description="When the event was recorded; ISO 8601, UTC.")
    data: UnresolvedSessionData


class PingEvent(_WebhookBody):
    """Sent only by `liveness-proxy webhooks test`, to check the endpoint and its secret."""

    type: Literal["liveness.ping"]
    timestamp: str = Field(description="When the ping was sent; ISO 8601, UTC.")
    data: dict[str, Any] = Field(description="Empty.")


class Problem(_ClosedObject):
    """RFC 9457 problem details."""

    type: str = Field(pattern=r"^urn:liveness-proxy:problem:[a-z]+(-[a-z]+)*$")
    title: str
    status: int = Field(ge=400, le=599, description="The response's own status code.")
    detail: str
    request_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="Also in X-Request-ID.")
    checks: dict[str, str] | None = Field(default=None, description="On 503 from /readyz: what failed.")
    limit: (
        Literal[
            "session_token",
            "create_session",
            "result",
            "daily_attempts",
            "daily_attempts_total",
            "unauthenticated",
        ]
        | None
    ) = Field(default=None, description="On 429 from the proxy: the limit that was reached.")


class Health(_ClosedObject):
    status: Literal["ok"]


class Readiness(_ClosedObject):
    """`degraded`: ready, but Redis is unreachable, so limits and the token are per process."""

    status: Literal["ready", "degraded"]
    checks: dict[str, str]


def json_schema_components() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    models: list[type[BaseModel]] = [
        SessionTokenRequest,
        SessionTokenResponse,
        CreateSessionRequest,
        SessionResponse,
        LivenessResult,
        SessionVerdict,
        WebhookDelivery,
        SessionSummary,
        SessionRecord,
        SessionList,
        EraseSubjectRequest,
        ErasedCounts,
        ErasureResult,
        SessionCompletedEvent,
        SessionExpiredEvent,
        SessionUnresolvedEvent,
        PingEvent,
        Problem,
        Health,
        Readiness,
    ]
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(schema.get("$defs", {}))
