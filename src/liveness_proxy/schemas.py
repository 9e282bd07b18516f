"""Request and response models: the source of the OpenAPI document.

Upstream bodies are only partly published (see the upstream notes), so the models name the fields
we rely on and allow the rest through.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _OpenObject(BaseModel):
    """An upstream body: the fields we rely on, and whatever else Cynopsis sends."""

    model_config = ConfigDict(extra="allow")


class _ClosedObject(BaseModel):
    """A body the proxy writes itself: exactly these members (`additionalProperties: false`), so a
    member added by accident fails the response-schema check of the API fuzz tests."""

    model_config = ConfigDict(extra="forbid")


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


class SessionVerdict(_ClosedObject):
    status: str = Field(description="The terminal status the proxy itself read from Cynopsis.")
    confidence: float | None
    recorded_at: str = Field(description="ISO 8601, UTC.")
    passed: bool | None = Field(default=None, description="Only with LIVENESS_PROXY_PASS_THRESHOLD.")


class SessionRecord(_ClosedObject):
    """What the proxy knows about a session: its owner and the verdict it read upstream."""

    session_id: str
    subject: str
    credential_id: str
    created_at: str = Field(description="ISO 8601, UTC.")
    request_id: str
    verdict: SessionVerdict | None


class Problem(_ClosedObject):
    """RFC 9457 problem details."""

    type: str = Field(pattern=r"^urn:liveness-proxy:problem:[a-z]+(-[a-z]+)*$")
    title: str
    status: int = Field(ge=400, le=599, description="The response's own status code.")
    detail: str
    request_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="Also in X-Request-ID.")
    checks: dict[str, str] | None = Field(default=None, description="On 503 from /readyz: what failed.")
    limit: Literal["session_token", "create_session", "result", "daily_attempts"] | None = Field(
        default=None, description="On 429 from the proxy: the limit that was reached."
    )


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
        SessionRecord,
        Problem,
        Health,
        Readiness,
    ]
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(schema.get("$defs", {}))
