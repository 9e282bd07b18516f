"""The HTTP surface: three liveness routes, health, readiness and the OpenAPI document.

Every liveness request, accepted or rejected, leaves exactly one audit record, committed before the
response is sent: a caller never holds a result the audit log does not know about.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.auth import Caller
from liveness_proxy.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    ServiceUnavailable,
    UnprocessableContent,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamMalformed,
)
from liveness_proxy.middleware import request_id_of
from liveness_proxy.runtime import Runtime
from liveness_proxy.store import AuditRecord, SessionAlreadyBound, SessionOwner

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9.+-]*\+)?json", re.IGNORECASE)
NO_STORE = {"Cache-Control": "no-store"}
READINESS_TOKEN_WAIT_SECONDS = 5.0


@dataclass(slots=True)
class AuditContext:
    """What a liveness handler learned, for its audit record."""

    action: str
    caller: Caller | None = None
    session_id: str | None = None
    upstream_status: int | None = None
    written: bool = False
    started: float = field(default_factory=time.perf_counter)

    def record(self, request_id: str, status: int, problem: str | None, occurred_at: float) -> AuditRecord:
        return AuditRecord(
            occurred_at=occurred_at,
            request_id=request_id,
            subject=None if self.caller is None else self.caller.subject,
            credential_id=None if self.caller is None else self.caller.credential_id,
            action=self.action,
            session_id=self.session_id,
            status=status,
            upstream_status=self.upstream_status,
            latency_ms=round((time.perf_counter() - self.started) * 1000, 3),
            problem=problem,
        )


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    merged = dict(NO_STORE)
    merged.update(headers or {})
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=merged)


class LivenessApi:
    """Route handlers. `runtime` is attached by the app's lifespan before the first request."""

    def __init__(self, openapi_document: dict[str, Any]) -> None:
        self._openapi_body = orjson.dumps(openapi_document)
        self.runtime: Runtime | None = None

    def _rt(self) -> Runtime:
        runtime = self.runtime
        if runtime is None:
            raise ServiceUnavailable("The service is starting.", retry_after_seconds=1)
        return runtime

    # -- liveness routes -----------------------------------------------------------------------

    async def session_token(self, request: Request) -> Response:
        return await self._audited(request, "session_token.create", self._session_token)

    async def create_session(self, request: Request) -> Response:
        return await self._audited(request, "session.create", self._create_session)

    async def result(self, request: Request) -> Response:
        return await self._audited(request, "result.read", self._result)

    async def _session_token(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        audit.caller = await self._authenticate(request, rt)
        body = await read_json_object(request, rt.settings.liveness_proxy_max_body_bytes, allow_empty=True)
        answer = await rt.cynopsis.get_session_token(body, request_id_of(request.scope))
        audit.upstream_status = answer.status
        return json_response(answer.payload)

    async def _create_session(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        body = await read_json_object(request, rt.settings.liveness_proxy_max_body_bytes, allow_empty=False)
        request_id = request_id_of(request.scope)
        answer = await rt.cynopsis.create_session(body, request_id)
        audit.upstream_status = answer.status
        session_id = self._session_id_from(
            answer.payload, rt.settings.cynopsis_session_id_fields, answer.status
        )
        audit.session_id = session_id
        occurred_at = rt.wall_clock()
        owner = SessionOwner(
            session_id=session_id,
            subject=caller.subject,
            credential_id=caller.credential_id,
            created_at=occurred_at,
        )
        try:
            # The binding and its audit record commit together, before the caller sees the id.
            await rt.ownership.bind(owner, request_id, audit=audit.record(request_id, 201, None, occurred_at))
        except SessionAlreadyBound:
            raise UpstreamMalformed(
                "The liveness service returned a session id that is already in use.",
                upstream_status=answer.status,
            ) from None
        audit.written = True
        location = f"/v1/liveness/sessions/{session_id}/result"
        return json_response(answer.payload, status=201, headers={"Location": location})

    async def _result(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        session_id = request.path_params["session_id"]
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
            raise BadRequest("The session id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.")
        audit.session_id = session_id
        owner = await rt.ownership.owner_of(session_id)
        # A foreign session and an unknown one are indistinguishable to the caller, on purpose.
        if owner is None or (owner.subject != caller.subject and not caller.is_admin):
            raise NotFound("No such liveness session.")
        answer = await rt.cynopsis.get_result(session_id, request_id_of(request.scope))
        audit.upstream_status = answer.status
        payload, removed = rt.biometrics.apply(answer.payload)
        if removed:
            payload["redacted_fields"] = removed
        return json_response(payload)

    async def _authenticate(self, request: Request, rt: Runtime) -> Caller:
        caller = await rt.authentication.authenticate(request.headers)
        request.scope["state"]["subject"] = caller.subject
        return caller

    @staticmethod
    def _session_id_from(payload: dict[str, Any], field_names: list[str], upstream_status: int) -> str:
        for name in field_names:
            value = payload.get(name)
            if value is None:
                continue
            if isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value):
                return value
            raise UpstreamMalformed(
                "The liveness service returned a session id of an unusable form.",
                upstream_status=upstream_status,
            )
        raise UpstreamMalformed(
            "The liveness service returned no session id.", upstream_status=upstream_status
        )

    async def _audited(
        self,
        request: Request,
        action: str,
        handler: Callable[[Request, AuditContext], Awaitable[Response]],
    ) -> Response:
        rt = self._rt()
        audit = AuditContext(action=action)
        failure: ProblemError | None = None
        response: Response | None = None
        try:
            response = await handler(request, audit)
            status, problem = response.status_code, None
        except ProblemError as error:
            failure = error
            status, problem = error.response_status(), error.slug
            if isinstance(error, UpstreamError) and error.upstream_status is not None:
                audit.upstream_status = error.upstream_status
        if not audit.written:
            await rt.audit.append(
                audit.record(request_id_of(request.scope), status, problem, rt.wall_clock())
            )
        if failure is not None:
            raise failure
        assert response is not None
        return response

    # -- operational routes --------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readiness(self, request: Request) -> Response:
        rt = self._rt()
        checks: dict[str, str] = {}
        try:
            await rt.ping_store()
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"failed: {type(exc).__name__}"
        if rt.tokens.cached is not None:
            checks["upstream_token"] = "ok"
        else:
            try:
                await asyncio.wait_for(rt.tokens.get(), READINESS_TOKEN_WAIT_SECONDS)
                checks["upstream_token"] = "ok"
            except (ProblemError, TimeoutError) as exc:
                checks["upstream_token"] = f"failed: {getattr(exc, 'slug', 'timeout')}"
        if all(value == "ok" for value in checks.values()):
            return json_response({"status": "ready", "checks": checks})
        error = ServiceUnavailable(
            "Not ready: " + ", ".join(sorted(k for k, v in checks.items() if v != "ok")),
            retry_after_seconds=5,
        )
        body = orjson.loads(rt.render_problem(error, request_id_of(request.scope)))
        body["checks"] = checks
        return Response(
            orjson.dumps(body),
            status_code=503,
            media_type="application/problem+json",
            headers={**NO_STORE, **error.headers},
        )

    async def openapi(self, _request: Request) -> Response:
        return Response(self._openapi_body, media_type="application/json")


async def read_json_object(request: Request, max_bytes: int, *, allow_empty: bool) -> dict[str, Any]:
    """The request body as a JSON object, enforcing size and media type before reading it all."""
    headers = request.headers
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is invalid.")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
        if int(declared) == 0 and allow_empty:
            return {}
    content_type = headers.get("content-type")
    media_type = (content_type or "").split(";", 1)[0].strip()
    if content_type is not None and not _JSON_MEDIA_TYPE.fullmatch(media_type):
        raise UnsupportedMediaType("The body must be application/json.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
    if not body:
        if allow_empty:
            return {}
        raise BadRequest("A JSON object body is required.")
    if content_type is None:
        raise UnsupportedMediaType("The body must be sent with Content-Type: application/json.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise UnprocessableContent("The body must be a JSON object.")
    return payload
