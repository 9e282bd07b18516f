"""What `serve` does with clients that abuse the connection itself: answers left unread, requests
pipelined without end, bodies whose framing is broken or whose transfer coding is not supported.

Like test_serve_limits.py (whose helpers this reuses), every test talks to the real command over raw
sockets. The serve here has a long body deadline, so that a refusal which waited for it could not
pass for an immediate one, and a short send deadline, so that a cut client is cut within seconds.
"""

from __future__ import annotations

import select
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.test_serve_limits import (
    SESSION_TOKEN,
    PoliteClient,
    RawConnection,
    Serve,
    assert_refusal,
    limits_env,
    request_head,
    running_serve,
)
from liveness_proxy.sandbox import Sandbox
from rotation import served_sandbox

BODY_TIMEOUT_SECONDS = 30.0  # what a refusal must not wait for
SEND_TIMEOUT_SECONDS = 1.0
MAX_PIPELINED_REQUESTS = 16  # the default
MAX_CONNECTIONS = 8
# What a refusal "at once" may take on a loaded 2-core machine: far below the body deadline.
AT_ONCE_SECONDS = 1.0
# Beyond the send deadline, for the kernel to act on its own timeout (it probes a zero window at
# growing intervals) and for a loaded machine.
CUT_MARGIN_SECONDS = 4.0
# The reviewer's slow reader: a 4 KiB receive buffer, and the largest answer the proxy has (~60 KB).
SLOW_READER_BUFFER_BYTES = 4096
LARGE_ANSWER = request_head("GET", "/openapi.json")

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the kernel's connection table (/proc/net/tcp)"
)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    with served_sandbox() as pair:
        yield pair


@pytest.fixture(scope="module")
def serve(sandbox: tuple[Sandbox, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    folder = tmp_path_factory.mktemp("serve-abuse")
    env = limits_env(
        sandbox[1],
        folder,
        LIVENESS_PROXY_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT_SECONDS),
        LIVENESS_PROXY_SEND_TIMEOUT_SECONDS=str(SEND_TIMEOUT_SECONDS),
        LIVENESS_PROXY_MAX_PIPELINED_REQUESTS=str(MAX_PIPELINED_REQUESTS),
        LIVENESS_PROXY_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    with running_serve(env, folder) as running:
        time.sleep(0.3)  # the readiness probe's connections are gone from the server's count
        yield running
        output = running.output_text()
    # Cut connections and refused bodies end the app's work quietly: no write to a closed
    # connection, no answer left half done.
    assert "unhandled_error" not in output
    assert "Exception in ASGI application" not in output
    assert "without completing response" not in output


def authorized_post(serve: Serve, *headers: str) -> bytes:
    return request_head(
        "POST",
        SESSION_TOKEN,
        f"Authorization: Bearer {serve.key}",
        "Content-Type: application/json",
        *headers,
    )


def audit_statuses(serve: Serve, request_id: str) -> list[tuple[int, str | None]]:
    database = Path(serve.env["LIVENESS_PROXY_DATABASE_URL"].removeprefix("sqlite:///"))
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT status, problem FROM audit_records WHERE request_id = ?", (request_id,)
        ).fetchall()
    return [(int(status), problem) for status, problem in rows]


def server_end_open(server_port: int, client_port: int) -> bool:
    """Whether the server's kernel still holds its end of this connection, in any state but
    TIME-WAIT: an end the server closed while answers were still queued shows as FIN-WAIT-1."""
    time_wait = "06"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
            and state != time_wait
        ):
            return True
    return False


def wait_until_no_connection_is_open(server_port: int, seconds: float = 5.0) -> None:
    """Until the server holds no connection (earlier tests' clients went away, but the server only
    notices when it next reads or its deadline passes): the next test starts from a clean count."""
    listening, time_wait = "0A", "06"
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        states = [
            line.split()[3]
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if int(line.split()[1].rsplit(":", 1)[1], 16) == server_port
        ]
        if all(state in (listening, time_wait) for state in states):
            return
        time.sleep(0.05)
    raise AssertionError("the server still holds connections of earlier tests")


def wait_until_server_end_closed(connection: RawConnection, server_port: int, seconds: float) -> float:
    """Seconds until the server's end of `connection` was gone (fails after `seconds`)."""
    client_port = connection.sock.getsockname()[1]
    started = time.monotonic()
    while server_end_open(server_port, client_port):
        assert time.monotonic() - started < seconds, "the server still holds the slow reader's connection"
        time.sleep(0.05)
    return time.monotonic() - started


# -- malformed framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"2\r\n{}\r\nzz\r\n", id="chunk size not hex"),
        pytest.param(b"2\r\n{}XX0\r\n\r\n", id="chunk without its CRLF"),
        pytest.param(b"ffffffffffffffffffff\r\n", id="chunk size overflow"),
    ],
)
def test_malformed_chunked_framing_gets_400_at_once_and_the_app_never_sees_it(
    serve: Serve, body: bytes
) -> None:
    connection = RawConnection.open(serve.port)
    started = time.monotonic()
    connection.send(
        authorized_post(serve, "Transfer-Encoding: chunked", "X-Request-ID: framing-in-one-piece") + body
    )
    problem = assert_refusal(connection.read_response(), 400, "bad-request")
    assert time.monotonic() - started < AT_ONCE_SECONDS
    assert connection.closed_by_server()
    connection.close()
    # Refused in the read that brought the head: the app did not start on it (no credential lookup,
    # no record), and the refusal's id is the protocol's own.
    assert problem["request_id"] != "framing-in-one-piece"
    time.sleep(0.2)
    assert audit_statuses(serve, "framing-in-one-piece") == []


@pytest.mark.parametrize(
    "coding",
    [
        pytest.param(("Transfer-Encoding: gzip, chunked",), id="gzip, chunked"),
        pytest.param(("Transfer-Encoding: gzip",), id="gzip"),
        pytest.param(("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"), id="two fields"),
        pytest.param(("Transfer-Encoding: chunked", "Content-Length: 2"), id="with Content-Length"),
    ],
)
def test_an_unsupported_transfer_coding_gets_400_at_once(serve: Serve, coding: tuple[str, ...]) -> None:
    connection = RawConnection.open(serve.port)
    started = time.monotonic()
    # A valid chunked body: only the declared coding is wrong (a gzip one would be no different).
    connection.send(authorized_post(serve, *coding) + b"2\r\n{}\r\n0\r\n\r\n")
    assert_refusal(connection.read_response(), 400, "bad-request")
    assert time.monotonic() - started < AT_ONCE_SECONDS
    assert connection.closed_by_server()
    connection.close()


def test_framing_broken_while_the_app_reads_the_body_is_answered_400_in_its_place(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    head = authorized_post(serve, "Transfer-Encoding: chunked", "X-Request-ID: framing-mid-body")
    connection.send(head + b"2\r\n{}\r\n")
    time.sleep(0.3)  # the app has the request and waits for the rest of its body
    started = time.monotonic()
    connection.send(b"zz\r\n")
    answer = connection.read_response()
    assert time.monotonic() - started < AT_ONCE_SECONDS
    assert answer.status == 400
    problem = answer.problem()
    assert problem["type"] == "urn:liveness-proxy:problem:bad-request"
    # Under the id the app gave the request, which its record carries: the body never arrived
    # whole, so nothing was forwarded, and the app saw a client that went away.
    assert problem["request_id"] == "framing-mid-body"
    assert answer.headers["x-request-id"] == "framing-mid-body"
    assert answer.headers["connection"] == "close"
    assert connection.closed_by_server()
    connection.close()
    deadline = time.monotonic() + 5
    while not audit_statuses(serve, "framing-mid-body") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert audit_statuses(serve, "framing-mid-body") == [(499, "client-disconnected")]


def test_too_many_trailer_fields_get_431_in_place_of_the_answer(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    trailers = b"".join(b"X-Trailer-%d: %s\r\n" % (number, b"t" * 100) for number in range(100))
    started = time.monotonic()
    connection.send(
        authorized_post(serve, "Transfer-Encoding: chunked") + b"2\r\n{}\r\n0\r\n" + trailers + b"\r\n"
    )
    # The app was waiting for the end of the body, which the trailers delay: not for its deadline.
    assert_refusal(connection.read_response(), 431, "request-header-fields-too-large")
    assert time.monotonic() - started < AT_ONCE_SECONDS
    assert connection.closed_by_server()
    connection.close()


# -- pipelining -------------------------------------------------------------------------------------


def test_requests_pipelined_beyond_the_cap_are_not_read(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    # One being answered, the cap waiting behind it, and three more.
    connection.send(request_head("GET", "/healthz") * (1 + MAX_PIPELINED_REQUESTS + 3))
    answers = [connection.read_response() for _ in range(1 + MAX_PIPELINED_REQUESTS)]
    assert [answer.status for answer in answers] == [200] * (1 + MAX_PIPELINED_REQUESTS)
    assert answers[-1].headers["connection"] == "close"
    assert connection.closed_by_server()
    connection.close()


def test_requests_pipelined_within_the_cap_are_all_answered(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(request_head("GET", "/healthz") * (1 + MAX_PIPELINED_REQUESTS))
    for _ in range(1 + MAX_PIPELINED_REQUESTS):
        answer = connection.read_response()
        assert answer.status == 200
        assert "connection" not in answer.headers  # kept alive
    connection.send(request_head("GET", "/healthz"))
    assert connection.read_response().status == 200
    connection.close()


def test_a_queued_request_with_broken_framing_is_dropped_and_the_connection_closes(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    started = time.monotonic()
    connection.send(
        request_head("GET", "/healthz")
        + authorized_post(serve, "Transfer-Encoding: chunked")
        + b"2\r\n{}\r\nzz\r\n"
    )
    # The request before it is answered; the broken one is never started (it would wait for the
    # rest of its body until the body deadline), and no answer can be written for it.
    first = connection.read_response()
    assert first.status == 200
    assert first.headers["connection"] == "close"
    assert connection.closed_by_server()
    assert time.monotonic() - started < AT_ONCE_SECONDS
    connection.close()


# -- slow readers -----------------------------------------------------------------------------------


def open_slow_reader(port: int) -> RawConnection:
    sock = socket.socket()
    # Before connecting: the window the client offers is sized from it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_BUFFER_BYTES)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return RawConnection(sock)


def pipeline_unread(connection: RawConnection, requests: int = 120) -> None:
    """Sends `requests` GET /openapi.json one by one, more slowly than the server answers them (so
    that the pipelining cap does not end the connection first): far more answer bytes than the
    kernel buffers between the two ends hold, so that the server has to hold answers back."""
    connection.sock.setblocking(False)
    try:
        for _ in range(requests):
            try:
                connection.sock.send(LARGE_ANSWER)
            except (BlockingIOError, ConnectionResetError, BrokenPipeError):
                return  # the server reads no more, or cut the connection already
            time.sleep(0.02)
    finally:
        connection.sock.setblocking(True)


@linux_only
def test_slow_readers_are_cut_off_and_honest_callers_keep_being_served(serve: Serve) -> None:
    """The reviewer's attack: clients that pipeline requests for the largest answer and never read,
    while the connection limit is low. Each is cut within the send deadline, and the connections
    they held serve others again."""
    wait_until_no_connection_is_open(serve.port)
    refusals_before = serve.output_text().count("Connection limit reached")
    with PoliteClient(serve.url, serve.auth) as polite:
        time.sleep(0.1)  # its connection is open (and counted) first
        # Half the connections. The limit also counts requests still running, the slow readers'
        # included, and the polite client's previous one may still be finishing its work.
        slow = [open_slow_reader(serve.port) for _ in range(MAX_CONNECTIONS // 2)]
        threads = [threading.Thread(target=pipeline_unread, args=(reader,)) for reader in slow]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        for reader in slow:
            seconds = wait_until_server_end_closed(
                reader, serve.port, SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS
            )
            assert seconds < SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS
    polite.assert_served()
    # Nobody was refused for the connection limit: the slow readers were admitted, and cut.
    assert serve.output_text().count("Connection limit reached") == refusals_before
    for reader in slow:
        reader.close()
    # Every connection the slow readers held is free again: callers on all but one are served.
    time.sleep(0.2)
    fresh = [RawConnection.open(serve.port) for _ in range(MAX_CONNECTIONS - 1)]
    for connection in fresh:
        connection.send(request_head("GET", "/healthz"))
    assert [connection.read_response().status for connection in fresh] == [200] * len(fresh)
    for connection in fresh:
        connection.close()


def test_a_reader_too_slow_for_its_answers_is_cut_off(serve: Serve) -> None:
    """A client that reads, but far slower than it asks: the answers the server holds back for it
    are not taken within the send deadline, so the connection is aborted (the kernel alone would
    keep it: it sees the client's window open again and again)."""
    reader = open_slow_reader(serve.port)
    asking = threading.Thread(target=pipeline_unread, args=(reader,))
    asking.start()
    received = 0
    ended = False
    started = time.monotonic()
    while time.monotonic() - started < SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS + 4:
        readable, _, _ = select.select([reader.sock], [], [], 0.2)
        if not readable:
            continue
        try:
            chunk = reader.sock.recv(SLOW_READER_BUFFER_BYTES)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            ended = True
            break
        if not chunk:
            ended = True
            break
        received += len(chunk)
        # About 40 KB/s from the first answer on: often enough that the kernel sees progress (its
        # own timeout does not end this), far too slow for the megabytes asked for.
        time.sleep(0.1)
    asking.join(timeout=10)
    reader.close()
    assert ended, f"the server kept sending to a reader this slow ({received} bytes in the window)"


@linux_only
def test_answers_left_in_the_kernel_are_dropped_after_the_send_deadline(serve: Serve) -> None:
    """The reviewer's client exactly: 300 requests in one piece, never read. The pipelining cap
    ends the connection after the answers due (17 of ~60 KB), which the kernel takes whole; the
    kernel then gives up on them after the send deadline (TCP_USER_TIMEOUT) instead of holding
    them, with a client that keeps its window shut, for as long as it likes."""
    reader = open_slow_reader(serve.port)
    reader.send(LARGE_ANSWER * 300)
    seconds = wait_until_server_end_closed(reader, serve.port, SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS)
    assert seconds < SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS
    reader.close()
