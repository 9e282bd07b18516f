"""The answers handlers send: JSON, and the one builder of problem+json responses.

Handlers, the router's refusals, readiness and CORS all answer errors through `problem_response`;
the pure-ASGI middleware and the server protocol, which have no Response object, use the same head
(`errors.problem_head`) and body (`errors.render_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from liveness_proxy.errors import ProblemError, problem_head, render_problem


class RawHeadersResponse(Response):
    """A Response whose headers are given as the raw list (no dict, no re-encoding)."""

    def __init__(self, body: bytes, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]


def problem_response(
    error: ProblemError, request_id: str, extensions: Mapping[str, object] | None = None
) -> Response:
    return RawHeadersResponse(
        render_problem(error, request_id, extensions),
        error.response_status(),
        problem_head(error, request_id),
    )


# What Starlette's Response(media_type="application/json") with `Cache-Control: no-store` would
# send, encoded once.
_JSON_HEAD = ((b"cache-control", b"no-store"), (b"content-type", b"application/json"))


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer, never cached. `headers` adds fields (e.g. `Location`) or replaces one of the
    same name (`Cache-Control`, `Content-Type`), as in Starlette's Response."""
    if not headers:
        return RawHeadersResponse(body, status, list(_JSON_HEAD))
    fields = dict(_JSON_HEAD)
    for name, value in headers.items():
        fields[name.lower().encode("latin-1")] = value.encode("latin-1")
    return RawHeadersResponse(body, status, list(fields.items()))
