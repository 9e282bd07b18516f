"""The admin's routes (scope `liveness:admin`): the session list and one session's record, for a
backend that must not trust the frontend.

Both are audited like every liveness route (`session.list`, `session.read`, `session.refresh`) and
count against the caller's result-read limit. The record reads upstream only when asked
(`?refresh=true`) and only while no verdict is stored: a stored verdict is final, so a second
refresh costs no upstream call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.api.audit_policy import AuditContext, AuditPolicy
from liveness_proxy.api.handlers import valid_session_id
from liveness_proxy.api.responses import json_response
from liveness_proxy.api.session_list_query import encode_cursor, parse_list_query
from liveness_proxy.api.session_views import session_record, session_summary
from liveness_proxy.auth import ADMIN_SCOPE, Caller
from liveness_proxy.errors import BadRequest, Forbidden, NotFound
from liveness_proxy.middleware import request_id_of
from liveness_proxy.store import SessionOwner, SessionQueries
from liveness_proxy.wiring import RequestPolicy, Service

Authenticate = Callable[[Request], Awaitable[Caller]]


class AdminHandlers:
    def __init__(self, service: Service, policy: RequestPolicy, *, authenticate: Authenticate) -> None:
        self._service = service
        self._pass_threshold = policy.pass_threshold
        self._authenticate = authenticate
        self._sessions = SessionQueries(service.engine)
        self._audit = AuditPolicy(
            service.audit,
            failed_authentications=service.failed_authentications,
            logger=service.logger,
            wall_clock=service.wall_clock,
        )

    async def list_sessions(self, request: Request) -> Response:
        return await self._audit.run(request, "session.list", self._list_sessions)

    async def session_record(self, request: Request) -> Response:
        return await self._audit.run(request, "session.read", self._session_record)

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
        refresh = refresh_requested(request.query_params)
        if refresh:
            audit.action = "session.refresh"
        owner = await service.ownership.owner_of(session_id, fresh=True)
        if owner is None:
            raise NotFound("No such liveness session.")
        if refresh and owner.verdict is None:
            owner = await self._read_upstream(owner, request_id_of(request.scope), audit)
        events = await service.outbox.events(session_id=session_id)
        return json_response(orjson.dumps(session_record(owner, self._pass_threshold, events)))

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
        await self._service.limits.check("result", caller.commitment)
        if not caller.is_admin:
            raise Forbidden(f"This route needs the '{ADMIN_SCOPE}' scope.")
        return caller


def refresh_requested(query: QueryParams) -> bool:
    """`refresh=true` or `refresh=false`; absent is false. Other query parameters of the record
    route are ignored, as they always were."""
    values = query.getlist("refresh")
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise BadRequest("'refresh' must be given once, as true or false.")
    return values[0] == "true"
