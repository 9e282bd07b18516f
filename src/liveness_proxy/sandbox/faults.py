"""Injected failures: what an unreliable upstream can do to the proxy, one call at a time."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass as plain_dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from liveness_proxy.sandbox.responses import OrjsonResponse, error_response

FaultTarget = Literal["token", "session_token", "liveness_session", "liveness_result", "any"]
FaultKind = Literal[
    "latency",
    "status",
    "rate_limit",
    "timeout",
    "malformed",
    "wrong_content_type",
    "oversized",
    "reset",
    "garbage",
    "token_expires_in",
]
# The endpoints a fault can hit; "any" in a FaultTarget stands for all of them.
Endpoint = Literal["token", "session_token", "liveness_session", "liveness_result"]

MALFORMED_BODY = b'{"session_id": '
WRONG_CONTENT_TYPE_BODY = "<html>oops</html>"
# kind="reset": a valid answer is announced (status, Content-Length) but only its first half is sent.
RESET_BODY = b'{"session_id":"reset-00000000","status":"CREATED","expires_in":180}'
# kind="garbage": bytes that are not an HTTP response at all (what a TLS port or a confused load
# balancer might send), followed by a clean close.
GARBAGE_BYTES = b"\x00\xff\x13\x37 this is not an HTTP response \xde\xad\xbe\xef\r\n\r\n"
# Where the sandbox app leaves the server's own `send` for the faults that work below HTTP.
SERVER_SEND_SCOPE_KEY = "liveness_proxy.sandbox.server_send"
# A reset follows the partial body after this pause, so the client has read what was sent (a reset
# may make the peer's kernel discard data it has not read yet).
_RESET_PAUSE_SECONDS = 0.05
_OVERSIZED_PREFIX = b'{"session_id":"x","pad":"'
_OVERSIZED_SUFFIX = b'"}'
_OVERSIZED_CHUNK_BYTES = 64 * 1024


# A pydantic dataclass, so that faults built in Python and faults posted to the control API are
# validated by the same rules.
@dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False))
class Fault:
    """A failure to apply to the next `count` calls of the `target` endpoint."""

    target: FaultTarget
    kind: FaultKind
    count: Annotated[int, Field(ge=1)] = 1
    status: Annotated[int, Field(ge=100, le=599)] = 500  # kind="status"
    delay_seconds: Annotated[float, Field(ge=0)] = 0.0  # kind="latency": delay, then answer normally
    retry_after_seconds: Annotated[int, Field(ge=0)] = 1  # kind="rate_limit"
    hang_seconds: Annotated[float, Field(ge=0)] = 30.0  # kind="timeout": the caller should give up first
    size_bytes: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024  # kind="oversized"
    # kind="token_expires_in": a real token is issued, its answer says this (0, negative, huge).
    expires_in: int = 0

    @model_validator(mode="after")
    def _token_only_kinds(self) -> Fault:
        if self.kind == "token_expires_in" and self.target != "token":
            raise ValueError('kind "token_expires_in" applies to target "token" only')
        return self


@plain_dataclass
class _ArmedFault:
    fault: Fault
    remaining: int


class FaultQueue:
    """Pending faults in the order they were injected."""

    def __init__(self) -> None:
        self._armed: list[_ArmedFault] = []

    def __len__(self) -> int:
        return len(self._armed)

    def add(self, fault: Fault) -> None:
        # Count down on a private copy: the caller's Fault stays as they built it.
        self._armed.append(_ArmedFault(fault, fault.count))

    def clear(self) -> None:
        self._armed.clear()

    def take(self, endpoint: Endpoint) -> Fault | None:
        """The oldest fault matching `endpoint`, used up by one; None when there is none."""
        for armed in self._armed:
            if armed.fault.target in (endpoint, "any"):
                armed.remaining -= 1
                if armed.remaining == 0:
                    self._armed.remove(armed)
                return armed.fault
        return None


async def fault_response(fault: Fault, receive: Receive) -> Response | None:
    """Carry out `fault`: the response to send instead, or None to go on and answer normally
    (kind="token_expires_in" is carried out by the token endpoint itself)."""
    if fault.kind == "latency":
        await sleep_unless_disconnected(fault.delay_seconds, receive)
        return None
    if fault.kind == "status":
        return error_response(fault.status, "upstream_failure", "injected")
    if fault.kind == "rate_limit":
        return error_response(429, "rate_limited", headers={"Retry-After": str(fault.retry_after_seconds)})
    if fault.kind == "timeout":
        await sleep_unless_disconnected(fault.hang_seconds, receive)
        return error_response(504, "gateway_timeout", "injected")
    if fault.kind == "malformed":
        return Response(MALFORMED_BODY, media_type=OrjsonResponse.media_type)
    if fault.kind == "wrong_content_type":
        return HTMLResponse(WRONG_CONTENT_TYPE_BODY)
    if fault.kind == "oversized":
        return _oversized_response(fault.size_bytes)
    if fault.kind == "reset":
        return ResetResponse()
    if fault.kind == "garbage":
        return GarbageResponse()
    return None


def _oversized_response(size_bytes: int) -> Response:
    # Valid JSON, so that only its size is wrong; streamed, so the sandbox never holds it all.
    padding = max(0, size_bytes - len(_OVERSIZED_PREFIX) - len(_OVERSIZED_SUFFIX))
    total = len(_OVERSIZED_PREFIX) + padding + len(_OVERSIZED_SUFFIX)

    async def body() -> AsyncIterator[bytes]:
        yield _OVERSIZED_PREFIX
        left = padding
        while left > 0:
            chunk = min(left, _OVERSIZED_CHUNK_BYTES)
            yield b"a" * chunk
            left -= chunk
        yield _OVERSIZED_SUFFIX

    return StreamingResponse(
        body(), media_type=OrjsonResponse.media_type, headers={"Content-Length": str(total)}
    )


class ResetResponse(Response):
    """Status line, headers and half the announced body, then a TCP reset (RST).

    ASGI has no message for "abort the connection", so this reaches for the server's transport (see
    `_server_transport`). Without one (another server, an in-process test transport) the response
    is simply left unfinished, which a real server answers by closing the connection."""

    def __init__(self) -> None:
        super().__init__(RESET_BODY, media_type=OrjsonResponse.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send(
            {"type": "http.response.body", "body": RESET_BODY[: len(RESET_BODY) // 2], "more_body": True}
        )
        transport = _server_transport(scope)
        if transport is None:
            return
        await asyncio.sleep(_RESET_PAUSE_SECONDS)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger on, timeout zero: close() then discards the connection with RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await _until_disconnected(receive)


class GarbageResponse(Response):
    """Bytes that are not HTTP instead of a response, then a clean close. Needs the server's
    transport (see `_server_transport`); without one, a 500 says the fault could not be carried out."""

    def __init__(self) -> None:
        super().__init__(b"", status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = _server_transport(scope)
        if transport is None:
            await error_response(500, "fault_unsupported", "garbage needs a uvicorn server")(
                scope, receive, send
            )
            return
        transport.write(GARBAGE_BYTES)
        transport.close()  # after the bytes are written
        await _until_disconnected(receive)


def _server_transport(scope: Scope) -> Any | None:
    """The asyncio transport of this request's connection, when the sandbox runs under uvicorn.

    uvicorn's `send` is a bound method of its request cycle, which holds the connection's transport;
    the sandbox app leaves that `send` in the scope (under SERVER_SEND_SCOPE_KEY) before any
    middleware wraps it. Duck-typed: uvloop's transports are not asyncio.Transport subclasses."""
    cycle = getattr(scope.get(SERVER_SEND_SCOPE_KEY), "__self__", None)
    transport = getattr(cycle, "transport", None)
    if all(
        callable(getattr(transport, name, None)) for name in ("write", "close", "abort", "get_extra_info")
    ):
        return transport
    return None


async def _until_disconnected(receive: Receive) -> None:
    # The server learns of the closed connection from the transport; returning only then keeps it
    # from reporting (and trying to finish) a response that was cut short on purpose.
    while (await receive())["type"] != "http.disconnect":
        pass


async def sleep_unless_disconnected(seconds: float, receive: Receive) -> bool:
    """Sleep, but stop early if the client hangs up; True when it did.

    A hung request must not outlive its client, or it would hold up the server's shutdown.
    """

    async def wait_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        watcher.cancel()
        # Let both settle; asyncio.wait neither raises their errors nor swallows our own cancellation.
        await asyncio.wait({sleeper, watcher})
    return not watcher.cancelled() and watcher.exception() is None
