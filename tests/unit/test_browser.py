"""Browser callers, in-process: HSTS only over TLS, and the app's own cache policy kept."""

from __future__ import annotations

import io

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from liveness_proxy.browser import SecurityHeaders
from liveness_proxy.middleware import RequestContextMiddleware
from liveness_proxy.observability import Redactor, build_logger


async def test_hsts_only_over_tls_and_app_cache_policy_is_kept() -> None:
    async def cached(_request: Request) -> Response:
        return PlainTextResponse("x", headers={"Cache-Control": "public, max-age=60"})

    async def boom(_request: Request) -> Response:
        raise RuntimeError("bug")

    # The headers as the proxy's app adds them: in RequestContextMiddleware's one `send` wrapper.
    logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=io.StringIO())
    headers = SecurityHeaders(hsts_max_age_seconds=600)
    app = Starlette(
        routes=[Route("/cached", cached), Route("/boom", boom)],
        middleware=[Middleware(RequestContextMiddleware, logger=logger, response_headers=headers.add_to)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://proxy.test") as tls:
        over_tls = await tls.get("/cached")
        error = await tls.get("/boom")
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as plain:
        over_http = await plain.get("/cached")
    assert over_tls.headers["strict-transport-security"] == "max-age=600; includeSubDomains"
    assert "strict-transport-security" not in over_http.headers
    assert over_tls.headers["cache-control"] == "public, max-age=60"
    assert error.status_code == 500
    assert error.headers["x-content-type-options"] == "nosniff"
