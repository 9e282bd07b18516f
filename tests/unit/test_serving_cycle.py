"""CoalescingCycle: uvicorn's request cycle, with a response's head and body in one socket write."""

from __future__ import annotations

import asyncio
import logging

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from liveness_proxy.serving.cycle import CoalescingCycle


class RecordingTransport:
    """The socket's side of the cycle: what was written, and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def cycle_of(
    cls: type[RequestResponseCycle], method: str = "GET", *, keep_alive: bool = True
) -> tuple[RequestResponseCycle, RecordingTransport, list[str]]:
    transport = RecordingTransport()
    completed: list[str] = []
    cycle = cls(
        scope={"type": "http", "method": method, "path": "/", "http_version": "1.1"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[(b"date", b"Sun, 06 Dec 2026 05:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: completed.append("done"),
    )
    return cycle, transport, completed


async def answer(cycle: RequestResponseCycle, headers: list[tuple[bytes, bytes]], *bodies: bytes) -> None:
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    for index, body in enumerate(bodies):
        await cycle.send({"type": "http.response.body", "body": body, "more_body": index < len(bodies) - 1})


JSON_HEADERS = [(b"Content-Type", b"application/json"), (b"content-length", b"11")]


@pytest.mark.parametrize(
    ("method", "headers", "bodies", "keep_alive"),
    [
        ("GET", JSON_HEADERS, [b'{"ok":true}'], True),
        ("HEAD", JSON_HEADERS, [b""], True),
        ("GET", [(b"content-type", b"text/plain")], [b"chunk one", b"two"], True),
        ("GET", [*JSON_HEADERS, (b"Connection", b"keep-alive, Close")], [b'{"ok":true}'], True),
        ("GET", JSON_HEADERS, [b'{"ok":true}'], False),
    ],
)
async def test_the_bytes_on_the_wire_are_uvicorns(
    method: str, headers: list[tuple[bytes, bytes]], bodies: list[bytes], keep_alive: bool
) -> None:
    """Same bytes, same framing, same connection handling as uvicorn's own cycle; fewer writes."""
    ours, our_transport, our_completion = cycle_of(CoalescingCycle, method, keep_alive=keep_alive)
    theirs, their_transport, their_completion = cycle_of(RequestResponseCycle, method, keep_alive=keep_alive)
    await answer(ours, list(headers), *bodies)
    await answer(theirs, list(headers), *bodies)
    assert b"".join(our_transport.writes) == b"".join(their_transport.writes)
    assert our_transport.closed == their_transport.closed
    assert our_completion == their_completion == ["done"]
    assert (ours.keep_alive, ours.response_complete) == (theirs.keep_alive, theirs.response_complete)
    # The head rides with the first body part (uvicorn writes nothing of a HEAD answer's body).
    assert len(our_transport.writes) == len(bodies)
    assert len(their_transport.writes) == (1 if method == "HEAD" else len(bodies) + 1)


async def test_one_answer_is_one_write() -> None:
    cycle, transport, _ = cycle_of(CoalescingCycle)
    await answer(cycle, JSON_HEADERS, b'{"ok":true}')
    [written] = transport.writes
    assert written.startswith(b"HTTP/1.1 200 OK\r\ndate: ")
    assert written.endswith(b"\r\n\r\n" + b'{"ok":true}')


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-bad name", b"value")],
        [(b"x-header", b"line\r\nx-injected: yes")],
        [(b"x-header", b"nul\x00")],
    ],
)
async def test_an_invalid_header_is_refused_before_anything_is_written(
    headers: list[tuple[bytes, bytes]],
) -> None:
    cycle, transport, _ = cycle_of(CoalescingCycle)
    with pytest.raises(RuntimeError, match="Invalid HTTP header"):
        await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    assert transport.writes == []


async def test_a_tab_in_a_value_is_allowed_as_by_uvicorn() -> None:
    cycle, transport, _ = cycle_of(CoalescingCycle)
    await answer(cycle, [(b"x-header", b"a\tb"), (b"content-length", b"0")], b"")
    assert b"x-header: a\tb\r\n" in transport.writes[0]


async def test_a_body_longer_or_shorter_than_its_length_is_an_error_as_in_uvicorn() -> None:
    cycle, _, _ = cycle_of(CoalescingCycle)
    with pytest.raises(RuntimeError, match="longer than Content-Length"):
        await answer(cycle, JSON_HEADERS, b'{"ok":true} and more')
    cycle, _, completed = cycle_of(CoalescingCycle)
    with pytest.raises(RuntimeError, match="shorter than Content-Length"):
        await answer(cycle, JSON_HEADERS, b"{}")
    assert completed == []


async def test_a_head_whose_body_never_comes_is_never_written() -> None:
    """The app failed after its start message: uvicorn closes the connection; no half answer."""
    cycle, transport, _ = cycle_of(CoalescingCycle)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    assert transport.writes == []
    assert cycle.response_started


async def test_nothing_is_written_to_a_client_that_went_away() -> None:
    cycle, transport, completed = cycle_of(CoalescingCycle)
    await cycle.send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    cycle.disconnected = True
    await cycle.send({"type": "http.response.body", "body": b'{"ok":true}'})
    assert transport.writes == []
    assert completed == []


async def test_messages_out_of_order_are_refused() -> None:
    cycle, _, _ = cycle_of(CoalescingCycle)
    with pytest.raises(RuntimeError, match=r"Expected ASGI message 'http\.response\.start'"):
        await cycle.send({"type": "http.response.body", "body": b""})
    await answer(cycle, JSON_HEADERS, b'{"ok":true}')
    with pytest.raises(RuntimeError, match="after response already completed"):
        await cycle.send({"type": "http.response.body", "body": b""})


def test_serve_runs_every_request_on_the_coalescing_cycle() -> None:
    """The protocol swaps the class of the cycle uvicorn built: nothing else may be needed."""
    own = {name for name in vars(CoalescingCycle) if not name.startswith("__")}
    assert own == {"send", "_head", "held_head"}
    assert "__init__" not in vars(CoalescingCycle)
    assert "__slots__" not in vars(RequestResponseCycle)
