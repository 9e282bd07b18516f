"""An `HttpTransport` that answers from a function, without a socket (like httpx's `MockTransport`).

For tests of what callers make of answers and failures: the token fetch, the JWKS fetch and the
liveness client get a `MemoryTransport(handler)`, where `handler(request)` returns an `HttpResponse`
(or awaits one), or raises an `HttpError` to stand for a failure on the wire. The transport keeps the
promises of http/base.py that do not need a socket, so a caller cannot pass here and fail for real:
an encoded answer is refused, a body over `max_body_bytes` is `ResponseTooLarge`, a handler slower
than `timeout_seconds` is a `Timeout`, and nothing is sent after `aclose()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence

from liveness_proxy.http.base import HttpRequest, HttpResponse, Url, refuse_encoded
from liveness_proxy.http.errors import ConnectError, ResponseTooLarge, Timeout

Handler = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]


def response(
    status: int,
    body: bytes = b"",
    *,
    headers: Iterable[tuple[str, str]] = (),
    content_type: str | None = None,
) -> HttpResponse:
    """An answer as `Http1Pool` would return it: header names lower-cased, values as bytes."""
    pairs = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    if content_type is not None:
        pairs.append((b"content-type", content_type.encode("latin-1")))
    return HttpResponse(status=status, headers=tuple(pairs), body=body)


def json_response(status: int, body: bytes, *, headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    return response(status, body, headers=headers, content_type="application/json")


class MemoryTransport:
    """Calls `handler` for every request; `requests` lists them all, in order."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[HttpRequest] = []
        self.closed = False

    async def request(
        self,
        method: str,
        url: Url,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        max_body_bytes: int,
        timeout_seconds: float,
    ) -> HttpResponse:
        if self.closed:
            raise ConnectError("the transport is closed")
        request = HttpRequest(method=method, url=url, headers=tuple(headers), body=body)
        self.requests.append(request)
        try:
            async with asyncio.timeout(timeout_seconds):
                result = self._handler(request)
                answer = result if isinstance(result, HttpResponse) else await result
        except TimeoutError as exc:
            if isinstance(exc, Timeout):
                raise
            raise Timeout("the handler did not answer in time") from None
        if len(answer.body) > max_body_bytes:
            raise ResponseTooLarge(answer.status)
        return refuse_encoded(answer)

    async def aclose(self) -> None:
        self.closed = True
