"""The last-resort error path: a bug becomes a 500 problem with a request id and nothing else."""

from __future__ import annotations

import io
import json

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liveness_proxy.middleware import RequestContextMiddleware
from liveness_proxy.observability import Redactor, build_logger


async def _broken(_request: Request) -> Response:
    raise RuntimeError("internal detail: db password is hunter2-secret")


async def test_unhandled_exception_becomes_a_bare_500_problem() -> None:
    stream = io.StringIO()
    logger = build_logger(
        level="info", log_format="json", redactor=Redactor(["hunter2-secret"]), stream=stream
    )
    app = Starlette(
        routes=[Route("/boom", _broken)], middleware=[Middleware(RequestContextMiddleware, logger=logger)]
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "req-500"
    body = response.json()
    assert body["request_id"] == "req-500"
    assert body["type"] == "urn:liveness-proxy:problem:internal-error"
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["unhandled_error", "request"]
    assert lines[1]["status"] == 500
    assert "hunter2-secret" not in stream.getvalue()  # the traceback was redacted too
