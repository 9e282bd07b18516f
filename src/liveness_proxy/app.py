"""`create_app(settings)`: the proxy as an ASGI application. Nothing is global: two apps built side
by side share no state.

Before the service runs, only the routes that need nothing of it answer (health, the OpenAPI
document, the JS client, metrics); the others answer 503 "starting". Entering the lifespan (or
`running()`, for a host that mounts the app) builds the service (`wiring`), builds the handlers
with it as constructor arguments, and puts them in the router; leaving it takes them out again and
closes the service.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, TextIO

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from liveness_proxy.api.admin import AdminHandlers
from liveness_proxy.api.fast_routes import FastRoutes
from liveness_proxy.api.handlers import LivenessHandlers
from liveness_proxy.api.openapi import build_openapi
from liveness_proxy.api.operational import (
    CLIENT_FILES,
    client_file_handler,
    document_handler,
    health,
    readiness_handler,
)
from liveness_proxy.api.responses import problem_response
from liveness_proxy.api.routes import ROUTES, Handler, starlette_routes
from liveness_proxy.auth import HostAuthentication, HostAuthenticator
from liveness_proxy.browser import CorsMiddleware, SecurityHeaders
from liveness_proxy.errors import BadRequest, MethodNotAllowed, NotFound, ProblemError, ServiceUnavailable
from liveness_proxy.metrics import ProxyMetrics, metrics_endpoint
from liveness_proxy.middleware import RequestContextMiddleware, request_id_of
from liveness_proxy.observability import AccessLog, Redactor, build_logger
from liveness_proxy.settings import Settings
from liveness_proxy.tracing import ServerSpans, Tracing
from liveness_proxy.wiring import Service, app_options, request_policy, running_service, tracing_options

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

# Probes and scrapes every few seconds would drown the spans that matter: not traced.
UNTRACED_OPERATIONS = frozenset({"health", "readiness", "metrics"})
# Routes that may be absent: `/metrics` when LIVENESS_PROXY_METRICS_ENABLED is false.
OPTIONAL_OPERATIONS = frozenset({"metrics"})
# The operations that need the running service; before it runs, each answers 503 "starting".
SERVICE_OPERATIONS = (
    "getLivenessResult",
    "getSessionToken",
    "createSession",
    "getSessionRecord",
    "listSessions",
    "eraseSession",
    "eraseSubject",
    "readiness",
)


async def starting(_request: Request) -> Response:
    raise ServiceUnavailable("The service is starting.", retry_after_seconds=1)


def problem_for_http_exception(exc: HTTPException) -> ProblemError:
    """The router's own refusals (no such route, wrong method) as problems."""
    error: ProblemError
    if exc.status_code == 404:
        error = NotFound("No such route.")
    elif exc.status_code == 405:
        error = MethodNotAllowed("This method is not allowed on this route.")
        error.headers.update(exc.headers or {})
    else:
        error = BadRequest("The request could not be processed.")
    return error


class RoutingErrors:
    """Answers the router's HTTPException (404, 405) as problem+json; innermost, around the router."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except HTTPException as exc:
            response = problem_response(problem_for_http_exception(exc), request_id_of(scope))
            await response(scope, receive, send)


class ProxyApplication(Starlette):
    """Starlette with only our middleware around the router. Starlette's default outer
    ServerErrorMiddleware and inner ExceptionMiddleware each wrap every request and its `send`;
    RequestContextMiddleware already turns any unhandled exception into a 500 problem, and
    `Endpoint`/`RoutingErrors` render every other error, so both would be pure overhead."""

    _running = False
    _service: Service | None = None
    # Every operation's handler (`use_handlers`), and the liveness operations' dispatch in front of
    # the router, built with the middleware stack on the first request.
    _handlers: Mapping[str, Handler] = {}
    _fast_routes: FastRoutes | None = None

    def use_handlers(self, handlers: Mapping[str, Handler]) -> None:
        """Routes every operation to its handler: the router's routes and the fast dispatch's."""
        self.router.routes[:] = starlette_routes(ROUTES, handlers, optional=OPTIONAL_OPERATIONS)
        self._handlers = handlers
        if self._fast_routes is not None:
            self._fast_routes.use(handlers)

    def build_middleware_stack(self) -> ASGIApp:
        self._fast_routes = FastRoutes(RoutingErrors(self.router), self._handlers)
        app: ASGIApp = self._fast_routes
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app

    @property
    def service(self) -> Service:
        """The running service (for operators' tools and tests); RuntimeError when not running."""
        if self._service is None:
            raise RuntimeError("this liveness-proxy app is not running")
        return self._service

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """Starts the proxy's service (database, upstream pools, token cache, audit writer) and stops
        it on exit. For a host that mounts the proxy: Starlette's `Mount` does not run a mounted
        app's lifespan, so the host enters this in its own (`async with proxy.running(): yield`).
        Entered twice at once it refuses: a second service would replace the first under its requests."""
        if self._running:
            raise RuntimeError("this liveness-proxy app is already running")
        self._running = True
        try:
            async with self.router.lifespan_context(self):
                yield self.service
        finally:
            self._running = False


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    shared_clock: Callable[[], float] | None = None,
    log_stream: TextIO | None = None,
    migrate: bool = False,
    authenticate_caller: HostAuthentication | None = None,
    span_exporter: SpanExporter | None = None,
) -> ProxyApplication:
    """The proxy app. `clock` (monotonic) drives token and cache expiry; `wall_clock` stamps audit
    records; `shared_clock` (the wall clock unless given) dates the token shared with other
    processes, so a test can move it with its manual clock; `log_stream` receives the JSON log lines
    (stderr by default); `migrate` applies database migrations at start-up (the `serve` command does
    it once before starting workers instead).

    `authenticate_caller` (library mode) is the host application's own authentication: an async
    function of the request that returns the `Caller` (subject, scopes, credential id for the audit
    log), or None to let the proxy's API keys and JWTs decide; it may raise `Unauthenticated` or
    `Forbidden` to refuse. See `liveness_proxy.auth.host`.

    `span_exporter` turns tracing on with this exporter instead of the `OTEL_*` configured ones (a
    test's in-memory exporter, or a host's own); the `OTEL_TRACES_SAMPLER` settings still apply.

    What only a server process needs (GC tuning, SIGHUP) is `liveness_proxy.serving`'s, not this
    factory's: an app embedded in a host leaves the host's process alone."""
    options = app_options(settings)
    policy = request_policy(settings)
    host_authentication = None if authenticate_caller is None else HostAuthenticator(authenticate_caller)
    redactor = Redactor(options.secrets)
    logger = build_logger(
        level=options.log_level, log_format=options.log_format, redactor=redactor, stream=log_stream
    )
    metrics = ProxyMetrics()
    tracing = Tracing(tracing_options(settings), exporter=span_exporter)
    always: dict[str, Handler] = {
        "health": health,
        "openapi": document_handler(
            orjson.dumps(
                build_openapi(
                    extra_body_fields=policy.extra_body_fields,
                    extra_response_fields=policy.extra_response_fields,
                )
            )
        ),
        **{operation: client_file_handler(*file) for operation, file in CLIENT_FILES.items()},
    }
    if options.metrics_enabled:
        always["metrics"] = metrics_endpoint(
            metrics, token=options.metrics_token, allowed_networks=options.metrics_allowed_networks
        )
    starting_handlers = {**always, **dict.fromkeys(SERVICE_OPERATIONS, starting)}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        tracing.start()
        try:
            async with _running(tracing):
                yield
        finally:
            # Stopped last: the spans of the service's own shutdown (a last webhook) are exported.
            await tracing.stop()

    @contextlib.asynccontextmanager
    async def _running(tracing: Tracing) -> AsyncIterator[None]:
        async with running_service(
            settings,
            logger=logger,
            redactor=redactor,
            metrics=metrics,
            clock=clock,
            wall_clock=wall_clock,
            shared_clock=shared_clock or wall_clock,
            migrate=migrate,
            tracing=tracing,
        ) as service:
            liveness = LivenessHandlers(service, policy, host_authentication=host_authentication)
            admin = AdminHandlers(service, policy, authenticate=liveness.authenticate)
            handlers: dict[str, Handler] = {
                **always,
                "getLivenessResult": liveness.result,
                "getSessionToken": liveness.session_token,
                "createSession": liveness.create_session,
                "getSessionRecord": admin.session_record,
                "listSessions": admin.list_sessions,
                "eraseSession": admin.erase_session,
                "eraseSubject": admin.erase_subject,
                "readiness": readiness_handler(service),
            }
            proxy.use_handlers(handlers)
            proxy._service = service
            try:
                logger.info(
                    "started",
                    upstream=options.upstream_base_url,
                    token_url=options.token_url,
                    # Which trust the upstream's certificate is checked against, and whether we present one.
                    upstream_ca=options.upstream_ca,
                    upstream_client_certificate=options.upstream_client_certificate,
                    client_secret_reloadable=service.client_secret.reloadable,
                    final_result_store=options.final_result_store,
                    tracing=tracing.describe(),
                )
                yield
            finally:
                proxy.use_handlers(starting_handlers)
                proxy._service = None
        logger.info("stopped")

    proxy = ProxyApplication(
        middleware=[
            # One layer for the request id, security headers (on every answer, the last-resort 500
            # too), request metrics and the access log: see RequestContextMiddleware.
            Middleware(
                RequestContextMiddleware,
                logger=logger,
                access_log=AccessLog(
                    level=options.log_level,
                    log_format=options.log_format,
                    redactor=redactor,
                    fallback=logger,
                    stream=log_stream,
                ),
                response_headers=SecurityHeaders(hsts_max_age_seconds=options.hsts_max_age_seconds).add_to,
                observe=metrics.observe_request,
                server_spans=ServerSpans(
                    tracing,
                    untraced_paths=frozenset(
                        spec.path for spec in ROUTES if spec.operation_id in UNTRACED_OPERATIONS
                    ),
                ),
            ),
            # Only when origins are configured: without any, CORS would pass every request through,
            # one more layer each request's send and every resumption must cross.
            *([Middleware(CorsMiddleware, origins=options.cors_origins)] if options.cors_origins else []),
        ],
        lifespan=lifespan,
    )
    proxy.use_handlers(starting_handlers)
    # No redirects: Starlette would answer `/v1/liveness/sessions/` with a 307 to the client's own
    # Host, before authentication and unaudited, and `/metrics/` would give away a hidden `/metrics`.
    # A trailing slash is an unknown path, a 404 like any other.
    proxy.router.redirect_slashes = False
    return proxy
