"""The route table: every route of the proxy, once. The Starlette routes and the OpenAPI paths are
both built from it, so a route cannot exist without its documentation or the other way round."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from liveness_proxy.api.paths import (
    SESSION_RECORD_PATH,
    SESSION_RESULT_PATH,
    SESSION_TOKEN_PATH,
    SESSIONS_PATH,
    SUBJECT_ERASURE_PATH,
)
from liveness_proxy.api.responses import problem_response
from liveness_proxy.errors import ProblemError
from liveness_proxy.middleware import request_id_of

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    path: str
    method: str
    operation_id: str  # names the handler and the OpenAPI operation


# The router tries routes in order: the most frequent call (result polling) first.
ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(SESSION_RESULT_PATH, "GET", "getLivenessResult"),
    RouteSpec(SESSION_TOKEN_PATH, "POST", "getSessionToken"),
    RouteSpec(SESSIONS_PATH, "POST", "createSession"),
    RouteSpec(SESSION_RECORD_PATH, "GET", "getSessionRecord"),
    RouteSpec(SESSIONS_PATH, "GET", "listSessions"),
    RouteSpec(SESSION_RECORD_PATH, "DELETE", "eraseSession"),
    RouteSpec(SUBJECT_ERASURE_PATH, "POST", "eraseSubject"),
    RouteSpec("/healthz", "GET", "health"),
    RouteSpec("/readyz", "GET", "readiness"),
    RouteSpec("/metrics", "GET", "metrics"),
    RouteSpec("/openapi.json", "GET", "openapi"),
    RouteSpec("/client/liveness-proxy-client.js", "GET", "jsClient"),
    RouteSpec("/client/liveness-proxy-client.d.ts", "GET", "jsClientTypes"),
)


class Endpoint:
    """A route handler as a plain ASGI app. Starlette's `request_response` wrapper would add, on every
    request, an exception-handler lookup and one more `send` wrapper; here a ProblemError simply
    becomes its problem+json answer."""

    __slots__ = ("_handler",)

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self._handler(request)
        except ProblemError as error:
            response = problem_response(error, request_id_of(scope))
        await response(scope, receive, send)


class MethodDispatch:
    """The endpoints of one path that serves several methods (GET lists sessions, POST creates one;
    GET reads a session's record, DELETE erases it), as one route: the router then answers any
    other method with a 405 whose Allow header names every method of the path, not only those of
    the first route it tried."""

    __slots__ = ("_endpoints",)

    def __init__(self, endpoints: Mapping[str, Endpoint]) -> None:
        self._endpoints = dict(endpoints)
        if "GET" in self._endpoints:
            self._endpoints.setdefault("HEAD", self._endpoints["GET"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The route admits only its own methods: the lookup cannot miss.
        await self._endpoints[scope["method"]](scope, receive, send)


def starlette_routes(
    routes: Sequence[RouteSpec], handlers: Mapping[str, Handler], *, optional: frozenset[str] = frozenset()
) -> list[Route]:
    """The routes, in table order (a path with several methods where its first one is), each with
    its handler. Only an `optional` route may lack one (`/metrics` when it is disabled): it is then
    answered like any unknown path. A handler for no route, or a route without a handler, is a bug,
    refused when the app is built."""
    operations = {route.operation_id for route in routes}
    unknown = set(handlers) - operations
    if unknown:
        raise ValueError(f"handlers for operations not in the route table: {sorted(unknown)}")
    unhandled = operations - set(handlers) - optional
    if unhandled:
        raise ValueError(f"routes without a handler: {sorted(unhandled)}")
    by_path: dict[str, dict[str, Endpoint]] = {}
    for route in routes:
        if route.operation_id in handlers:
            by_path.setdefault(route.path, {})[route.method] = Endpoint(handlers[route.operation_id])
    built = []
    for path, endpoints in by_path.items():
        if len(endpoints) == 1:
            [(method, endpoint)] = endpoints.items()
            built.append(Route(path, endpoint, methods=[method]))
        else:
            built.append(Route(path, MethodDispatch(endpoints), methods=list(endpoints)))
    return built
