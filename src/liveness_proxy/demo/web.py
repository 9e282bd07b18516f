"""The demo page's host application: the proxy mounted in library mode, plus what only a demo has.

`liveness-proxy demo` serves this on one origin:

- `/demo/` — the page (static files in `demo/static/`), which drives the proxy with the same JS
  client integrators use (`/client/liveness-proxy-client.js`);
- `/demo/api/...` — a demo identity provider that signs short-lived ES256 JWTs for the demo user
  (the proxy verifies them like any IdP's, so the real JWT path runs), and buttons for what a
  person, a camera or an outage would do, forwarded to the sandbox's control API;
- everything else — the proxy itself, unchanged.

None of this exists outside `liveness-proxy demo`: the sandbox control API it forwards to is only
there when the sandbox runs with `control_enabled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, TypeVar

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.api.paths import SESSION_ID_PATTERN
from liveness_proxy.app import ProxyApplication, problem_for_http_exception
from liveness_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    ServiceUnavailable,
    UnprocessableContent,
    UnsupportedMediaType,
    render_problem,
)
from liveness_proxy.http import Http1Transport, HttpError, Url
from liveness_proxy.sandbox import Sandbox

DEMO_ISSUER = "https://demo-idp.liveness-proxy.invalid"
DEMO_AUDIENCE = "liveness-proxy-demo"
DEMO_KEY_ID = "demo-idp-1"
DEMO_TOKEN_LIFETIME_SECONDS = 600
# The OAuth2 token type of the demo IdP's JWTs.
OAUTH_BEARER = "Bearer"
DEFAULT_CAPTURE_DELAY_SECONDS = 2.0
# The page posts everything it received to the leak check; a demo session stays far below this.
MAX_LEAK_CHECK_BYTES = 4 * 1024 * 1024
# The outage switch fails this many calls per endpoint: "until switched off" for any demo.
OUTAGE_CALLS = 1_000_000
OUTAGE_ENDPOINTS = ("session_token", "liveness_session", "liveness_result")
# The sandbox control API answers with a few bytes of JSON, on loopback.
_CONTROL_ANSWER_BYTES = 64 * 1024
_CONTROL_TIMEOUT_SECONDS = 30.0
# The page is ours and same-origin: scripts, styles and calls only from here, never framed.
DEMO_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Host names the demo's own routes answer under by default.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
}


class DemoIdentityProvider:
    """Plays the customer's identity provider: an ES256 key pair made at start (the private half
    never leaves this process) and short-lived JWTs for one demo subject."""

    def __init__(
        self,
        *,
        subject: str,
        lifetime_seconds: int = DEMO_TOKEN_LIFETIME_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.subject = subject
        self.lifetime_seconds = lifetime_seconds
        self._wall_clock = wall_clock
        self._private_key = ec.generate_private_key(ec.SECP256R1())

    def public_key_pem(self) -> bytes:
        """What the proxy is configured with (LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE)."""
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def issue(self) -> str:
        now = int(self._wall_clock())
        claims = {
            "iss": DEMO_ISSUER,
            "aud": DEMO_AUDIENCE,
            "sub": self.subject,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._private_key, algorithm="ES256", headers={"kid": DEMO_KEY_ID})


class SessionNotOpen(ProblemError):
    status = 409
    slug = "conflict"
    title = "Conflict"


class EmptyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CaptureBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    outcome: Literal["live", "spoof"]
    delay_seconds: float = Field(default=DEFAULT_CAPTURE_DELAY_SECONDS, ge=0, le=30)


class OutageBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool


class LeakCheckBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    received: list[str] = Field(max_length=10_000)


@dataclass
class DemoState:
    """What the demo app holds while it runs; made by its lifespan, so nothing outlives a run."""

    http: Http1Transport | None = None
    outage: bool = False
    # At most one simulated capture per session is on its way: a second would overwrite the verdict
    # the proxy may already have recorded.
    pending_captures: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class DemoHeaders:
    """Request id and security headers for the demo's own routes (the proxy adds its own to its
    answers): the page needs a policy that lets it load its script and style, nothing more.

    It also refuses a Host it does not serve under (`allowed_hosts`; None: any): sign-in hands a JWT
    to whoever asks, so a foreign site whose name was rebound to 127.0.0.1 must not reach it. (Not
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
        if self._allowed_hosts is not None and host_name(scope) not in self._allowed_hosts:
            refused = _problem(Forbidden("The demo answers only on loopback addresses."), request_id)
            await refused(scope, receive, send)
            return

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

        await self.app(scope, receive, send_with_headers)


def host_name(scope: Scope) -> str:
    """The Host header's name, without the port (IPv6 literals keep their brackets)."""
    host = Headers(scope=scope).get("host", "").lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _problem(error: ProblemError, request_or_id: Request | str) -> Response:
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


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]
ModelT = TypeVar("ModelT", bound=BaseModel)


def _answers_problems(handler: Handler) -> Handler:
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except ProblemError as error:
            return _problem(error, request)

    return handle


async def _body(request: Request, model: type[ModelT], max_bytes: int = 64 * 1024) -> ModelT:
    # JSON only: a cross-site form or text/plain POST (no preflight) cannot press the demo's buttons.
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType("Send the body as application/json.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks) or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise UnprocessableContent(f"{where}: {first['msg']}") from None


def _session_id(request: Request, sandbox: Sandbox) -> str:
    session_id = request.path_params["session_id"]
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise BadRequest("The session id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-'.")
    if session_id not in sandbox.session_ids:
        raise NotFound("The sandbox knows no such session.")
    return session_id


def describe_upstream_call(
    method: str, path: str, headers: dict[str, str], sandbox: Sandbox
) -> dict[str, Any]:
    """One request the sandbox received, as the page shows it: which endpoint, with which
    credential, named but never shown."""
    config = sandbox.config
    authorization = headers.get("authorization", "")
    endpoint: str
    if path == config.token_path:
        endpoint = "token"
        credential = (
            "client_id + client_secret (HTTP Basic)"
            if authorization.lower().startswith("basic ")
            else "client_id + client_secret (form body)"
        )
    elif path.startswith("/_sandbox/"):
        endpoint = "sandbox_control"
        credential = "none (demo-only control API)"
    else:
        if path == config.session_token_path:
            endpoint = "session_token"
        elif path == config.session_path:
            endpoint = "liveness_session"
        elif path.startswith(config.result_path_prefix):
            endpoint = "liveness_result"
        else:
            endpoint = "other"
        credential = (
            "Bearer <Cynopsis access token>" if authorization.lower().startswith("bearer ") else "none"
        )
    return {
        "method": method,
        "path": path,
        "endpoint": endpoint,
        "credential": credential,
        "domain_id": headers.get("x-domain-id"),
        "request_id": headers.get("x-request-id"),
    }


def secrets_to_look_for(sandbox: Sandbox, client_secrets: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Every value that must never reach a browser, grouped under the label the page shows."""
    access_tokens = sorted(
        {
            header[len("bearer ") :]
            for recorded in sandbox.request_log
            if (header := recorded.headers.get("authorization", "")).lower().startswith("bearer ")
            and header[len("bearer ") :].strip()
        }
    )
    images = [image for session_id in sandbox.session_ids for image in sandbox.face_images(session_id)]
    return [
        ("the Cynopsis client secret", [value for value in client_secrets if value]),
        (f"{len(access_tokens)} Cynopsis access token(s)", access_tokens),
        (f"{len(images)} face image(s)", images),
    ]


def create_demo_app(
    *,
    proxy: ProxyApplication,
    sandbox: Sandbox,
    sandbox_url: str,
    identity: DemoIdentityProvider,
    client_secret: str,
    capture_delay_seconds: float = DEFAULT_CAPTURE_DELAY_SECONDS,
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
) -> Starlette:
    """The demo host app around `proxy`. `client_secret` is what the leak check looks for;
    `allowed_hosts` the Host names the demo's own routes answer under (None: any)."""
    state = DemoState()
    logger = logging.getLogger("liveness_proxy.demo")
    static = {
        name: resources.files("liveness_proxy.demo").joinpath("static", name).read_bytes()
        for name in STATIC_FILES
    }

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Loopback only, a handful of calls at a time: the sandbox control API.
        async with proxy.running(), Http1Transport(max_connections=8, connect_timeout_seconds=5) as http:
            state.http = http
            try:
                yield
            finally:
                for task in state.pending_captures.values():
                    task.cancel()
                await asyncio.gather(*state.pending_captures.values(), return_exceptions=True)
                state.http = None

    async def control(method: str, path: str, body: dict[str, Any] | None = None) -> None:
        """One call to the sandbox's control API, over HTTP like any other client."""
        if state.http is None:
            raise ServiceUnavailable("The demo is starting.", retry_after_seconds=1)
        answer = await state.http.request(
            method,
            Url.parse(f"{sandbox_url}/_sandbox{path}"),
            headers=[("Content-Type", "application/json")] if body is not None else [],
            # POST and DELETE only: without content, an empty body whose length is said (0).
            body=b"" if body is None else orjson.dumps(body),
            max_body_bytes=_CONTROL_ANSWER_BYTES,
            timeout_seconds=_CONTROL_TIMEOUT_SECONDS,
        )
        if answer.status == 404:
            raise NotFound("The sandbox knows no such session.")
        if answer.status >= 300:
            raise ServiceUnavailable(
                f"The sandbox control API answered HTTP {answer.status}.", retry_after_seconds=1
            )

    def static_file(name: str) -> Handler:
        async def serve(_request: Request) -> Response:
            return Response(static[name], media_type=STATIC_FILES[name])

        return serve

    async def page_redirect(_request: Request) -> Response:
        return RedirectResponse("/demo/", status_code=307)

    async def config(_request: Request) -> Response:
        return _json(
            {
                "subject": identity.subject,
                "sandbox_url": sandbox_url,
                "token_lifetime_seconds": identity.lifetime_seconds,
                "capture_delay_seconds": capture_delay_seconds,
                "upstream_outage": state.outage,
            }
        )

    async def sign_in(request: Request) -> Response:
        await _body(request, EmptyBody)
        return _json(
            {
                "access_token": identity.issue(),
                "token_type": OAUTH_BEARER,
                "expires_in": identity.lifetime_seconds,
                "subject": identity.subject,
            }
        )

    async def capture(request: Request) -> Response:
        session_id = _session_id(request, sandbox)
        body = await _body(request, CaptureBody)
        if session_id in state.pending_captures:
            raise SessionNotOpen("A capture for this session is already on its way.")
        if sandbox.session_state(session_id)["status"] != "CREATED":
            raise SessionNotOpen("This session is already finished: start a new one.")

        async def complete_later() -> None:
            # The person in front of the camera takes a moment: the page polls meanwhile.
            await asyncio.sleep(body.delay_seconds)
            try:
                await control("POST", f"/sessions/{session_id}/complete", {"outcome": body.outcome})
            except (ProblemError, HttpError) as exc:
                # Nobody awaits this task: say here why the page will wait in vain.
                logger.warning("demo capture for session %s failed: %s", session_id, exc)

        task = asyncio.create_task(complete_later())
        state.pending_captures[session_id] = task
        task.add_done_callback(lambda _task: state.pending_captures.pop(session_id, None))
        return _json(
            {"session_id": session_id, "outcome": body.outcome, "completes_in_seconds": body.delay_seconds},
            status=202,
        )

    async def expire(request: Request) -> Response:
        session_id = _session_id(request, sandbox)
        await _body(request, EmptyBody)
        # The session ends now: a capture still on its way would otherwise finish it afterwards.
        pending = state.pending_captures.pop(session_id, None)
        if pending is not None:
            pending.cancel()
        await control("POST", f"/sessions/{session_id}/expire")
        return _json({"session_id": session_id, "status": "EXPIRED"})

    async def outage(request: Request) -> Response:
        body = await _body(request, OutageBody)
        if body.enabled:
            for endpoint in OUTAGE_ENDPOINTS:
                await control(
                    "POST",
                    "/faults",
                    {"target": endpoint, "kind": "status", "status": 503, "count": OUTAGE_CALLS},
                )
        else:
            await control("DELETE", "/faults")
        state.outage = body.enabled
        return _json({"enabled": state.outage})

    async def upstream_calls(request: Request) -> Response:
        try:
            after = max(0, int(request.query_params.get("after", "0")))
        except ValueError:
            raise BadRequest("'after' must be a whole number.") from None
        log = sandbox.request_log[after:]
        calls = [
            {"index": after + offset, **describe_upstream_call(item.method, item.path, item.headers, sandbox)}
            for offset, item in enumerate(log)
        ]
        return _json({"calls": calls, "next": after + len(log)})

    async def leak_check(request: Request) -> Response:
        body = await _body(request, LeakCheckBody, max_bytes=MAX_LEAK_CHECK_BYTES)
        received = "\n".join(body.received)
        groups = secrets_to_look_for(sandbox, {client_secret, sandbox.config.client_secret})
        found = [label for label, values in groups if any(value in received for value in values)]
        return _json(
            {
                "checked_bytes": len(received.encode()),
                "checked_items": len(body.received),
                "looked_for": [label for label, _ in groups],
                "found": found,
            }
        )

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _answers_problems(handler), methods=[method])

    routes = [
        Route("/demo", page_redirect, methods=["GET"]),
        Route("/demo/", static_file("index.html"), methods=["GET"]),
        *(
            Route(f"/demo/{name}", static_file(name), methods=["GET"])
            for name in STATIC_FILES
            if name != "index.html"
        ),
        route("/demo/api/config", config, "GET"),
        route("/demo/api/sign-in", sign_in, "POST"),
        route("/demo/api/sessions/{session_id}/capture", capture, "POST"),
        route("/demo/api/sessions/{session_id}/expire", expire, "POST"),
        route("/demo/api/upstream-outage", outage, "POST"),
        route("/demo/api/upstream-calls", upstream_calls, "GET"),
        route("/demo/api/leak-check", leak_check, "POST"),
        # Everything else is the proxy, exactly as `serve` runs it.
        Mount("/", app=proxy),
    ]

    async def refuse(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # only registered for HTTPException
            raise exc
        return _problem(problem_for_http_exception(exc), request)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: refuse})
    app.add_middleware(DemoHeaders, allowed_hosts=allowed_hosts)
    return app
