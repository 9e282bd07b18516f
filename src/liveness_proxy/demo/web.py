"""The demo page's host application: the proxy mounted in library mode, plus what only a demo has.

`liveness-proxy demo` serves this on one origin:

- `/demo/` — the page (static files in `demo/static/`), which drives the proxy with the same JS
  client integrators use (`/client/liveness-proxy-client.js`);
- `/demo/api/...` — a demo identity provider that signs short-lived ES256 JWTs for the demo user
  (the proxy verifies them like any IdP's, so the real JWT path runs), and buttons for what a
  person, a camera or an outage would do, forwarded to the sandbox's control API;
- `/demo/webhooks` — the customer's backend: the proxy's webhook URL in the demo. It verifies each
  delivery's signature and keeps the verified events, which the page lists from
  `/demo/api/webhooks` (see `demo/webhooks.py`);
- everything else — the proxy itself, unchanged.

None of this exists outside `liveness-proxy demo`: the sandbox control API it forwards to is only
there when the sandbox runs with `control_enabled`.

The demo identity provider is in `demo/identity.py`, the webhook receiver in `demo/webhooks.py`,
the request and answer helpers of the demo's routes in `demo/handling.py`, what the page shows of
the sandbox in `demo/sandbox_view.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from liveness_proxy.app import ProxyApplication, problem_for_http_exception
from liveness_proxy.demo.handling import (
    DemoHeaders,
    Handler,
    answers_problems,
    json_response,
    known_session_id,
    problem_response,
    read_body,
    read_json_bytes,
)
from liveness_proxy.demo.identity import DemoIdentityProvider
from liveness_proxy.demo.sandbox_view import describe_upstream_call, secrets_to_look_for
from liveness_proxy.demo.webhooks import WebhookInbox, WebhookRefused, WebhookVerifier
from liveness_proxy.errors import BadRequest, NotFound, ProblemError, ServiceUnavailable
from liveness_proxy.http import Http1Transport, HttpError, Url
from liveness_proxy.sandbox import Sandbox
from liveness_proxy.sandbox.local_only import LOOPBACK_HOSTS
from liveness_proxy.webhook_signing import SECRET_PREFIX

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
# A verdict event is well under 1 KiB; anything far larger is not the proxy's.
MAX_WEBHOOK_BYTES = 64 * 1024
WEBHOOK_PATH = "/demo/webhooks"
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
}


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


def create_demo_app(
    *,
    proxy: ProxyApplication,
    sandbox: Sandbox,
    sandbox_url: str,
    identity: DemoIdentityProvider,
    client_secret: str,
    capture_delay_seconds: float = DEFAULT_CAPTURE_DELAY_SECONDS,
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
    webhook_secret: str | None = None,
    webhook_url: str | None = None,
) -> Starlette:
    """The demo host app around `proxy`. `client_secret` is what the leak check looks for;
    `allowed_hosts` the Host names the demo's own routes answer under (None: any). With
    `webhook_secret` (the proxy's LIVENESS_PROXY_WEBHOOK_SECRET), `/demo/webhooks` receives the
    proxy's webhooks (`webhook_url` is how the proxy was told to reach it, shown on the page);
    without, it answers 404."""
    state = DemoState()
    verifier = WebhookVerifier(webhook_secret) if webhook_secret else None
    inbox = WebhookInbox()
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
        return json_response(
            {
                "subject": identity.subject,
                "sandbox_url": sandbox_url,
                "token_lifetime_seconds": identity.lifetime_seconds,
                "capture_delay_seconds": capture_delay_seconds,
                "upstream_outage": state.outage,
                "webhook_url": webhook_url if verifier is not None else None,
            }
        )

    async def sign_in(request: Request) -> Response:
        await read_body(request, EmptyBody)
        return json_response(
            {
                "access_token": identity.issue(),
                "token_type": OAUTH_BEARER,
                "expires_in": identity.lifetime_seconds,
                "subject": identity.subject,
            }
        )

    async def capture(request: Request) -> Response:
        session_id = known_session_id(request, sandbox)
        body = await read_body(request, CaptureBody)
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
        return json_response(
            {"session_id": session_id, "outcome": body.outcome, "completes_in_seconds": body.delay_seconds},
            status=202,
        )

    async def expire(request: Request) -> Response:
        session_id = known_session_id(request, sandbox)
        await read_body(request, EmptyBody)
        # The session ends now: a capture still on its way would otherwise finish it afterwards.
        pending = state.pending_captures.pop(session_id, None)
        if pending is not None:
            pending.cancel()
        await control("POST", f"/sessions/{session_id}/expire")
        return json_response({"session_id": session_id, "status": "EXPIRED"})

    async def outage(request: Request) -> Response:
        body = await read_body(request, OutageBody)
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
        return json_response({"enabled": state.outage})

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
        return json_response({"calls": calls, "next": after + len(log)})

    async def receive_webhook(request: Request) -> Response:
        """The customer's backend: verify, then keep. Anyone who reaches the demo can POST here, so
        nothing unverified is kept (a 400 with the reason, counted as refused)."""
        if verifier is None:
            raise NotFound("This demo runs without webhooks.")
        body = await read_json_bytes(request, MAX_WEBHOOK_BYTES)
        try:
            delivery = verifier.verify(request.headers, body)
            received = inbox.accept(delivery, body, received_at=time.time())
        except WebhookRefused as exc:
            inbox.count_refused()
            logger.warning("demo backend refused a webhook: %s", exc.detail)
            raise
        if received is None:
            logger.info(
                "demo backend received webhook %s again: acknowledged, not listed", delivery.webhook_id
            )
        else:
            logger.info(
                "demo backend received %s for session %s (signature verified)",
                received.type,
                received.session_id,
            )
        # Any 2xx is a delivery; a duplicate is acknowledged too, or the proxy would retry it.
        return Response(status_code=204)

    async def received_webhooks(request: Request) -> Response:
        try:
            after = max(0, int(request.query_params.get("after", "0")))
        except ValueError:
            raise BadRequest("'after' must be a whole number.") from None
        events, latest = inbox.since(after)
        return json_response(
            {
                "enabled": verifier is not None,
                "run": inbox.run_id,
                "events": [event.as_json() for event in events],
                "next": latest,
                "refused": inbox.refused,
                "duplicates": inbox.duplicates,
            }
        )

    async def leak_check(request: Request) -> Response:
        body = await read_body(request, LeakCheckBody, max_bytes=MAX_LEAK_CHECK_BYTES)
        received = "\n".join(body.received)
        groups = secrets_to_look_for(sandbox, {client_secret, sandbox.config.client_secret})
        if webhook_secret:
            # Each secret's key part, with or without its `whsec_` prefix: none may reach a browser.
            keys = [part.removeprefix(SECRET_PREFIX) for part in webhook_secret.split()]
            groups.append(("the webhook signing secret", keys))
        found = [label for label, values in groups if any(value in received for value in values)]
        return json_response(
            {
                "checked_bytes": len(received.encode()),
                "checked_items": len(body.received),
                "looked_for": [label for label, _ in groups],
                "found": found,
            }
        )

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, answers_problems(handler), methods=[method])

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
        route("/demo/api/webhooks", received_webhooks, "GET"),
        route(WEBHOOK_PATH, receive_webhook, "POST"),
        # Everything else is the proxy, exactly as `serve` runs it.
        Mount("/", app=proxy),
    ]

    async def refuse(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # only registered for HTTPException
            raise exc
        return problem_response(problem_for_http_exception(exc), request)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: refuse})
    # No redirects to the client's own Host (the proxy's router has none either). The catch-all
    # mount answers every path today; this keeps it so if a route is ever added after it.
    app.router.redirect_slashes = False
    app.add_middleware(DemoHeaders, allowed_hosts=allowed_hosts)
    return app
