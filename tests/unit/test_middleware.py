"""The last-resort error path: a bug becomes a 500 problem with a request id and nothing else."""

from __future__ import annotations

import io
import itertools
import json

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from liveness_proxy.browser import SecurityHeaders
from liveness_proxy.middleware import RequestContextMiddleware, RequestIds
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


async def test_one_layer_adds_security_headers_and_observes_every_answer_the_500_too() -> None:
    observed: list[tuple[str, str, int]] = []
    logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=io.StringIO())

    async def fine(_request: Request) -> Response:
        return Response("ok", headers={"X-Request-ID": "spoofed-by-the-app"})

    app = Starlette(
        routes=[Route("/boom", _broken), Route("/fine", fine)],
        middleware=[
            Middleware(
                RequestContextMiddleware,
                logger=logger,
                response_headers=SecurityHeaders(hsts_max_age_seconds=600).add_to,
                observe=lambda route, method, status, _seconds, _trace_id=None: observed.append(
                    (route, method, status)
                ),
            )
        ],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        broken = await client.get("/boom", headers={"X-Request-ID": "req-1"})
        fine_answer = await client.get("/fine", headers={"X-Request-ID": "req-2"})
    for response, request_id in ((broken, "req-1"), (fine_answer, "req-2")):
        assert response.headers.get_list("x-request-id") == [request_id]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["strict-transport-security"] == "max-age=600; includeSubDomains"
    assert broken.status_code == 500
    assert observed == [("/boom", "GET", 500), ("/fine", "GET", 200)]


def test_request_ids_are_unique_and_unpredictable() -> None:
    ids = RequestIds()
    drawn = [ids.next() for _ in range(2000)]  # crosses several refills of the random pool
    assert len(set(drawn)) == len(drawn)
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in drawn)
    # No shared prefix or counter: consecutive ids agree on about 2 of 32 hex digits by chance.
    same = sum(
        a == b for first, second in itertools.pairwise(drawn) for a, b in zip(first, second, strict=True)
    )
    assert same / (len(drawn) - 1) < 6
