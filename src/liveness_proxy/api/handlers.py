"""The HTTP surface: three liveness routes, health, readiness and the OpenAPI document.

Every liveness request, accepted or rejected, leaves exactly one audit record, committed before the
response is sent: a caller never holds a result the audit log does not know about.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from liveness_proxy.auth import ADMIN_SCOPE, Caller, HostAuthenticator
from liveness_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    RequestTimeout,
    ServiceUnavailable,
    StoreUnavailable,
    UnprocessableContent,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamMalformed,
    render_problem,
)
from liveness_proxy.middleware import request_id_of
from liveness_proxy.privacy import derived_pass, is_terminal
from liveness_proxy.runtime import Runtime
from liveness_proxy.store import (
    AuditRecord,
    SessionAlreadyBound,
    SessionOwner,
    SessionVerdict,
    is_store_outage,
)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9.+-]*\+)?json", re.IGNORECASE)
NO_STORE = {"Cache-Control": "no-store"}
READINESS_TOKEN_WAIT_SECONDS = 5.0
# A readiness check that passed; named, because bandit takes `checks["upstream_token"] = "ok"` for a password.
CHECK_PASSED = "ok"


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


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    merged = dict(NO_STORE)
    merged.update(headers or {})
    return Response(body, status_code=status, media_type="application/json", headers=merged)


def encode_upstream(payload: dict[str, Any], upstream_status: int) -> bytes:
    """Upstream JSON re-encoded for the caller. orjson reads deeper nesting than it writes (1024 vs
    254 levels): such an answer is unusable, not a crash."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise UpstreamMalformed(
            "The liveness service sent JSON nested too deeply.", upstream_status=upstream_status
        ) from None


class LivenessApi:
    """Route handlers. `runtime` is attached by the app's lifespan before the first request."""

    def __init__(
        self, openapi_document: dict[str, Any], *, host_authentication: HostAuthenticator | None = None
    ) -> None:
        self._openapi_body = orjson.dumps(openapi_document)
        self._host_authentication = host_authentication
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

    async def session_record(self, request: Request) -> Response:
        return await self._audited(request, "session.read", self._session_record)

    async def _session_token(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        await rt.limits.check("session_token", caller.subject)
        body = await read_json_object(
            request,
            rt.settings.liveness_proxy_max_body_bytes,
            allow_empty=True,
            timeout_seconds=rt.settings.liveness_proxy_body_timeout_seconds,
        )
        async with rt.upstream_gate.slot():
            answer = await rt.cynopsis.get_session_token(body, request_id_of(request.scope))
        audit.upstream_status = answer.status
        return json_response(encode_upstream(answer.payload, answer.status))

    async def _create_session(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        await rt.limits.check("create_session", caller.subject)
        body = await read_json_object(
            request,
            rt.settings.liveness_proxy_max_body_bytes,
            allow_empty=False,
            timeout_seconds=rt.settings.liveness_proxy_body_timeout_seconds,
        )
        request_id = request_id_of(request.scope)
        async with rt.upstream_gate.slot():
            # Counted only once the call is sure to go out (a slot and an access token in hand): an
            # outage of ours costs no attempts; an attempt that fails upstream still counts (the
            # cap bounds brute force, it is not a bill).
            await rt.tokens.get()

            async def count_attempt() -> None:
                await rt.limits.consume_attempt(caller.subject)

            # Counted once the circuit breaker admitted the call: a refused call costs no attempt.
            answer = await rt.cynopsis.create_session(body, request_id, before_sending=count_attempt)
        audit.upstream_status = answer.status
        session_id = session_id_from(answer.payload, rt.settings.cynopsis_session_id_fields, answer.status)
        audit.session_id = session_id
        # Encoded before binding: once the binding is committed, nothing may fail on the way to
        # the caller.
        encoded = encode_upstream(answer.payload, answer.status)
        occurred_at = rt.wall_clock()
        owner = SessionOwner(
            session_id=session_id,
            subject=caller.subject,
            credential_id=caller.credential_id,
            created_at=occurred_at,
            request_id=request_id,
        )
        try:
            await rt.ownership.bind(owner, request_id)
        except SessionAlreadyBound:
            raise UpstreamMalformed(
                "The liveness service returned a session id that is already in use.",
                upstream_status=answer.status,
            ) from None
        # The binding is durable before its audit record (written by _audited), and both before the
        # caller sees the id: a crash in between leaves a binding nobody was told of, never an
        # unaudited answer.
        # Under the host's prefix when mounted in another app (library mode) or behind `--root-path`.
        location = f"{request.scope.get('root_path', '')}/v1/liveness/sessions/{session_id}/result"
        return json_response(encoded, status=201, headers={"Location": location})

    async def _result(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        session_id = request.path_params["session_id"]
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
            raise BadRequest("The session id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.")
        audit.session_id = session_id
        await rt.limits.check("result", caller.subject)
        owner = await rt.ownership.owner_of(session_id)
        # A foreign session and an unknown one are indistinguishable to the caller, on purpose.
        if owner is None or (owner.subject != caller.subject and not caller.is_admin):
            raise NotFound("No such liveness session.")
        async with rt.upstream_gate.slot():
            answer = await rt.cynopsis.get_result(session_id, request_id_of(request.scope))
        audit.upstream_status = answer.status
        await self._record_verdict(rt, owner, answer.payload)
        payload, removed = rt.biometrics.apply(answer.payload)
        if removed:
            payload["redacted_fields"] = removed
        threshold = rt.settings.liveness_proxy_pass_threshold
        if threshold is not None:
            payload["passed"] = derived_pass(payload, threshold)
        return json_response(encode_upstream(payload, answer.status))

    @staticmethod
    async def _record_verdict(rt: Runtime, owner: SessionOwner, payload: dict[str, Any]) -> None:
        status = payload.get("status")
        if not is_terminal(status):
            return
        confidence = payload.get("confidence")
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, int | float)
            or not math.isfinite(confidence)
        ):
            confidence = None
        await rt.ownership.record_verdict(
            owner, SessionVerdict(status=str(status), confidence=confidence, recorded_at=rt.wall_clock())
        )

    async def _session_record(self, request: Request, audit: AuditContext) -> Response:
        rt = self._rt()
        caller = audit.caller = await self._authenticate(request, rt)
        if not caller.is_admin:
            raise Forbidden(f"This route needs the '{ADMIN_SCOPE}' scope.")
        session_id = request.path_params["session_id"]
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
            raise BadRequest("The session id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.")
        audit.session_id = session_id
        await rt.limits.check("result", caller.subject)
        owner = await rt.ownership.owner_of(session_id, fresh=True)
        if owner is None:
            raise NotFound("No such liveness session.")
        return json_response(orjson.dumps(session_record(owner, rt.settings.liveness_proxy_pass_threshold)))

    async def _authenticate(self, request: Request, rt: Runtime) -> Caller:
        caller = None
        if self._host_authentication is not None:
            # Library mode: the host application's own authentication speaks first.
            caller = await self._host_authentication.authenticate(request)
        if caller is None:
            caller = await rt.authentication.authenticate(request.headers)
        request.scope["state"]["subject"] = caller.subject
        return caller

    async def _audited(
        self,
        request: Request,
        action: str,
        handler: Callable[[Request, AuditContext], Awaitable[Response]],
    ) -> Response:
        rt = self._rt()
        audit = AuditContext(action=action)
        try:
            response = await handler(request, audit)
        except ProblemError as error:
            if isinstance(error, UpstreamError) and error.upstream_status is not None:
                audit.upstream_status = error.upstream_status
            await self._append_audit_best_effort(rt, request, audit, error.response_status(), error.slug)
            raise
        except ClientDisconnect:
            # The caller went away mid-body: nothing was forwarded. 499, as nginx records it.
            await self._append_audit(rt, request, audit, 499, "client-disconnected")
            raise
        except asyncio.CancelledError:
            # Cancelled (shutdown past its grace period) possibly after the upstream call went out:
            # the record is queued before the first wait, and closing the audit log writes it.
            await self._append_audit(rt, request, audit, 499, "cancelled")
            raise
        except Exception as exc:
            if is_store_outage(exc):
                # The database is unreachable: a 503 the caller can retry, not a 500 (a bug). Its
                # record is attempted like any other, and is lost only if the store still is.
                outage = StoreUnavailable()
                await self._append_audit_best_effort(rt, request, audit, outage.status, outage.slug)
                raise outage from None
            # A bug: still one record (if the store takes it), then a 500.
            await self._append_audit(rt, request, audit, 500, "internal-error")
            raise
        try:
            await self._append_audit(rt, request, audit, response.status_code, None)
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            # The answer is ready but its record cannot be written: it is not sent.
            rt.logger.error(  # noqa: TRY400 - the reason is the class name; no traceback in logs
                "audit_unavailable", reason=type(exc).__name__, status=response.status_code
            )
            raise StoreUnavailable() from None
        return response

    async def _append_audit_best_effort(
        self, rt: Runtime, request: Request, audit: AuditContext, status: int, problem: str
    ) -> None:
        """For error answers only: the caller is told of the failure even when it cannot be
        recorded (a refusal acknowledges nothing); the log says so."""
        try:
            await self._append_audit(rt, request, audit, status, problem)
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            rt.logger.error(  # noqa: TRY400 - the reason is the class name; no traceback in logs
                "audit_unavailable", reason=type(exc).__name__, status=status
            )

    @staticmethod
    async def _append_audit(
        rt: Runtime, request: Request, audit: AuditContext, status: int, problem: str | None
    ) -> None:
        # For the access log line, which the middleware writes after the response.
        request.scope["state"]["upstream_status"] = audit.upstream_status
        if audit.written:
            return
        audit.written = True
        await rt.audit.append(audit.record(request_id_of(request.scope), status, problem, rt.wall_clock()))

    # -- operational routes --------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        return json_response(b'{"status":"ok"}')

    async def readiness(self, request: Request) -> Response:
        rt = self._rt()
        checks: dict[str, str] = {}
        try:
            await rt.ping_store()
            checks["store"] = CHECK_PASSED
        except Exception as exc:
            checks["store"] = f"failed: {type(exc).__name__}"
        if rt.tokens.cached is not None:
            checks["upstream_token"] = CHECK_PASSED
        else:
            try:
                await asyncio.wait_for(rt.tokens.get(), READINESS_TOKEN_WAIT_SECONDS)
                checks["upstream_token"] = CHECK_PASSED
            except (ProblemError, TimeoutError) as exc:
                checks["upstream_token"] = f"failed: {getattr(exc, 'slug', 'timeout')}"
        if all(value == "ok" for value in checks.values()):
            status = "ready"
            if rt.redis is not None:
                try:
                    await rt.ping_redis()
                    checks["redis"] = "ok"
                except Exception as exc:
                    # Still ready: limits and the token fall back to this process's own state.
                    # Sending traffic elsewhere would not help, every replica shares this Redis.
                    checks["redis"] = f"degraded: {type(exc).__name__}"
                    status = "degraded"
            return json_response(orjson.dumps({"status": status, "checks": checks}))
        failed = ", ".join(sorted(name for name, value in checks.items() if value != "ok"))
        error = ServiceUnavailable(f"Not ready: {failed}.", retry_after_seconds=5)
        return Response(
            render_problem(error, request_id_of(request.scope), {"checks": checks}),
            status_code=error.status,
            media_type=PROBLEM_CONTENT_TYPE,
            headers={**NO_STORE, **error.headers},
        )

    async def openapi(self, _request: Request) -> Response:
        return Response(self._openapi_body, media_type="application/json")


def session_record(owner: SessionOwner, pass_threshold: float | None) -> dict[str, Any]:
    """What the admin route tells about a session: who created it, when, and the verdict the
    proxy itself read from Cynopsis (never anything the frontend claimed)."""
    verdict: dict[str, Any] | None = None
    if owner.verdict is not None:
        verdict = {
            "status": owner.verdict.status,
            "confidence": owner.verdict.confidence,
            "recorded_at": iso_time(owner.verdict.recorded_at),
        }
        if pass_threshold is not None:
            verdict["passed"] = derived_pass(
                {"status": owner.verdict.status, "confidence": owner.verdict.confidence}, pass_threshold
            )
    return {
        "session_id": owner.session_id,
        "subject": owner.subject,
        "credential_id": owner.credential_id,
        "created_at": iso_time(owner.created_at),
        "request_id": owner.request_id,
        "verdict": verdict,
    }


def iso_time(epoch_seconds: float) -> str:
    return dt.datetime.fromtimestamp(epoch_seconds, dt.UTC).isoformat(timespec="milliseconds")


def session_id_from(payload: dict[str, Any], field_names: list[str], upstream_status: int) -> str:
    """The session id of a create-session answer: the first configured field present, validated."""
    for name in field_names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value):
            return value
        raise UpstreamMalformed(
            "The liveness service returned a session id of an unusable form.", upstream_status=upstream_status
        )
    raise UpstreamMalformed("The liveness service returned no session id.", upstream_status=upstream_status)


async def read_json_object(
    request: Request, max_bytes: int, *, allow_empty: bool, timeout_seconds: float
) -> bytes:
    """The request body, a JSON object, re-encoded; size and media type are enforced before the body
    is read, and the whole body must arrive within `timeout_seconds` (a client trickling it in would
    otherwise hold this request, its task and its connection for as long as it likes). Re-encoding
    means the upstream never sees duplicate keys or other parser-dependent input."""
    headers = request.headers
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is invalid.")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
        if int(declared) == 0 and allow_empty:
            return b"{}"
    content_type = headers.get("content-type")
    media_type = (content_type or "").split(";", 1)[0].strip()
    if content_type is not None and not _JSON_MEDIA_TYPE.fullmatch(media_type):
        raise UnsupportedMediaType("The body must be application/json.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
    except TimeoutError:
        raise RequestTimeout(
            f"The request body was not received within {timeout_seconds:g} seconds."
        ) from None
    if not body:
        if allow_empty:
            return b"{}"
        raise BadRequest("A JSON object body is required.")
    if content_type is None:
        raise UnsupportedMediaType("The body must be sent with Content-Type: application/json.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise UnprocessableContent("The body must be a JSON object.")
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise UnprocessableContent("The body is nested too deeply.") from None
