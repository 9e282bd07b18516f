"""Request and response models: the source of the OpenAPI document.

Upstream bodies are only partly published (see the upstream notes), so the models name the fields
we rely on and allow the rest through.
"""

from __future__ import annotations

from typing import Any

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


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    checks: dict[str, str] | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


def json_schema_components() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    models: list[type[BaseModel]] = [
        SessionTokenRequest,
        SessionTokenResponse,
        CreateSessionRequest,
        SessionResponse,
        LivenessResult,
        Problem,
        Health,
        Readiness,
    ]
    _, schema = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(schema.get("$defs", {}))
