"""Request and response models: the source of the OpenAPI document.

Upstream bodies are only partly published (see the upstream notes), so the models name the fields
we rely on and allow the rest through.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _OpenObject(BaseModel):
    model_config = ConfigDict(extra="allow")


class SessionTokenRequest(_OpenObject):
    """Any JSON object (may be empty); forwarded to get_session_token."""


class SessionTokenResponse(_OpenObject):
    session_token: str = Field(description="One-time token for the Cynopsis frontend SDK.")
    expires_in: int | None = Field(default=None, description="Seconds until the token expires.")


class CreateSessionRequest(_OpenObject):
    session_token: str | None = Field(
        default=None, description="The token from POST /v1/liveness/session-token."
    )


class SessionResponse(_OpenObject):
    session_id: str = Field(description="Upstream liveness session id, now bound to the caller.")
    status: str | None = None
    expires_in: int | None = None


class LivenessResult(_OpenObject):
    session_id: str | None = None
    status: str | None = Field(
        default=None, description="CREATED, IN_PROGRESS, SUCCEEDED, FAILED or EXPIRED."
    )
    confidence: float | None = Field(
        default=None, description="0-100; the integrator sets the pass threshold."
    )
    redacted_fields: list[str] | None = Field(
        default=None, description="Biometric fields the proxy removed from the upstream result."
    )
    passed: bool | None = Field(
        default=None,
        description="Only with LIVENESS_PROXY_PASS_THRESHOLD: SUCCEEDED and confidence at or above it; "
        "null while the session is not finished.",
    )


class SessionVerdict(BaseModel):
    status: str = Field(description="The terminal status the proxy itself read from Cynopsis.")
    confidence: float | None
    recorded_at: str = Field(description="ISO 8601, UTC.")
    passed: bool | None = Field(default=None, description="Only with LIVENESS_PROXY_PASS_THRESHOLD.")


class SessionRecord(BaseModel):
    """What the proxy knows about a session: its owner and the verdict it read upstream."""

    session_id: str
    subject: str
    credential_id: str
    created_at: str = Field(description="ISO 8601, UTC.")
    request_id: str
    verdict: SessionVerdict | None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    checks: dict[str, str] | None = None
    limit: str | None = Field(
        default=None,
        description="On 429 from the proxy: session_token, create_session, result or daily_attempts.",
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
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
        SessionRecord,
        Problem,
        Health,
        Readiness,
    ]
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(schema.get("$defs", {}))
