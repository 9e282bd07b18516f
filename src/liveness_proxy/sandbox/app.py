"""The simulated Cynopsis Liveness API: OAuth2 token endpoint and the three liveness endpoints."""

from __future__ import annotations

import base64
import dataclasses
import math
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from liveness_proxy.sandbox.config import SandboxConfig
from liveness_proxy.sandbox.control import control_routes
from liveness_proxy.sandbox.faults import (
    SERVER_SEND_SCOPE_KEY,
    Endpoint,
    Fault,
    FaultQueue,
    fault_response,
)
from liveness_proxy.sandbox.recording import RecordedRequest, RequestRecorder, request_body
from liveness_proxy.sandbox.responses import OrjsonResponse, error_response

SessionStatus = Literal["CREATED", "SUCCEEDED", "FAILED", "EXPIRED"]

# Lifetime of tokens whose response carries no expires_in.
DEFAULT_TOKEN_LIFETIME_SECONDS = 3600
DEFAULT_LIVE_CONFIDENCE = 98.2
DEFAULT_SPOOF_CONFIDENCE = 12.3
# The OAuth2 token type of every token the sandbox issues.
OAUTH_BEARER = "Bearer"
# Form posts to the token endpoint carry three fields; anything far beyond that is abuse.
_MAX_FORM_FIELDS = 32
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# PNG signature, so the fake images look like images to anything sniffing them.
_FAKE_IMAGE_HEADER = b"\x89PNG\r\n\x1a\n"


@dataclass
class _SessionToken:
    issued_at: float
    used: bool = False


@dataclass
class _Session:
    created_at: float
    outcome: Literal["live", "spoof"] | None = None
    confidence: float | None = None
    expired_by_control: bool = False


class Sandbox:
    """One simulated upstream. All state lives here, so several can share a process.

    Counters and the request log are plain ints and lists: safe to read from another thread.
    """

    def __init__(self, config: SandboxConfig) -> None:
        # A private copy, so rotating the client secret does not reach back into the caller's object
        # (the clock is shared on purpose: tests move it).
        self.config = dataclasses.replace(config)
        self.tokens_issued = 0
        self.token_requests = 0
        self.request_log: list[RecordedRequest] = []
        self._faults = FaultQueue()
        self._access_tokens: dict[str, float] = {}  # token -> issued at
        self._session_tokens: dict[str, _SessionToken] = {}
        self._sessions: dict[str, _Session] = {}
        self.app = self._build_app()

    # --- In-process control ---------------------------------------------------------------

    def inject_fault(self, fault: Fault) -> None:
        self._faults.add(fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    def complete_session(self, session_id: str, *, live: bool, confidence: float | None = None) -> None:
        """Finish a session as the end user's device would; KeyError if the session is unknown.

        Control actions win over the clock: a completed session stays completed, even if late.
        """
        session = self._sessions[session_id]
        if confidence is not None and not (math.isfinite(confidence) and 0 <= confidence <= 100):
            raise ValueError(f"confidence must be within 0..100, got {confidence!r}")
        session.outcome = "live" if live else "spoof"
        if confidence is None:
            confidence = DEFAULT_LIVE_CONFIDENCE if live else DEFAULT_SPOOF_CONFIDENCE
        session.confidence = confidence
        session.expired_by_control = False

    def expire_session(self, session_id: str) -> None:
        """Expire a session now, whatever its state; KeyError if the session is unknown."""
        session = self._sessions[session_id]
        session.outcome = None
        session.confidence = None
        session.expired_by_control = True

    def revoke_tokens(self) -> None:
        """Invalidate every access token issued so far."""
        self._access_tokens.clear()

    def rotate_client_secret(self, new_secret: str) -> None:
        """Accept only `new_secret` from now on; tokens already issued stay valid."""
        self.config.client_secret = new_secret

    def reset_log(self) -> None:
        self.request_log.clear()

    @property
    def session_ids(self) -> list[str]:
        """Ids of the sessions created so far, oldest first."""
        return list(self._sessions)

    def session_state(self, session_id: str) -> dict[str, Any]:
        """Id, status and confidence of a session; KeyError if unknown."""
        session = self._sessions[session_id]
        return {
            "session_id": session_id,
            "status": self._status_of(session),
            "confidence": session.confidence,
        }

    def face_images(self, session_id: str) -> list[str]:
        """The base64 face images a completed session's result carries (what must never reach a
        frontend through the proxy); KeyError if the session is unknown."""
        self._sessions[session_id]
        return [_fake_image(session_id, label)["bytes"] for label in ("reference", "audit-1", "audit-2")]

    def stats(self) -> dict[str, int]:
        return {
            "tokens_issued": self.tokens_issued,
            "token_requests": self.token_requests,
            "requests": len(self.request_log),
            "sessions": len(self._sessions),
        }

    # --- HTTP ------------------------------------------------------------------------------

    def _build_app(self) -> _SandboxApp:
        config = self.config
        routes: list[BaseRoute] = [
            Route(config.token_path, self._token_endpoint, methods=["POST"]),
            Route(config.session_token_path, self._session_token_endpoint, methods=["POST"]),
            Route(config.session_path, self._session_endpoint, methods=["POST"]),
            Route(config.result_path_prefix + "{session_id}", self._result_endpoint, methods=["GET"]),
        ]
        if config.control_enabled:
            routes.extend(control_routes(self))
        app = _SandboxApp(
            routes=routes,
            middleware=[Middleware(RequestRecorder, record=self.request_log.append)],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )
        # A redirect for a trailing slash would be a surprise from an API; answer 404 instead.
        app.router.redirect_slashes = False
        return app

    async def _token_endpoint(self, request: Request) -> Response:
        self.token_requests += 1
        expires_in: int | None = self.config.token_lifetime_seconds
        fault = self._faults.take("token")
        if fault is not None and fault.kind == "token_expires_in":
            # A real token, with a lifetime claim the client has to cope with.
            expires_in = fault.expires_in
        elif fault is not None and (injected := await fault_response(fault, request.receive)) is not None:
            return injected
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != _FORM_CONTENT_TYPE:
            return error_response(400, "invalid_request", f"Content-Type must be {_FORM_CONTENT_TYPE}")
        form = _parse_form(await request_body(request))
        if form is None:
            return error_response(400, "invalid_request", "malformed form body")
        grant_type = form.get("grant_type")
        if grant_type is None:
            return error_response(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            return error_response(400, "unsupported_grant_type", "only client_credentials is supported")
        if not self._client_authenticates(form.get("client_id"), form.get("client_secret")):
            return error_response(401, "invalid_client", "unknown client or wrong secret")
        access_token = "sbx_" + secrets.token_urlsafe(32)
        self._access_tokens[access_token] = self.config.clock.now()
        self.tokens_issued += 1
        body: dict[str, Any] = {"access_token": access_token, "token_type": OAUTH_BEARER}
        if expires_in is not None:
            body["expires_in"] = expires_in
        body["scope"] = "liveness"
        return OrjsonResponse(body)

    async def _session_token_endpoint(self, request: Request) -> Response:
        if (refused := await self._gate("session_token", request)) is not None:
            return refused
        if _parse_json_object(await request_body(request), empty_means={}) is None:
            return error_response(400, "invalid_request", "body must be a JSON object")
        session_token = "sst_" + secrets.token_urlsafe(24)
        self._session_tokens[session_token] = _SessionToken(issued_at=self.config.clock.now())
        return OrjsonResponse(
            {"session_token": session_token, "expires_in": self.config.session_token_lifetime_seconds}
        )

    async def _session_endpoint(self, request: Request) -> Response:
        if (refused := await self._gate("liveness_session", request)) is not None:
            return refused
        payload = _parse_json_object(await request_body(request))
        if payload is None or not isinstance(payload.get("session_token"), str):
            return error_response(400, "invalid_request", "body must be a JSON object with session_token")
        record = self._session_tokens.get(payload["session_token"])
        if record is None:
            return error_response(400, "invalid_session_token", "unknown session token")
        if record.used:
            return error_response(409, "session_token_used", "session tokens are single-use")
        now = self.config.clock.now()
        if now >= record.issued_at + self.config.session_token_lifetime_seconds:
            return error_response(410, "session_token_expired", "session token has expired")
        record.used = True
        session_id = str(uuid.uuid4())
        self._sessions[session_id] = _Session(created_at=now)
        return OrjsonResponse(
            {
                "session_id": session_id,
                "status": "CREATED",
                "expires_in": self.config.session_lifetime_seconds,
            }
        )

    async def _result_endpoint(self, request: Request) -> Response:
        if (refused := await self._gate("liveness_result", request)) is not None:
            return refused
        session_id: str = request.path_params["session_id"]
        session = self._sessions.get(session_id)
        if session is None:
            return error_response(404, "not_found", "unknown session")
        completed = session.outcome is not None
        return OrjsonResponse(
            {
                "session_id": session_id,
                "status": self._status_of(session),
                "confidence": session.confidence,
                "reference_image": _fake_image(session_id, "reference") if completed else None,
                "audit_images": (
                    [_fake_image(session_id, f"audit-{index}") for index in (1, 2)] if completed else []
                ),
            }
        )

    # --- Helpers ---------------------------------------------------------------------------

    async def _injected_fault(self, endpoint: Endpoint, request: Request) -> Response | None:
        fault = self._faults.take(endpoint)
        if fault is None:
            return None
        return await fault_response(fault, request.receive)

    async def _gate(self, endpoint: Endpoint, request: Request) -> Response | None:
        """What every liveness endpoint checks first: injected faults, then the two headers."""
        if (injected := await self._injected_fault(endpoint, request)) is not None:
            return injected
        if not self._bearer_token_valid(request.headers.get("authorization")):
            return error_response(
                401,
                "invalid_token",
                "missing, unknown, expired or revoked access token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if request.headers.get("x-domain-id") != self.config.domain_id:
            return error_response(403, "invalid_domain", "X-Domain-Id does not match this client")
        return None

    def _client_authenticates(self, client_id: str | None, client_secret: str | None) -> bool:
        if client_id is None or client_secret is None:
            return False
        # Both comparisons always run, so timing does not reveal which field was wrong.
        id_matches = secrets.compare_digest(client_id.encode(), self.config.client_id.encode())
        secret_matches = secrets.compare_digest(client_secret.encode(), self.config.client_secret.encode())
        return id_matches and secret_matches

    def _bearer_token_valid(self, authorization: str | None) -> bool:
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        issued_at = self._access_tokens.get(token.strip())
        if issued_at is None:
            return False
        lifetime = self.config.token_lifetime_seconds
        if lifetime is None:
            lifetime = DEFAULT_TOKEN_LIFETIME_SECONDS
        return self.config.clock.now() < issued_at + lifetime

    def _status_of(self, session: _Session) -> SessionStatus:
        if session.outcome == "live":
            return "SUCCEEDED"
        if session.outcome == "spoof":
            return "FAILED"
        if session.expired_by_control:
            return "EXPIRED"
        if self.config.clock.now() >= session.created_at + self.config.session_lifetime_seconds:
            return "EXPIRED"
        return "CREATED"


class _SandboxApp(Starlette):
    """Starlette that leaves the server's own `send` in the scope before any middleware wraps it:
    the faults that work below HTTP (a reset, garbage bytes) reach the connection through it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND_SCOPE_KEY] = send
        await super().__call__(scope, receive, send)


def create_sandbox_app(config: SandboxConfig) -> Starlette:
    """The ASGI app of a fresh `Sandbox`, for when nothing needs to drive it in-process."""
    return Sandbox(config).app


def _parse_form(body: bytes) -> dict[str, str] | None:
    """Form fields, or None if the body is not a form or repeats a field (RFC 6749 section 3.2)."""
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return None
    if any(len(values) != 1 for values in fields.values()):
        return None
    return {name: values[0] for name, values in fields.items()}


def _parse_json_object(body: bytes, *, empty_means: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The body as a JSON object, `empty_means` for an empty body, None for anything else."""
    if not body.strip():
        return empty_means
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _fake_image(session_id: str, label: str) -> dict[str, Any]:
    # Deterministic bytes per session and image, so tests can compare them.
    image_bytes = _FAKE_IMAGE_HEADER + f"sandbox {label} image for session {session_id}".encode()
    return {
        "bytes": base64.b64encode(image_bytes).decode("ascii"),
        "bounding_box": {"width": 0.42, "height": 0.56, "left": 0.29, "top": 0.18},
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    status_code = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    error = {404: "not_found", 405: "method_not_allowed"}.get(status_code, "http_error")
    return error_response(status_code, error, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal_error")
