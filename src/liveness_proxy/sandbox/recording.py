"""Outermost layer of the sandbox: records every HTTP request exactly as it arrived.

It also reads the request body once, capped, so that huge bodies are refused before any endpoint
sees them and so that endpoints can read the body while something else listens for a disconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.sandbox.responses import error_response

MAX_REQUEST_BODY_BYTES = 1024 * 1024
# Where the already-read body is left for the endpoints.
BODY_SCOPE_KEY = "liveness_proxy.sandbox.body"


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the sandbox received it."""

    method: str
    # The request target as sent, still percent-encoded, with the query string if there was one.
    raw_path: str
    # The decoded path the routes matched against.
    path: str
    # Lower-cased names; repeated headers are joined with ", ".
    headers: dict[str, str]
    # Body bytes received; for a refused oversized body, what had arrived when it was refused.
    body_size: int


class RequestRecorder:
    """Pure ASGI middleware: read the body, record the request, then delegate."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        record: Callable[[RecordedRequest], None],
        max_body_bytes: int = MAX_REQUEST_BODY_BYTES,
    ) -> None:
        self.app = app
        self.record = record
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = await _read_body(receive, self.max_body_bytes)
        self.record(
            RecordedRequest(
                method=scope["method"],
                raw_path=_raw_request_target(scope),
                path=scope["path"],
                headers=_header_dict(scope["headers"]),
                body_size=read.size,
            )
        )
        if read.disconnected:
            return  # nobody is left to answer
        if read.too_large:
            response = error_response(
                413, "payload_too_large", f"request bodies are limited to {self.max_body_bytes} bytes"
            )
            await response(scope, receive, send)
            return
        scope[BODY_SCOPE_KEY] = read.body
        await self.app(scope, _replaying(read.body, receive), send)


async def request_body(request: Request) -> bytes:
    """The body read by `RequestRecorder`, or read now when the app runs without it."""
    body = request.scope.get(BODY_SCOPE_KEY)
    if isinstance(body, bytes):
        return body
    return await request.body()


@dataclass(frozen=True)
class _ReadBody:
    body: bytes
    size: int
    too_large: bool = False
    disconnected: bool = False


async def _read_body(receive: Receive, limit: int) -> _ReadBody:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _ReadBody(b"".join(chunks), size, disconnected=True)
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            # Stop reading: the rest is not worth buffering just to refuse it.
            return _ReadBody(b"", size, too_large=True)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return _ReadBody(b"".join(chunks), size)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands out the already-read body once, then the real channel."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _raw_request_target(scope: Scope) -> str:
    raw_path: Any = scope.get("raw_path")
    path = raw_path if isinstance(raw_path, bytes) else scope["path"].encode("utf-8")
    # Some servers and test transports leave the query in raw_path; take it from query_string only.
    path = path.split(b"?", 1)[0]
    query: bytes = scope.get("query_string", b"")
    target = path + b"?" + query if query else path
    return target.decode("latin-1")


def _header_dict(raw_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
