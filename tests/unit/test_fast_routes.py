"""FastRoutes: the liveness operations dispatched without Starlette's router, exactly where the
router would have sent them; everything else still goes to the router."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from liveness_proxy.api.fast_routes import FAST_OPERATIONS, FastRoutes, route_path
from liveness_proxy.api.routes import ROUTES
from liveness_proxy.errors import NotFound


class Router:
    """Stands for Starlette's router: records what reached it."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append((scope["method"], scope["path"]))
        await Response(b"router", 299)(scope, receive, send)


def handlers(seen: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    def handler(operation: str) -> Any:
        async def handle(request: Request) -> Response:
            seen.append((operation, dict(request.path_params)))
            if request.path_params.get("session_id") == "missing":
                raise NotFound("No such liveness session.")
            return Response(operation.encode())

        return handle

    return {operation: handler(operation) for operation in FAST_OPERATIONS}


async def call(app: FastRoutes, method: str, path: str, root_path: str = "") -> tuple[int, bytes, Scope]:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "headers": [],
        "query_string": b"",
        "state": {"request_id": "r" * 32},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"], scope


@pytest.mark.parametrize("root_path", ["", "/liveness"])
async def test_the_liveness_operations_reach_their_handlers_with_the_routers_scope(root_path: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    router = Router()
    app = FastRoutes(router, handlers(seen))
    templates = {spec.operation_id: spec.path for spec in ROUTES}

    status, body, scope = await call(app, "GET", "/v1/liveness/sessions/abc-1_2/result", root_path)
    assert (status, body) == (200, b"getLivenessResult")
    assert scope["route"].path == templates["getLivenessResult"]  # what the metrics and the log read
    assert scope["path_params"] == {"session_id": "abc-1_2"}
    for path, operation in (
        ("/v1/liveness/session-token", "getSessionToken"),
        ("/v1/liveness/sessions", "createSession"),
    ):
        status, body, scope = await call(app, "POST", path, root_path)
        assert (status, body) == (200, operation.encode())
        assert scope["route"].path == templates[operation]
    assert router.paths == []
    assert [operation for operation, _ in seen] == list(FAST_OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/liveness/sessions//result"),  # Starlette's {session_id} needs a character
        ("GET", "/v1/liveness/sessions/result"),
        ("GET", "/v1/liveness/sessions/a/b/result"),
        ("GET", "/v1/liveness/sessions/abc/result/"),  # no redirects, a 404 from the router
        ("GET", "/v1/liveness/sessions/abc"),
        ("HEAD", "/v1/liveness/sessions/abc/result"),
        ("POST", "/v1/liveness/sessions/abc/result"),  # the router's 405 names the allowed methods
        ("GET", "/v1/liveness/sessions"),
        ("PUT", "/v1/liveness/sessions"),
        ("POST", "/v1/liveness/session-token/"),
        ("GET", "/healthz"),
    ],
)
async def test_everything_else_goes_to_the_router(method: str, path: str) -> None:
    router = Router()
    app = FastRoutes(router, handlers([]))
    status, body, _ = await call(app, method, path)
    assert (status, body) == (299, b"router")
    assert router.paths == [(method, path)]


async def test_a_problem_is_answered_as_the_router_would() -> None:
    app = FastRoutes(Router(), handlers([]))
    status, body, _ = await call(app, "GET", "/v1/liveness/sessions/missing/result")
    assert status == 404
    assert b"No such liveness session." in body


async def test_use_swaps_the_handlers() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    app = FastRoutes(Router(), handlers([]))
    app.use(handlers(seen))
    await call(app, "POST", "/v1/liveness/sessions")
    assert seen == [("createSession", {})]


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/v1/x", "", "/v1/x"),
        ("/p/v1/x", "/p", "/v1/x"),
        ("/p", "/p", ""),
        ("/px/v1", "/p", "/px/v1"),
        ("/other", "/p", "/other"),
    ],
)
def test_route_path_is_starlettes(path: str, root_path: str, expected: str) -> None:
    from starlette._utils import get_route_path

    scope = {"path": path, "root_path": root_path}
    assert route_path(scope) == get_route_path(scope) == expected
