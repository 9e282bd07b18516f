"""The three liveness routes, dispatched without Starlette's router.

They carry nearly all of the traffic (result polling above all). Starlette's application and router
cost every request a scope update, a loop over the routes with a regular expression and a child
scope per route tried, and a method check, before our `Endpoint` runs (profiled in S1: a few
percent of a read). `FastRoutes` sits where the router would be called, recognises the three
liveness operations by plain string tests, and calls the same `Endpoint` the router would; it sets
what the router would have set that anything reads: `scope["route"]` (the template, for the metrics,
the access log and the server span) and `scope["path_params"]`. Anything else, a HEAD or a wrong
method on these paths included, goes to the router, which answers exactly as before (404, 405
with its Allow header).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from liveness_proxy.api.paths import SESSION_RESULT_PATH, SESSION_TOKEN_PATH, SESSIONS_PATH
from liveness_proxy.api.routes import ROUTES, Endpoint, Handler, RouteSpec

# The operations dispatched here, and the routes they are in the table.
FAST_OPERATIONS = ("getLivenessResult", "getSessionToken", "createSession")
_RESULT_PREFIX, _, _RESULT_SUFFIX = SESSION_RESULT_PATH.partition("{session_id}")


class FastRoutes:
    """Dispatches the liveness operations' requests straight to their endpoints; passes the rest
    to `app` (the router). The endpoints change when the service starts and stops (`use`)."""

    def __init__(self, app: ASGIApp, handlers: Mapping[str, Handler]) -> None:
        self.app = app
        self._specs = {spec.operation_id: spec for spec in ROUTES if spec.operation_id in FAST_OPERATIONS}
        self._result: tuple[RouteSpec, Endpoint] | None = None
        self._posts: dict[str, tuple[RouteSpec, Endpoint]] = {}
        self.use(handlers)

    def use(self, handlers: Mapping[str, Handler]) -> None:
        """Takes the handlers of the liveness operations from `handlers` (the same mapping the
        router's routes are built from)."""
        entries = {name: (self._specs[name], Endpoint(handlers[name])) for name in FAST_OPERATIONS}
        self._result = entries["getLivenessResult"]
        self._posts = {
            SESSION_TOKEN_PATH: entries["getSessionToken"],
            SESSIONS_PATH: entries["createSession"],
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            entry, session_id = self._match(scope)
            if entry is not None:
                spec, endpoint = entry
                scope["route"] = spec
                scope["path_params"] = {} if session_id is None else {"session_id": session_id}
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> tuple[tuple[RouteSpec, Endpoint] | None, str | None]:
        path = route_path(scope)
        method = scope["method"]
        if method == "GET":
            if path.startswith(_RESULT_PREFIX) and path.endswith(_RESULT_SUFFIX):
                # Starlette's `{session_id}` is one or more characters other than '/'.
                session_id = path[len(_RESULT_PREFIX) : len(path) - len(_RESULT_SUFFIX)]
                if session_id and "/" not in session_id:
                    return self._result, session_id
            return None, None
        if method == "POST":
            return self._posts.get(path), None
        return None, None


def route_path(scope: Scope) -> str:
    """The path below the app's root path, as Starlette's router matches it (`get_route_path`)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return ""
    return path[len(root_path) :] if path[len(root_path)] == "/" else path
