"""The admin's routes (scope `liveness:admin`): the session list and one session's record, for a
backend that must not trust the frontend; and erasure, of a subject or of one session.

All are audited like every liveness route (`session.list`, `session.read`, `session.refresh`,
`subject.erase`, `session.erase`) and count against the caller's result-read limit. The record
reads upstream only when asked (`?refresh=true`) and only while no verdict is stored: a stored
verdict is final, so a second refresh costs no upstream call.

An erasure's audit record names the admin who asked, never the subject erased: the subject travels
in the body only, and is neither logged nor recorded (the chained `subject.erased` event holds its
commitment). Erasing is idempotent: a repeat, or a subject or session the proxy never knew, answers
200 with zeros.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.api.audit_policy import AuditContext, AuditPolicy
from liveness_proxy.api.bodies import read_json_object
from liveness_proxy.api.declared import DeclaredBody
from liveness_proxy.api.handlers import valid_session_id
from liveness_proxy.api.responses import json_response
from liveness_proxy.api.session_list_query import encode_cursor, parse_list_query
from liveness_proxy.api.session_views import session_record, session_summary
from liveness_proxy.auth import ADMIN_SCOPE, Caller
from liveness_proxy.errors import BadRequest, Forbidden, NotFound, UnprocessableContent
from liveness_proxy.middleware import request_id_of
from liveness_proxy.schemas import EraseSubjectRequest
from liveness_proxy.store import SessionOwner, SessionQueries
from liveness_proxy.wiring import RequestPolicy, Service

Authenticate = Callable[[Request], Awaitable[Caller]]


class AdminHandlers:
    def __init__(self, service: Service, policy: RequestPolicy, *, authenticate: Authenticate) -> None:
        self._service = service
        self._policy = policy
        self._pass_threshold = policy.pass_threshold
        self._authenticate = authenticate
        self._sessions = SessionQueries(service.engine)
        self._audit = AuditPolicy(
            service.audit,
            failed_authentications=service.failed_authentications,
            logger=service.logger,
            wall_clock=service.wall_clock,
            tracing=service.tracing,
            on_unavailable=service.metrics.audit_unavailable,
        )
        # Closed whatever LIVENESS_PROXY_EXTRA_BODY_FIELDS lists: nothing of it goes upstream.
        self._erase_body = DeclaredBody(EraseSubjectRequest, extra_fields=())

    async def list_sessions(self, request: Request) -> Response:
        return await self._audit.run(request, "session.list", self._list_sessions)

    async def session_record(self, request: Request) -> Response:
        return await self._audit.run(request, "session.read", self._session_record)

    async def erase_subject(self, request: Request) -> Response:
        return await self._audit.run(request, "subject.erase", self._erase_subject)

    async def erase_session(self, request: Request) -> Response:
        return await self._audit.run(request, "session.erase", self._erase_session)

    async def _list_sessions(self, request: Request, audit: AuditContext) -> Response:
        await self._admin(request, audit)
        query = parse_list_query(request.query_params.multi_items())
        page = await self._sessions.page(query.criteria, after=query.after, limit=query.limit)
        position = page.next_position
        body = {
            "sessions": [session_summary(owner, self._pass_threshold) for owner in page.sessions],
            "next_cursor": None if position is None else encode_cursor(position),
        }
        return json_response(orjson.dumps(body))

    async def _session_record(self, request: Request, audit: AuditContext) -> Response:
        service = self._service
        await self._admin(request, audit)
        session_id = valid_session_id(request)
        audit.session_id = session_id
        refresh = query_flag(request.query_params, "refresh")
        if refresh:
            audit.action = "session.refresh"
        owner = await service.ownership.owner_of(session_id, fresh=True)
        if owner is None:
            raise NotFound("No such liveness session.")
        if refresh and owner.verdict is None:
            owner = await self._read_upstream(owner, request_id_of(request.scope), audit)
        events = await service.outbox.events(session_id=session_id)
        return json_response(orjson.dumps(session_record(owner, self._pass_threshold, events)))

    async def _erase_subject(self, request: Request, audit: AuditContext) -> Response:
        caller = await self._admin(request, audit)
        policy = self._policy
        payload = await read_json_object(
            request, policy.max_body_bytes, allow_empty=False, timeout_seconds=policy.body_timeout_seconds
        )
        body = self._erase_body.validate(payload)
        # The subject stays in this frame: not in the audit context, the log or the answer.
        subject = str(body["subject"])
        if subject == caller.subject:
            # This request's own audit record, written after the erasure, would hold the name in
            # plain beside a commitment whose secret is gone: `audit verify` would call it orphaned.
            raise UnprocessableContent(
                "An admin cannot erase its own subject: ask another admin, or run "
                "`liveness-proxy subjects erase`."
            )
        result = await self._service.erasure.erase_subject(
            subject, request_id=request_id_of(request.scope), dry_run=body.get("dry_run") is True
        )
        return json_response(orjson.dumps(result.as_dict()))

    async def _erase_session(self, request: Request, audit: AuditContext) -> Response:
        await self._admin(request, audit)
        # The request's record does not name the session: an erasure erases the plain values of
        # every record that does, so a repeat would find this one and never answer zeros. The
        # chained `session.erased` event names it, under this request's id.
        session_id = valid_session_id(request)
        dry_run = query_flag(request.query_params, "dry_run")
        # An unknown or already erased session answers zeros, like a repeat: not a 404 (see the
        # OpenAPI description).
        result = await self._service.erasure.erase_session(
            session_id, request_id=request_id_of(request.scope), dry_run=dry_run
        )
        return json_response(orjson.dumps(result.as_dict()))

    async def _read_upstream(self, owner: SessionOwner, request_id: str, audit: AuditContext) -> SessionOwner:
        """Reads the result now, as a caller's read would, and records a terminal one as the
        verdict (chain event and webhook in its transaction); the binding that stands afterwards."""
        service = self._service
        async with service.upstream_gate.slot():
            answer = await service.cynopsis.get_result(owner.session_id, request_id)
        audit.upstream_status = answer.status
        return await service.record_read(owner, answer.payload, request_id)

    async def _admin(self, request: Request, audit: AuditContext) -> Caller:
        caller = audit.caller = await self._authenticate(request)
        # Every authenticated request counts against the caller's budget, a refused one (403) and a
        # malformed one (400, checked after this) too.
        with self._service.tracing.span("limits", attributes={"liveness_proxy.limit": "result"}):
            await self._service.limits.check("result", caller.commitment)
        if not caller.is_admin:
            raise Forbidden(f"This route needs the '{ADMIN_SCOPE}' scope.")
        return caller


def query_flag(query: QueryParams, name: str) -> bool:
    """`name=true` or `name=false` (the record's `refresh`, the session erasure's `dry_run`); absent
    is false. Other query parameters of those routes are ignored, as they always were."""
    values = query.getlist(name)
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise BadRequest(f"'{name}' must be given once, as true or false.")
    return values[0] == "true"
