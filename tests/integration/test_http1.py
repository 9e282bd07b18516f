"""The lean HTTP/1.1 client of the liveness calls, against real sockets on loopback.

Each test runs a tiny raw server (asyncio.start_server) that answers with exactly the bytes the case
needs: well-formed answers in every framing, and the misbehaviours an upstream can show (garbage,
oversized heads and bodies, closing a keep-alive connection, never answering, answering twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from liveness_proxy.http.errors import ConnectError, ConnectionClosed, ExchangeError, ResponseTooLarge
from liveness_proxy.http.http1 import MAX_HEADER_BYTES, Http1Pool

OK_BODY = b'{"status":"SUCCEEDED"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(OK_BODY),
    OK_BODY,
)


@dataclass
class RawServer:
    """Counts connections and requests; `answer(request_number, connection_number)` gives the bytes
    to send for each request (None: send nothing and keep the connection open)."""

    origin: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0


Answer = Callable[[int, int], Awaitable[bytes | None]]
HANG_UP = b"<hang up without answering>"


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


@contextlib.asynccontextmanager
async def raw_server(answer: Answer, *, close_after_each: bool = False) -> AsyncIterator[RawServer]:
    state = RawServer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        number = state.connections
        state.open_now += 1
        state.most_open = max(state.most_open, state.open_now)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                state.requests.append(request)
                reply = await answer(len(state.requests), number)
                if reply is None:
                    await asyncio.sleep(3600)
                    return
                if reply == HANG_UP:
                    return
                writer.write(reply)
                await writer.drain()
                if close_after_each:
                    return
        finally:
            state.open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state.origin = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


def always(reply: bytes | None) -> Answer:
    async def answer(_request: int, _connection: int) -> bytes | None:
        return reply

    return answer


@contextlib.asynccontextmanager
async def pool_for(server: RawServer, **options: float) -> AsyncIterator[Http1Pool]:
    pool = Http1Pool(
        server.origin,
        max_connections=int(options.get("max_connections", 10)),
        connect_timeout_seconds=1.0,
        keepalive_seconds=options.get("keepalive_seconds", 4.0),
    )
    try:
        yield pool
    finally:
        await pool.close()


async def get(
    pool: Http1Pool, *, limit: int = 4096, headers: tuple[tuple[str, str], ...] = (), timeout: float = 5.0
) -> bytes:
    response = await pool.request(
        "GET", "/result/abc", list(headers), None, max_body_bytes=limit, timeout_seconds=timeout
    )
    assert response.status == 200
    return response.body


async def test_answers_are_read_and_the_connection_is_kept_alive() -> None:
    async with raw_server(always(OK)) as server, pool_for(server) as pool:
        for _ in range(3):
            assert await get(pool, headers=(("Authorization", "Bearer t"),)) == OK_BODY
        response = await pool.request(
            "POST", "/sessions", [], b'{"a":1}', max_body_bytes=4096, timeout_seconds=5
        )
    assert response.header(b"content-type") == "application/json"
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"GET /result/abc HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer t\r\n" in first
    assert b"\r\nHost: 127.0.0.1:" in first
    assert b"\r\nAccept-Encoding: identity\r\n" in first
    assert server.requests[3].endswith(b'Content-Length: 7\r\n\r\n{"a":1}')


async def test_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    async with raw_server(always(chunked)) as server, pool_for(server) as pool:
        assert await get(pool) == b"hello world"
        assert await get(pool) == b"hello world"
    assert server.connections == 1
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    async with raw_server(always(until_close), close_after_each=True) as server, pool_for(server) as pool:
        assert await get(pool) == b"all of it"
        assert await get(pool) == b"all of it"
    assert server.connections == 2


async def test_an_interim_answer_is_skipped() -> None:
    async with raw_server(always(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server, pool_for(server) as pool:
        assert await get(pool) == OK_BODY


async def test_a_body_over_the_limit_is_refused_declared_or_streamed() -> None:
    declared = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
    async with raw_server(always(declared)) as server, pool_for(server) as pool:
        with pytest.raises(ResponseTooLarge) as refused:
            await get(pool, limit=1000)
        assert refused.value.status == 200
        assert pool.open_connections == 0  # the rest of that body is never read from that connection
    streamed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n"
    async with raw_server(always(streamed * 1)) as server, pool_for(server) as pool:
        with pytest.raises(ResponseTooLarge):
            await get(pool, limit=1000)


@pytest.mark.parametrize("length", [b"10485760", b"9" * 19])
async def test_a_body_announced_as_too_large_is_refused_before_any_of_it_arrives(length: bytes) -> None:
    # Only the head is sent: waiting for the body (and buffering it) would end in the deadline.
    head_only = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n"
    )
    async with raw_server(always(head_only)) as server, pool_for(server) as pool:
        with pytest.raises(ResponseTooLarge) as refused:
            await get(pool, limit=4096, timeout=2.0)
        assert refused.value.status == 200
        assert pool.open_connections == 0


async def test_an_oversized_header_block_is_refused() -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * (MAX_HEADER_BYTES + 10) + b"\r\nContent-Length: 0\r\n\r\n"
    many = b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"Content-Length: 0\r\n\r\n"
    for reply in (huge, many):
        async with raw_server(always(reply)) as server, pool_for(server) as pool:
            with pytest.raises(ResponseTooLarge):
                await get(pool)


async def test_garbage_and_double_answers_break_the_exchange() -> None:
    for reply in (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", OK + OK, b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"):
        async with raw_server(always(reply)) as server, pool_for(server) as pool:
            with pytest.raises(ExchangeError):
                await get(pool)
            assert pool.open_connections == 0


async def test_a_get_on_a_keep_alive_connection_the_server_closed_is_sent_once_more() -> None:
    # The server reads the second request on the first connection, then hangs up without a word:
    # what a keep-alive connection closing just as the request is written looks like.
    async def hang_up_on_the_second(request: int, connection: int) -> bytes | None:
        return HANG_UP if (request, connection) == (2, 1) else OK

    async with raw_server(hang_up_on_the_second) as server, pool_for(server) as pool:
        assert await get(pool) == OK_BODY
        assert await get(pool) == OK_BODY
    assert len(server.requests) == 3  # the GET was sent again, on a second connection
    assert server.connections == 2


async def test_a_post_is_never_sent_twice() -> None:
    async def hang_up_on_the_second(request: int, _connection: int) -> bytes | None:
        return HANG_UP if request == 2 else OK

    async with raw_server(hang_up_on_the_second) as server, pool_for(server) as pool:
        await pool.request("POST", "/sessions", [], b"{}", max_body_bytes=4096, timeout_seconds=5)
        with pytest.raises(ExchangeError):
            await pool.request("POST", "/sessions", [], b"{}", max_body_bytes=4096, timeout_seconds=5)
    assert len(server.requests) == 2


async def test_a_refused_connection_and_a_silent_server() -> None:
    async with raw_server(always(OK)) as server:
        origin = server.origin
    pool = Http1Pool(origin, max_connections=2, connect_timeout_seconds=1)
    with pytest.raises(ConnectError):
        await get(pool)
    await pool.close()
    async with raw_server(always(None)) as server, pool_for(server) as pool:
        with pytest.raises(TimeoutError):
            await get(pool, timeout=0.2)
        assert pool.open_connections == 0  # a timed-out exchange's connection is not reused
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # a caller giving up first closes it the same way
                await get(pool)
        assert pool.open_connections == 0


async def test_the_deadline_covers_waiting_for_a_connection() -> None:
    async with raw_server(always(None)) as server, pool_for(server, max_connections=1) as pool:
        hung = asyncio.create_task(get(pool, timeout=5))
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await get(pool, timeout=0.2)  # the only connection is busy the whole time
        assert asyncio.get_running_loop().time() - started < 1
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung


async def test_header_values_cannot_smuggle_lines() -> None:
    async with raw_server(always(OK)) as server, pool_for(server) as pool:
        for name, value in (("Authorization", "Bearer t\r\nX-Evil: 1"), ("X-Id", "a\nb"), ("X-Id", "a\x00")):
            with pytest.raises(ConnectError):
                await get(pool, headers=((name, value),))
        with pytest.raises(ConnectError):
            await get(pool, headers=(("X-Bad Name", "v"),))
    assert server.requests == []


async def test_connections_are_capped_and_waiters_served_in_turn() -> None:
    async def slow(_request: int, _connection: int) -> bytes | None:
        await asyncio.sleep(0.05)
        return OK

    async with raw_server(slow) as server, pool_for(server, max_connections=2) as pool:
        bodies = await asyncio.gather(*(get(pool) for _ in range(8)))
    assert bodies == [OK_BODY] * 8
    assert server.most_open <= 2
    assert server.connections == 2


async def test_idle_connections_past_their_time_are_not_reused() -> None:
    async with raw_server(always(OK)) as server, pool_for(server, keepalive_seconds=0.05) as pool:
        await get(pool)
        await asyncio.sleep(0.1)
        await get(pool)
    assert server.connections == 2


def test_only_http_origins() -> None:
    for origin in ("ftp://example.com", "http://", "example.com"):
        with pytest.raises(ValueError, match="origin"):
            Http1Pool(origin, max_connections=1, connect_timeout_seconds=1)


async def test_a_header_that_never_ends_is_refused_without_waiting_for_the_deadline() -> None:
    async def endless(_request: int, _connection: int) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (4 * MAX_HEADER_BYTES)  # no end of line

    async with raw_server(endless) as server, pool_for(server) as pool:
        with pytest.raises(ResponseTooLarge):
            await get(pool, timeout=30)  # refused as it arrives, not after 30 s of buffering
        assert pool.open_connections == 0


async def test_a_body_of_tiny_chunks_is_read_whole() -> None:
    body = b"0123456789" * 300
    chunked = b"".join(b"2\r\n" + body[i : i + 2] + b"\r\n" for i in range(0, len(body), 2))
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    async with raw_server(always(reply)) as server, pool_for(server) as pool:
        assert await get(pool, limit=len(body)) == body
        with pytest.raises(ResponseTooLarge):
            await get(pool, limit=len(body) - 1)


async def test_a_reset_cuts_a_close_delimited_body_short_and_that_is_an_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"status":"SUCC')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = Http1Pool(
        f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", max_connections=1, connect_timeout_seconds=1
    )
    try:
        with pytest.raises(ExchangeError):
            await get(pool)
    finally:
        await pool.close()
        server.close()


async def test_a_waiter_is_woken_when_a_connect_fails() -> None:
    async def hold_then_break(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        writer.transport.abort()

    server = await asyncio.start_server(hold_then_break, "127.0.0.1", 0)
    pool = Http1Pool(
        f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", max_connections=1, connect_timeout_seconds=1
    )
    try:
        busy = asyncio.create_task(get(pool, timeout=10))
        await asyncio.sleep(0.05)
        server.close()  # from now on every connect is refused
        await asyncio.sleep(0.05)
        waiters = [asyncio.create_task(get(pool, timeout=10)) for _ in range(2)]
        outcomes = await asyncio.wait_for(asyncio.gather(busy, *waiters, return_exceptions=True), 5)
    finally:
        await pool.close()
    # Both waiters learn at once that the upstream is gone; neither sleeps until its deadline.
    assert [type(outcome) for outcome in outcomes] == [
        ConnectionClosed,
        ConnectError,
        ConnectError,
    ]


async def test_cancelling_a_finished_exchange_leaves_the_reused_connection_alone() -> None:
    """The answer arrives and the connection goes back to the pool; in the same loop turn the
    first caller is cancelled, and a request already waiting in the ready queue takes the
    connection. The cancelled caller must not close it under that one (whose POST would fail after
    reaching the upstream)."""
    async with raw_server(always(OK)) as server, pool_for(server, max_connections=1) as pool:
        await get(pool)
        connection = pool._idle[-1]
        finish = connection._finish
        first: asyncio.Task[bytes] | None = None

        def finish_then_cancel_the_caller() -> None:
            connection._finish = finish  # type: ignore[method-assign]  # once
            finish()
            assert first is not None
            first.cancel()

        async def waiting_for_the_connection() -> Any:
            # Spins in the ready queue, so it runs before the cancelled caller resumes.
            while not pool._idle or pool._idle[-1].closed:
                await asyncio.sleep(0)
            return await pool.request("POST", "/sessions", [], b"{}", max_body_bytes=4096, timeout_seconds=5)

        connection._finish = finish_then_cancel_the_caller  # type: ignore[method-assign]
        first = asyncio.create_task(get(pool))
        await asyncio.sleep(0)  # first takes the idle connection
        second = asyncio.create_task(waiting_for_the_connection())
        with pytest.raises(asyncio.CancelledError):
            await first
        answer = await second
    assert answer.status == 200
    assert [request.split(b" ", 1)[0] for request in server.requests] == [b"GET", b"GET", b"POST"]
