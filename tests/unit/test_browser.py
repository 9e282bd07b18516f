"""Browser callers, in-process: HSTS only over TLS, and the app's own cache policy kept."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from liveness_proxy.browser import SecurityHeadersMiddleware


async def test_hsts_only_over_tls_and_app_cache_policy_is_kept() -> None:
    async def cached(_request: Request) -> Response:
        return PlainTextResponse("x", headers={"Cache-Control": "public, max-age=60"})

    async def boom(_request: Request) -> Response:
        raise RuntimeError("bug")

    app = SecurityHeadersMiddleware(
        Starlette(routes=[Route("/cached", cached), Route("/boom", boom)]), hsts_max_age_seconds=600
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
