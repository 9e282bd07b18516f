"""What one client may hold of `serve`: head and body deadlines, head and body sizes, connections.

Every test talks to the real command (`liveness-proxy serve` in a subprocess, so the protocol class
is the one `serve` uses) over raw sockets, because the clients under test are the ones an HTTP
library would never be: slow, oversized, or too many.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import re
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from e2e.test_cli import COMMAND, free_port
from liveness_proxy.sandbox import Fault, Sandbox
from liveness_proxy.serving import LimitedHttpToolsProtocol, ServeLimits, uvicorn_options
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.wiring import serve_options
from support import (
    ProxyHarness,
    ServerThread,
    background_command,
    find_leaks,
    issue_keys,
    subprocess_env,
    upstream_sandbox,
)

HEADER_TIMEOUT_SECONDS = 1.0
BODY_TIMEOUT_SECONDS = 1.0
MAX_HEADER_BYTES = 4096
MAX_BODY_BYTES = 4096
SESSION_TOKEN = "/v1/liveness/session-token"
# A client that sends one byte per interval: 4 bytes a second, far slower than any real client.
TRICKLE_INTERVAL_SECONDS = 0.25
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
HIGH_LIMITS = {
    "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "1000000/minute",
    "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "1000000/minute",
    "LIVENESS_PROXY_RATE_LIMIT_RESULT": "1000000/minute",
    "LIVENESS_PROXY_DAILY_ATTEMPTS": "1000000",
}


# -- a `serve` subprocess -----------------------------------------------------------------------------


@dataclass
class Serve:
    """A running `liveness-proxy serve`, its environment, and an API key for subject alice."""

    process: subprocess.Popen[bytes]
    port: int
    url: str
    env: dict[str, str]
    key: str
    output: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def output_text(self) -> str:
        return self.output.read_text(errors="replace")


def issue_key(env: dict[str, str], subject: str = "alice") -> str:
    """An API key in the database `env` names, issued in-process (the schema is migrated first)."""
    settings = settings_from_mapping(
        {name: value for name, value in env.items() if name.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))}
    )
    return asyncio.run(issue_keys(settings, [(subject, subject, [])]))[subject].key


def wait_ready(url: str, process: subprocess.Popen[bytes], **client_options: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve exited during start-up with {process.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2, **client_options).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("serve did not become ready")


@contextlib.contextmanager
def running_serve(
    env: dict[str, str], folder: Path, *args: str, scheme: str = "http", **client_options: Any
) -> Iterator[Serve]:
    """`serve` on a free port until the block ends; then SIGTERM, and its output is checked for
    secrets (the API key, client secret, tokens)."""
    key = issue_key(env)
    port = free_port()
    output = folder / f"serve-{port}.log"
    url = f"{scheme}://127.0.0.1:{port}"
    with background_command(
        [COMMAND, "serve", "--port", str(port), *args], env=env, output=output
    ) as process:
        wait_ready(url, process, **client_options)
        yield Serve(process=process, port=port, url=url, env=env, key=key, output=output)
    text = output.read_text(errors="replace")
    assert key not in text
    assert not find_leaks(text), find_leaks(text)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    upstream = upstream_sandbox()
    server = ServerThread(upstream.app, lifespan="off").start()
    yield upstream, server.url
    server.stop()


def limits_env(upstream_url: str, folder: Path, **extra: str) -> dict[str, str]:
    settings = {
        "LIVENESS_PROXY_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_SECONDS),
        "LIVENESS_PROXY_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS),
        "LIVENESS_PROXY_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "LIVENESS_PROXY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        # The bodies here are padded to test sizes: a member the operator lets through.
        "LIVENESS_PROXY_EXTRA_BODY_FIELDS": "padding",
        **HIGH_LIMITS,
        **extra,
    }
    return subprocess_env(upstream_url, folder / "proxy.db", **settings)


@pytest.fixture(scope="module")
def serve(sandbox: tuple[Sandbox, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    folder = tmp_path_factory.mktemp("serve-limits")
    with running_serve(limits_env(sandbox[1], folder), folder) as running:
        yield running


# -- raw HTTP/1.1 ----------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/problem+json"
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


@dataclass
class RawConnection:
    """One client socket and what it has received but not yet parsed."""

    sock: socket.socket
    buffer: bytes = b""
    sent: int = 0

    @classmethod
    def open(cls, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> RawConnection:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _fill(self) -> bool:
        """Reads what the server sent; False at end of stream (a reset counts as its end too)."""
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        self.buffer += chunk
        return bool(chunk)

    def read_response(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"the server closed the connection without an answer: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "the server closed the connection in the middle of a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(status=int(status_line.split(" ")[1]), headers=headers, body=body)

    def closed_by_server(self) -> bool:
        """True when the server closed the connection (within the socket timeout) sending nothing more."""
        return not self.buffer and not self._fill()

    def trickle(self, data: bytes, interval: float = TRICKLE_INTERVAL_SECONDS) -> RawResponse | None:
        """Sends `data` one byte per `interval`, as a slow-loris client does, and stops as soon as the
        server answers or closes; returns that answer (None if the server only closed)."""
        for byte in data:
            try:
                self.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([self.sock], [], [], interval)
            if readable:
                break
        if not self.buffer and not self._fill():
            return None
        return self.read_response()


def request_head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_refusal(response: RawResponse | None, status: int, slug: str) -> dict[str, Any]:
    """A problem+json answer written by the protocol itself: id, security headers, close."""
    assert response is not None, f"expected {status}, the server closed without an answer"
    assert response.status == status, response
    problem = response.problem()
    assert problem["type"] == f"urn:liveness-proxy:problem:{slug}"
    assert problem["status"] == status
    assert REQUEST_ID.fullmatch(problem["request_id"])
    assert response.headers["x-request-id"] == problem["request_id"]
    assert response.headers["connection"] == "close"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    return problem


# -- a well-behaved client, meanwhile ---------------------------------------------------------------


@dataclass
class PoliteClient:
    """Sends ordinary requests in a thread (health checks and real upstream calls, on one keep-alive
    connection) until stopped; records every status, and every error."""

    url: str
    auth: dict[str, str]
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.auth, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    self.statuses.append(client.get("/healthz").status_code)
                    self.statuses.append(client.post(SESSION_TOKEN).status_code)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                self._stop.wait(0.02)

    def __enter__(self) -> PoliteClient:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=15)

    def assert_served(self) -> None:
        assert not self.errors, self.errors[:3]
        assert self.statuses, "the polite client sent nothing"
        assert set(self.statuses) == {200}, sorted(set(self.statuses))
        # Requests went on while the slow clients were connected, not one before them and one after.
        assert len(self.statuses) >= 10, self.statuses


# -- head deadline ----------------------------------------------------------------------------------


def test_slow_loris_heads_get_408_and_are_closed_while_others_are_served(serve: Serve) -> None:
    head = request_head("GET", "/healthz", "X-Slow: " + "a" * 40)
    slow = [RawConnection.open(serve.port) for _ in range(6)]
    answers: list[RawResponse | None] = [None] * len(slow)

    def slow_client(index: int) -> None:
        answers[index] = slow[index].trickle(head)

    threads = [threading.Thread(target=slow_client, args=(index,)) for index in range(len(slow))]
    with PoliteClient(serve.url, serve.auth) as polite:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    polite.assert_served()
    for connection, answer in zip(slow, answers, strict=True):
        problem = assert_refusal(answer, 408, "request-timeout")
        assert "head" in problem["detail"]
        # Cut by the server: the client was nowhere near the end of its head.
        assert connection.sent < len(head) // 2, connection.sent
        assert connection.closed_by_server()
        connection.close()


def test_a_connection_that_sends_nothing_is_closed_silently(serve: Serve) -> None:
    idle = RawConnection.open(serve.port)
    assert idle.closed_by_server(), "an idle connection was kept open"
    idle.close()


def test_a_keep_alive_connection_is_closed_after_an_idle_wait(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(request_head("GET", "/healthz"))
    assert connection.read_response().status == 200
    # Then nothing: the next head never starts. No answer, only the close.
    assert connection.closed_by_server()
    connection.close()


def test_a_keep_alive_connection_serves_requests_sent_in_one_piece(serve: Serve) -> None:
    """The deadline is per head, not per connection: a connection used for longer than the head
    timeout, request after request, is served throughout."""
    connection = RawConnection.open(serve.port)
    started = time.monotonic()
    answered = 0
    while time.monotonic() - started < HEADER_TIMEOUT_SECONDS * 2:
        connection.send(request_head("GET", "/healthz"))
        assert connection.read_response().status == 200
        answered += 1
        time.sleep(HEADER_TIMEOUT_SECONDS / 4)
    assert answered >= 4
    connection.close()


# -- head size --------------------------------------------------------------------------------------


def test_a_head_over_the_limit_gets_431_and_is_closed(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(request_head("GET", "/healthz", "X-Pad: " + "a" * MAX_HEADER_BYTES))
    assert_refusal(connection.read_response(), 431, "request-header-fields-too-large")
    assert connection.closed_by_server()
    connection.close()


def test_a_head_that_never_ends_is_cut_at_the_limit(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    answer = None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(64):  # 64 KiB if nobody stopped it; the limit is 4 KiB
            connection.send(b"a" * 1024)
            readable, _, _ = select.select([connection.sock], [], [], 0.05)
            if readable:
                break
    answer = connection.read_response()
    assert_refusal(answer, 431, "request-header-fields-too-large")
    assert connection.sent <= MAX_HEADER_BYTES + 4 * 1024, connection.sent
    connection.close()


def still_open_after(connection: RawConnection, seconds: float) -> bool:
    connection.sock.settimeout(seconds)
    try:
        return not connection.closed_by_server()
    except TimeoutError:
        return True


def test_trailers_after_a_chunked_body_are_bounded_like_a_head(serve: Serve) -> None:
    # Trailer fields arrive after the head was measured; uvicorn would keep every one of them in
    # the request's headers. Without credentials: anyone could do this.
    connection = RawConnection.open(serve.port)
    trailers = b"".join(b"X-Trailer-%d: %s\r\n" % (number, b"t" * 100) for number in range(100))
    connection.send(
        request_head("POST", SESSION_TOKEN, "Content-Type: application/json", "Transfer-Encoding: chunked")
        + b"2\r\n{}\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    # Refused in place of the request's answer (test_serve_abuse.py: also when the app waits for
    # the body's end), and the connection ends.
    assert_refusal(connection.read_response(), 431, "request-header-fields-too-large")
    assert not still_open_after(connection, 3)
    connection.close()


def test_a_refusal_never_cuts_into_the_answer_of_a_pipelined_request_before_it(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(
        request_head("GET", "/healthz") + request_head("GET", "/healthz", "X-Pad: " + "a" * MAX_HEADER_BYTES)
    )
    first = connection.read_response()
    assert first.status == 200, first
    assert first.body == b'{"status":"ok"}'
    assert first.headers["connection"] == "close"
    assert not still_open_after(connection, 3)
    connection.close()


def test_a_head_under_the_limit_is_served(serve: Serve) -> None:
    # A large but legitimate head (a long JWT, say): the limit leaves room for it.
    connection = RawConnection.open(serve.port)
    connection.send(request_head("GET", "/healthz", "X-Pad: " + "a" * (MAX_HEADER_BYTES - 200)))
    assert connection.read_response().status == 200
    connection.close()


def test_an_unparsable_request_gets_a_400_problem(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
    assert_refusal(connection.read_response(), 400, "bad-request")
    connection.close()


# -- body deadline and size -------------------------------------------------------------------------


def authorized_head(serve: Serve, *headers: str) -> bytes:
    return request_head(
        "POST",
        SESSION_TOKEN,
        f"Authorization: Bearer {serve.key}",
        "Content-Type: application/json",
        *headers,
    )


def test_a_slow_body_gets_408_and_the_connection_is_closed(serve: Serve) -> None:
    body = b'{"padding": "' + b"a" * 60 + b'"}'
    slow = RawConnection.open(serve.port)
    slow.send(authorized_head(serve, f"Content-Length: {len(body)}"))
    with PoliteClient(serve.url, serve.auth) as polite:
        answer = slow.trickle(body)
    polite.assert_served()
    assert answer is not None
    assert answer.status == 408
    problem = answer.problem()
    assert problem["type"] == "urn:liveness-proxy:problem:request-timeout"
    assert "body" in problem["detail"]
    assert answer.headers["connection"] == "close"
    assert answer.headers["x-request-id"] == problem["request_id"]
    assert slow.sent < len(authorized_head(serve)) + len(body) // 2
    assert slow.closed_by_server()
    slow.close()


@pytest.mark.served
def test_the_body_deadline_holds_in_library_mode_too(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    """The body deadline is the app's own: an app served by any server (here uvicorn's stock
    protocol) has it, and the refusal has its audit record like any answer."""
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_BODY_TIMEOUT_SECONDS": 0.5}) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        slow = RawConnection.open(port)
        body = b'{"padding": "' + b"a" * 60 + b'"}'
        slow.send(
            request_head(
                "POST",
                SESSION_TOKEN,
                f"Authorization: Bearer {proxy.keys.alice}",
                "Content-Type: application/json",
                "X-Request-ID: slow-body-in-library-mode",
                f"Content-Length: {len(body)}",
            )
        )
        answer = slow.trickle(body)
        assert answer is not None
        assert answer.status == 408
        assert answer.problem()["request_id"] == "slow-body-in-library-mode"
        slow.close()
        rows = [row for row in proxy.audit_rows() if row["request_id"] == "slow-body-in-library-mode"]
        assert [(row["status"], row["problem"]) for row in rows] == [(408, "request-timeout")]


def test_a_body_declared_too_large_gets_413_before_it_is_sent(serve: Serve) -> None:
    connection = RawConnection.open(serve.port)
    connection.send(authorized_head(serve, f"Content-Length: {10 * 1024 * 1024}") + b"{" + b" " * 1023)
    answer = connection.read_response()
    assert answer.status == 413
    assert answer.problem()["type"] == "urn:liveness-proxy:problem:payload-too-large"
    connection.close()


def test_a_chunked_body_over_the_limit_gets_413(serve: Serve) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"padding": "'
        for _ in range(4 * MAX_BODY_BYTES // 1024):
            yield b"a" * 1024
        yield b'"}'

    response = httpx.post(
        f"{serve.url}{SESSION_TOKEN}",
        headers={**serve.auth, "Content-Type": "application/json"},
        content=chunks(),  # no Content-Length: sent with Transfer-Encoding: chunked
        timeout=10,
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert response.json()["type"] == "urn:liveness-proxy:problem:payload-too-large"


def test_a_body_within_the_limits_is_served(serve: Serve) -> None:
    response = httpx.post(
        f"{serve.url}{SESSION_TOKEN}", headers=serve.auth, json={"padding": "a" * 1000}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert "strict-transport-security" not in response.headers  # only over TLS


# -- connections ------------------------------------------------------------------------------------

MAX_CONNECTIONS = 3


@pytest.mark.slow
def test_connections_beyond_the_limit_get_503_while_admitted_ones_finish(
    sandbox: tuple[Sandbox, str], tmp_path: Path
) -> None:
    # Admitted connections wait idle here for longer than the usual 1 s head deadline of these tests.
    env = limits_env(
        sandbox[1],
        tmp_path,
        LIVENESS_PROXY_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        LIVENESS_PROXY_HEADER_TIMEOUT_SECONDS="10",
    )
    with running_serve(env, tmp_path) as serve:
        time.sleep(0.3)  # the readiness probe's connections are gone from the server's count
        admitted = [RawConnection.open(serve.port) for _ in range(MAX_CONNECTIONS)]
        for connection in admitted:
            connection.send(request_head("GET", "/healthz"))
            assert connection.read_response().status == 200
        # One admitted connection has a request in flight (a slow upstream) when the next one comes.
        sandbox[0].inject_fault(Fault(target="session_token", kind="latency", delay_seconds=1.5))
        admitted[0].send(authorized_head(serve, "Content-Length: 2") + b"{}")
        time.sleep(0.3)
        extra = RawConnection.open(serve.port)
        extra.send(request_head("GET", "/healthz"))
        answer = extra.read_response()
        problem = assert_refusal(answer, 503, "service-unavailable")
        assert answer.headers["retry-after"] == "1"
        assert "connection limit" in problem["detail"]
        assert extra.closed_by_server()
        extra.close()
        # The admitted ones are not affected: the slow request finishes, the others keep working.
        slow_answer = admitted[0].read_response()
        assert slow_answer.status == 200, slow_answer
        for connection in admitted[1:]:
            connection.send(request_head("GET", "/healthz"))
            assert connection.read_response().status == 200
        # Once admitted connections go away, new ones are admitted again.
        admitted[2].close()
        time.sleep(0.3)
        again = RawConnection.open(serve.port)
        again.send(request_head("GET", "/healthz"))
        assert again.read_response().status == 200
        for connection in (*admitted[:2], again):
            connection.close()


# -- configuration ----------------------------------------------------------------------------------


def test_the_settings_reach_uvicorn_and_the_protocol() -> None:
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_MAX_CONNECTIONS": 7,
            "LIVENESS_PROXY_MAX_HEADER_BYTES": 2048,
            "LIVENESS_PROXY_HEADER_TIMEOUT_SECONDS": 3.5,
            "LIVENESS_PROXY_KEEPALIVE_TIMEOUT_SECONDS": 2.5,
            "LIVENESS_PROXY_SHUTDOWN_TIMEOUT_SECONDS": 4.5,
            "LIVENESS_PROXY_SEND_TIMEOUT_SECONDS": 6.5,
            "LIVENESS_PROXY_MAX_PIPELINED_REQUESTS": 5,
        }
    )
    options = uvicorn_options(serve_options(settings), None)
    assert options["timeout_keep_alive"] == 2.5
    assert options["timeout_graceful_shutdown"] == 4.5
    assert "ssl_certfile" not in options
    protocol = options["http"]
    assert protocol.func is LimitedHttpToolsProtocol
    assert protocol.keywords == {
        "limits": ServeLimits(
            max_connections=7,
            max_header_bytes=2048,
            header_timeout_seconds=3.5,
            hsts_max_age_seconds=settings.liveness_proxy_hsts_max_age_seconds,
            send_timeout_seconds=6.5,
            max_pipelined_requests=5,
        )
    }
    # `--workers N` pickles uvicorn's config, this included, to each spawned worker.
    assert pickle.loads(pickle.dumps(protocol)).keywords == protocol.keywords  # noqa: S301 - our own bytes
