"""How the demo's own routes (`/demo/...`) take requests and answer: the security-headers, Host and
Origin middleware, JSON bodies only, problem+json answers (the proxy's own routes do not pass through
here, except for the headers on a proxy answer under /demo). The Host, Origin and JSON rules are the
sandbox control API's too (`sandbox/local_only.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.api.paths import SESSION_ID_PATTERN
from liveness_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    UnprocessableContent,
    UnsupportedMediaType,
    render_problem,
)
from liveness_proxy.sandbox import Sandbox
from liveness_proxy.sandbox.local_only import cross_site_refusal, is_json

# The page is ours and same-origin: scripts, styles and calls only from here, never framed.
DEMO_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DemoHeaders:
    """Request id and security headers for the demo's own routes (the proxy adds its own to its
    answers): the page needs a policy that lets it load its script and style, nothing more.

    It also refuses a Host it does not serve under (`allowed_hosts`; None: any) and another site's
    Origin: sign-in hands a JWT to whoever asks, so a foreign site whose name was rebound to
    127.0.0.1 must not reach it, nor may another site's page press the demo's buttons. (Not
    Starlette's TrustedHostMiddleware: it refuses with a plain-text 400, against the problem+json
    rule, and would cover the mounted proxy too, not only /demo.)"""

    def __init__(self, app: ASGIApp, *, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self._allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/demo"):
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["demo_request_id"] = request_id

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                # A proxy answer under /demo (its 404) keeps the id its body names.
                headers.setdefault("x-request-id", request_id)
                headers["content-security-policy"] = DEMO_CONTENT_SECURITY_POLICY
                headers["x-content-type-options"] = "nosniff"
                headers["referrer-policy"] = "no-referrer"
                headers["x-frame-options"] = "DENY"
                headers.setdefault("cache-control", "no-store")
            await send(message)

        refusal = cross_site_refusal(Headers(scope=scope), self._allowed_hosts)
        if refusal is not None:
            await problem_response(Forbidden(refusal), request_id)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def problem_response(error: ProblemError, request_or_id: Request | str) -> Response:
    request_id = (
        request_or_id
        if isinstance(request_or_id, str)
        else str(request_or_id.scope.get("state", {}).get("demo_request_id", ""))
    )
    return Response(
        render_problem(error, request_id),
        status_code=error.response_status(),
        media_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]
ModelT = TypeVar("ModelT", bound=BaseModel)


def answers_problems(handler: Handler) -> Handler:
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ProblemError as error:
            return problem_response(error, request)

    return handle


async def read_json_bytes(request: Request, max_bytes: int = 64 * 1024) -> bytes:
    """The body of an application/json request, as sent (a webhook's signature covers these bytes)."""
    # JSON only: a cross-site form or text/plain POST (no preflight) cannot press the demo's buttons.
    if not is_json(request.headers):
        raise UnsupportedMediaType("Send the body as application/json.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, model: type[ModelT], max_bytes: int = 64 * 1024) -> ModelT:
    body = await read_json_bytes(request, max_bytes)
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise UnprocessableContent(f"{where}: {first['msg']}") from None


def known_session_id(request: Request, sandbox: Sandbox) -> str:
    session_id = request.path_params["session_id"]
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise BadRequest("The session id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.")
    if session_id not in sandbox.session_ids:
        raise NotFound("The sandbox knows no such session.")
    return session_id
