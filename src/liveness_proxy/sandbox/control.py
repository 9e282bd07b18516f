"""The /_sandbox control API: drive a sandbox served in another process over HTTP.

It exists only when `SandboxConfig.control_enabled` is set, and faults never apply to it. It answers
only what no web page can send (`local_only.py`): a Host of `SandboxConfig.control_hosts` (loopback
by default), no other site's Origin, and bodies as application/json only. A route without a body
takes none, or a JSON one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liveness_proxy.sandbox.clock import ManualClock
from liveness_proxy.sandbox.faults import Fault
from liveness_proxy.sandbox.local_only import carries_body, cross_site_refusal, is_json
from liveness_proxy.sandbox.recording import request_body
from liveness_proxy.sandbox.responses import OrjsonResponse, error_response

if TYPE_CHECKING:
    from liveness_proxy.sandbox.app import Sandbox

CONTROL_PREFIX = "/_sandbox"

_Body = TypeVar("_Body")


class _StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CompleteSessionBody(_StrictBody):
    outcome: Literal["live", "spoof"]
    confidence: Annotated[float, Field(ge=0, le=100)] | None = None


class AdvanceClockBody(_StrictBody):
    seconds: Annotated[float, Field(ge=0)]


class ClientSecretBody(_StrictBody):
    client_secret: Annotated[str, Field(min_length=1)]


_complete_session_body = TypeAdapter(CompleteSessionBody)
_advance_clock_body = TypeAdapter(AdvanceClockBody)
_client_secret_body = TypeAdapter(ClientSecretBody)
_fault_body = TypeAdapter(Fault)


_Handler = Callable[[Request], Awaitable[Response]]


def control_routes(sandbox: Sandbox) -> list[Route]:
    api = _ControlApi(sandbox)
    allowed_hosts = sandbox.config.control_hosts

    def route(path: str, handler: _Handler, method: str, *, takes_body: bool = False) -> Route:
        return Route(
            f"{CONTROL_PREFIX}{path}",
            _local_only(handler, allowed_hosts=allowed_hosts, takes_body=takes_body),
            methods=[method],
        )

    return [
        route("/sessions/{session_id}/complete", api.complete_session, "POST", takes_body=True),
        route("/sessions/{session_id}/expire", api.expire_session, "POST"),
        route("/tokens/revoke", api.revoke_tokens, "POST"),
        route("/faults", api.inject_fault, "POST", takes_body=True),
        route("/faults", api.clear_faults, "DELETE"),
        route("/stats", api.stats, "GET"),
        route("/clock/advance", api.advance_clock, "POST", takes_body=True),
        route("/client-secret", api.rotate_client_secret, "POST", takes_body=True),
    ]


def _local_only(handler: _Handler, *, allowed_hosts: frozenset[str] | None, takes_body: bool) -> _Handler:
    """`handler` behind the checks of `local_only.py`: 403 for a foreign Host or Origin, 415 for a
    body that is not JSON (or, on a route that takes one, a request that does not say JSON)."""

    async def handle(request: Request) -> Response:
        refusal = cross_site_refusal(request.headers, allowed_hosts)
        if refusal is not None:
            return error_response(403, "forbidden", refusal)
        headers = request.headers
        says_something = takes_body or carries_body(headers) or "content-type" in headers
        if request.method != "GET" and says_something and not is_json(headers):
            return error_response(415, "unsupported_media_type", "send the body as application/json")
        return await handler(request)

    return handle


class _ControlApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def complete_session(self, request: Request) -> Response:
        session_id: str = request.path_params["session_id"]
        return await _with_body(
            request,
            _complete_session_body,
            lambda body: self._complete(session_id, body),
        )

    async def _complete(self, session_id: str, body: CompleteSessionBody) -> Response:
        try:
            self.sandbox.complete_session(session_id, live=body.outcome == "live", confidence=body.confidence)
        except KeyError:
            return error_response(404, "not_found", "unknown session")
        return OrjsonResponse(self.sandbox.session_state(session_id))

    async def expire_session(self, request: Request) -> Response:
        session_id: str = request.path_params["session_id"]
        try:
            self.sandbox.expire_session(session_id)
        except KeyError:
            return error_response(404, "not_found", "unknown session")
        return OrjsonResponse(self.sandbox.session_state(session_id))

    async def revoke_tokens(self, request: Request) -> Response:
        self.sandbox.revoke_tokens()
        return OrjsonResponse({"revoked": True})

    async def inject_fault(self, request: Request) -> Response:
        async def inject(fault: Fault) -> Response:
            self.sandbox.inject_fault(fault)
            return OrjsonResponse(dataclasses.asdict(fault), status_code=201)

        return await _with_body(request, _fault_body, inject)

    async def clear_faults(self, request: Request) -> Response:
        self.sandbox.clear_faults()
        return Response(status_code=204)

    async def stats(self, request: Request) -> Response:
        return OrjsonResponse(self.sandbox.stats())

    async def advance_clock(self, request: Request) -> Response:
        clock = self.sandbox.config.clock
        if not isinstance(clock, ManualClock):
            return error_response(409, "clock_not_manual", "only a ManualClock can be advanced")

        async def advance(body: AdvanceClockBody) -> Response:
            clock.advance(body.seconds)
            return OrjsonResponse({"now": clock.now()})

        return await _with_body(request, _advance_clock_body, advance)

    async def rotate_client_secret(self, request: Request) -> Response:
        async def rotate(body: ClientSecretBody) -> Response:
            self.sandbox.rotate_client_secret(body.client_secret)
            return Response(status_code=204)

        return await _with_body(request, _client_secret_body, rotate)


async def _with_body(
    request: Request,
    adapter: TypeAdapter[_Body],
    handle: Callable[[_Body], Awaitable[Response]],
) -> Response:
    """Validate the JSON body with `adapter` and hand it to `handle`; 422 if it does not fit."""
    try:
        body = adapter.validate_json(await request_body(request))
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        return error_response(422, "invalid_request", "body does not match the control API", detail=detail)
    return await handle(body)
