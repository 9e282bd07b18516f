"""`create_app(settings)`: the proxy as an ASGI application. Nothing is global: two apps built side
by side share no state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from liveness_proxy.auth import HostAuthentication, HostAuthenticator
from liveness_proxy.browser import CorsMiddleware, SecurityHeaders
from liveness_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    ProblemError,
    render_problem,
)
from liveness_proxy.metrics import ProxyMetrics, metrics_endpoint
from liveness_proxy.middleware import RequestContextMiddleware, request_id_of
from liveness_proxy.observability import AccessLog, Redactor, build_logger
from liveness_proxy.openapi import build_openapi
from liveness_proxy.routes import LivenessApi
from liveness_proxy.runtime import Runtime, start_runtime
from liveness_proxy.settings import Settings


def problem_response(error: ProblemError, request_id: str) -> Response:
    headers = {"Cache-Control": "no-store", **error.headers}
    return Response(
        render_problem(error, request_id),
        status_code=error.response_status(),
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


# Allocations between collections of the youngest generation when serving (CPython's default: 700).
YOUNG_GENERATION_THRESHOLD = 10_000


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


class Endpoint:
    """A route handler as a plain ASGI app. Starlette's `request_response` wrapper would add, on every
    request, an exception-handler lookup and one more `send` wrapper; here a ProblemError simply
    becomes its problem+json answer."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self._handler(request)
        except ProblemError as error:
            response = problem_response(error, request_id_of(scope))
        await response(scope, receive, send)


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

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = RoutingErrors(self.router)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Starts the proxy's runtime (database, upstream pools, token cache, audit writer) and stops
        it on exit. For a host that mounts the proxy: Starlette's `Mount` does not run a mounted
        app's lifespan, so the host enters this in its own (`async with proxy.running(): yield`).
        Entered twice at once it refuses: a second runtime would replace the first under its requests."""
        if self._running:
            raise RuntimeError("this liveness-proxy app is already running")
        self._running = True
        try:
            async with self.router.lifespan_context(self):
                yield
        finally:
            self._running = False


# The JS client is served from the package (one copy: the file in the repo is the file served).
CLIENT_FILES = {
    "liveness-proxy-client.js": "text/javascript; charset=utf-8",
    "liveness-proxy-client.d.ts": "application/typescript; charset=utf-8",
}
CLIENT_CACHE_CONTROL = "public, max-age=300"


def client_file_endpoint(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    """Serves one file of the JS client, read once; revalidated by its ETag."""
    body = resources.files("liveness_proxy").joinpath("static", "client", name).read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    async def serve(request: Request) -> Response:
        headers = {"Cache-Control": CLIENT_CACHE_CONTROL, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return serve


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    shared_clock: Callable[[], float] | None = None,
    log_stream: TextIO | None = None,
    migrate: bool = False,
    tune_gc_for_serving: bool = False,
    reload_secrets_on_sighup: bool = False,
    authenticate_caller: HostAuthentication | None = None,
) -> ProxyApplication:
    """The proxy app. `clock` (monotonic) drives token and cache expiry; `wall_clock` stamps audit
    records; `shared_clock` (the wall clock unless given) dates the token shared with other
    processes, so a test can move it with its manual clock; `log_stream` receives the JSON log lines
    (stderr by default); `migrate` applies database migrations at start-up (the `serve` command does
    it once before starting workers instead).

    `tune_gc_for_serving` (what `serve` does; not for an app embedded in a host that owns the
    process) moves everything alive once the runtime has started (modules, settings, pools) out of
    the garbage collector's scans, and collects the youngest generation every 10,000 allocations
    instead of 700: with 1000 requests in flight every collection walked their live objects, ~20% of
    the CPU per request (docs/performance.md, S3).

    `reload_secrets_on_sighup` (what `serve` does; it needs the main thread, and a host that embeds
    the app owns its signals) re-reads CYNOPSIS_CLIENT_SECRET_FILE on SIGHUP while the app runs,
    and nothing else: the cached access token keeps serving until it is due.

    `authenticate_caller` (library mode) is the host application's own authentication: an async
    function of the request that returns the `Caller` (subject, scopes, credential id for the audit
    log), or None to let the proxy's API keys and JWTs decide; it may raise `Unauthenticated` or
    `Forbidden` to refuse. See `liveness_proxy.auth.host`."""
    redactor = Redactor(
        [
            settings.cynopsis_client_secret.get_secret_value(),
            settings.liveness_proxy_api_key_pepper.get_secret_value(),
            settings.liveness_proxy_metrics_token.get_secret_value(),
            urlsplit(settings.liveness_proxy_database_url.get_secret_value()).password or "",
            urlsplit(settings.redis_url).password or "",
            settings.liveness_proxy_token_cache_key.get_secret_value(),
        ]
    )
    logger = build_logger(
        level=settings.liveness_proxy_log_level,
        log_format=settings.liveness_proxy_log_format,
        redactor=redactor,
        stream=log_stream,
    )
    api = LivenessApi(
        build_openapi(),
        host_authentication=None if authenticate_caller is None else HostAuthenticator(authenticate_caller),
    )
    metrics = ProxyMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        runtime = await start_runtime(
            settings,
            logger=logger,
            redactor=redactor,
            metrics=metrics,
            clock=clock,
            wall_clock=wall_clock,
            shared_clock=shared_clock or wall_clock,
            migrate=migrate,
        )
        api.runtime = runtime
        if tune_gc_for_serving:
            gc.collect()
            gc.freeze()
            _, older, oldest = gc.get_threshold()
            gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)
        loop = asyncio.get_running_loop()
        previous_sighup: Callable[[int, FrameType | None], Any] | int | None = None
        sighup_installed = False
        try:
            if reload_secrets_on_sighup:
                # Inside the try: if it cannot be installed (not the main thread), the runtime
                # that has just started is still closed.
                previous_sighup = signal.getsignal(signal.SIGHUP)
                loop.add_signal_handler(signal.SIGHUP, functools.partial(reload_on_sighup, runtime))
                sighup_installed = True
            logger.info(
                "started",
                upstream=settings.cynopsis_api_base_url,
                token_url=settings.cynopsis_token_url,
                # Which trust the upstream's certificate is checked against, and whether we present one.
                upstream_ca="CYNOPSIS_CA_BUNDLE" if settings.cynopsis_ca_bundle is not None else "system",
                upstream_client_certificate=settings.cynopsis_client_cert_file is not None,
                client_secret_reloadable=runtime.client_secret.reloadable,
            )
            yield
        finally:
            if sighup_installed:
                loop.remove_signal_handler(signal.SIGHUP)
                # asyncio leaves the default (which ends the process); what was there before returns.
                if previous_sighup is not None:
                    signal.signal(signal.SIGHUP, previous_sighup)
            api.runtime = None
            await runtime.close()
            logger.info("stopped")

    def reload_on_sighup(runtime: Runtime) -> None:
        if runtime.client_secret.reloadable:
            runtime.client_secret.reload(trigger="sighup")
        else:
            logger.info("client_secret_not_reloaded", reason="CYNOPSIS_CLIENT_SECRET is not read from a file")

    routes = [
        # The router tries routes in order: the most frequent call (result polling) first.
        Route("/v1/liveness/sessions/{session_id}/result", Endpoint(api.result), methods=["GET"]),
        Route("/v1/liveness/session-token", Endpoint(api.session_token), methods=["POST"]),
        Route("/v1/liveness/sessions", Endpoint(api.create_session), methods=["POST"]),
        Route("/v1/liveness/sessions/{session_id}", Endpoint(api.session_record), methods=["GET"]),
        Route("/healthz", Endpoint(api.health), methods=["GET"]),
        Route("/readyz", Endpoint(api.readiness), methods=["GET"]),
        Route("/openapi.json", Endpoint(api.openapi), methods=["GET"]),
        *(
            Route(f"/client/{name}", Endpoint(client_file_endpoint(name, media_type)), methods=["GET"])
            for name, media_type in CLIENT_FILES.items()
        ),
    ]
    if settings.liveness_proxy_metrics_enabled:
        serve_metrics = metrics_endpoint(
            metrics,
            token=settings.liveness_proxy_metrics_token.get_secret_value(),
            allowed_networks=settings.liveness_proxy_metrics_allowed_networks,
        )
        routes.append(Route("/metrics", Endpoint(serve_metrics), methods=["GET"]))
    app = ProxyApplication(
        routes=routes,
        middleware=[
            # One layer for the request id, security headers (on every answer, the last-resort 500
            # too), request metrics and the access log: see RequestContextMiddleware.
            Middleware(
                RequestContextMiddleware,
                logger=logger,
                access_log=AccessLog(
                    level=settings.liveness_proxy_log_level,
                    log_format=settings.liveness_proxy_log_format,
                    redactor=redactor,
                    fallback=logger,
                    stream=log_stream,
                ),
                response_headers=SecurityHeaders(
                    hsts_max_age_seconds=settings.liveness_proxy_hsts_max_age_seconds
                ).add_to,
                observe=metrics.observe_request,
            ),
            # Only when origins are configured: without any, CORS would pass every request through,
            # one more layer each request's send and every resumption must cross.
            *(
                [Middleware(CorsMiddleware, origins=settings.liveness_proxy_cors_origins)]
                if settings.liveness_proxy_cors_origins
                else []
            ),
        ],
        lifespan=lifespan,
    )
    app.state.liveness_api = api
    return app
