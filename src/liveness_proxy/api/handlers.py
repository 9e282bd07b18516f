"""The liveness handlers: the three proxied calls (the admin's routes are in `admin.py`).

A handler is built once the service runs, with everything it uses as constructor arguments. Each
one authenticates, limits, validates and calls upstream; the audit policy around it writes the
record (`audit_policy.py`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.api.audit_policy import AuditContext, AuditPolicy
from liveness_proxy.api.bodies import encode_upstream, read_json_object, session_id_from
from liveness_proxy.api.paths import SESSION_ID_RULE, is_session_id, session_result_location
from liveness_proxy.api.responses import json_response
from liveness_proxy.auth import Caller, HostAuthenticator
from liveness_proxy.errors import BadRequest, NotFound, UpstreamMalformed
from liveness_proxy.middleware import request_id_of
from liveness_proxy.privacy import derived_pass
from liveness_proxy.store import SessionAlreadyBound, SessionOwner
from liveness_proxy.wiring import RequestPolicy, Service


class LivenessHandlers:
    """The liveness routes of one running service."""

    def __init__(
        self,
        service: Service,
        policy: RequestPolicy,
        *,
        host_authentication: HostAuthenticator | None = None,
    ) -> None:
        self._service = service
        self._policy = policy
        self._host_authentication = host_authentication
        self._audit = AuditPolicy(service.audit, logger=service.logger, wall_clock=service.wall_clock)

    async def session_token(self, request: Request) -> Response:
        return await self._audit.run(request, "session_token.create", self._session_token)

    async def create_session(self, request: Request) -> Response:
        return await self._audit.run(request, "session.create", self._create_session)

    async def result(self, request: Request) -> Response:
        return await self._audit.run(request, "result.read", self._result)

    async def _session_token(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        await service.limits.check("session_token", caller.subject)
        body = await read_json_object(
            request,
            self._policy.max_body_bytes,
            allow_empty=True,
            timeout_seconds=self._policy.body_timeout_seconds,
        )
        async with service.upstream_gate.slot():
            answer = await service.cynopsis.get_session_token(body, request_id_of(request.scope))
        audit.upstream_status = answer.status
        return json_response(encode_upstream(answer.payload, answer.status))

    async def _create_session(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        await service.limits.check("create_session", caller.subject)
        body = await read_json_object(
            request,
            self._policy.max_body_bytes,
            allow_empty=False,
            timeout_seconds=self._policy.body_timeout_seconds,
        )
        request_id = request_id_of(request.scope)
        async with service.upstream_gate.slot():
            # Counted only once the call is sure to go out (a slot and an access token in hand): an
            # outage of ours costs no attempts; an attempt that fails upstream still counts (the
            # cap bounds brute force, it is not a bill).
            await service.tokens.get()

            async def count_attempt() -> None:
                await service.limits.consume_attempt(caller.subject)

            # Counted once the circuit breaker admitted the call: a refused call costs no attempt.
            answer = await service.cynopsis.create_session(body, request_id, before_sending=count_attempt)
        audit.upstream_status = answer.status
        session_id = session_id_from(answer.payload, self._policy.session_id_fields, answer.status)
        audit.session_id = session_id
        # Encoded before binding: once the binding is committed, nothing may fail on the way to
        # the caller.
        encoded = encode_upstream(answer.payload, answer.status)
        owner = SessionOwner(
            session_id=session_id,
            subject=caller.subject,
            credential_id=caller.credential_id,
            created_at=service.wall_clock(),
            request_id=request_id,
            reference=caller.reference,
        )
        try:
            await service.ownership.bind(owner, request_id)
        except SessionAlreadyBound:
            raise UpstreamMalformed(
                "The liveness service returned a session id that is already in use.",
                upstream_status=answer.status,
            ) from None
        # The binding is durable before its audit record (written by the audit policy), and both
        # before the caller sees the id: a crash in between leaves a binding nobody was told of,
        # never an unaudited answer.
        location = session_result_location(request.scope.get("root_path", ""), session_id)
        return json_response(encoded, status=201, headers={"Location": location})

    async def _result(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        caller = audit.caller = await self.authenticate(request)
        session_id = valid_session_id(request)
        audit.session_id = session_id
        await service.limits.check("result", caller.subject)
        owner = await service.ownership.owner_of(session_id)
        # A foreign session and an unknown one are indistinguishable to the caller, on purpose.
        if owner is None or (owner.subject != caller.subject and not caller.is_admin):
            raise NotFound("No such liveness session.")
        request_id = request_id_of(request.scope)
        async with service.upstream_gate.slot():
            answer = await service.cynopsis.get_result(session_id, request_id)
        audit.upstream_status = answer.status
        await service.record_read(owner, answer.payload, request_id)
        payload, removed = service.biometrics.apply(answer.payload)
        if removed:
            payload["redacted_fields"] = removed
        threshold = self._policy.pass_threshold
        if threshold is not None:
            payload["passed"] = derived_pass(payload, threshold)
        return json_response(encode_upstream(payload, answer.status))

    async def authenticate(self, request: Request) -> Caller:
        """Who calls (the admin routes authenticate through here too): the host's hook first in
        library mode, then the proxy's API keys and JWTs."""
        caller = None
        if self._host_authentication is not None:
            # Library mode: the host application's own authentication speaks first.
            caller = await self._host_authentication.authenticate(request)
        if caller is None:
            caller = await self._service.authentication.authenticate(request.headers)
        request.scope["state"]["subject"] = caller.subject
        return caller


def valid_session_id(request: Request) -> str:
    session_id = request.path_params["session_id"]
    if not is_session_id(session_id):
        raise BadRequest(f"The session id must be {SESSION_ID_RULE}.")
    return session_id
