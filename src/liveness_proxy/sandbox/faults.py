"""Injected failures: what an unreliable upstream can do to the proxy, one call at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass as plain_dataclass
from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import Receive

from liveness_proxy.sandbox.responses import OrjsonResponse, error_response

FaultTarget = Literal["token", "session_token", "liveness_session", "liveness_result", "any"]
FaultKind = Literal[
    "latency", "status", "rate_limit", "timeout", "malformed", "wrong_content_type", "oversized"
]
# The endpoints a fault can hit; "any" in a FaultTarget stands for all of them.
Endpoint = Literal["token", "session_token", "liveness_session", "liveness_result"]

MALFORMED_BODY = b'{"session_id": '
WRONG_CONTENT_TYPE_BODY = "<html>oops</html>"
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
    """Carry out `fault`: the response to send instead, or None to go on and answer normally."""
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
    return _oversized_response(fault.size_bytes)


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
