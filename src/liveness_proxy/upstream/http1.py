"""A lean HTTP/1.1 client for the three liveness calls, the path every caller's request takes.

Why not aiohttp here: profiled under load (docs/performance.md), aiohttp's `ClientSession.request`
cost about a third of the proxy's CPU per proxied request (request and response objects, header
merging, tracing hooks, timer contexts). This client writes one pre-assembled request and parses the
answer with httptools (llhttp, the parser uvicorn already uses for our own server side). aiohttp still
fetches access tokens and JWKS, which are rare.

The scope is small on purpose: HTTP/1.1 to one origin per pool; keep-alive with an idle limit;
Content-Length, chunked and close-delimited bodies, bounded in size while they arrive; no redirects,
proxies, cookies or compression (`Accept-Encoding: identity` is sent; an encoded answer is refused);
TLS with the verifying context it is given (upstream/tls.py; the system trust store by default), the
handshake bounded by the connect timeout, SNI and the hostname check on the origin's host. A GET
that fails on a reused keep-alive connection before any byte of the answer arrived is sent once
more on a new connection (RFC 9112 section 9.3.1: the server may have closed it just as we wrote);
any other request is never sent twice.

Errors: `Http1ConnectError` (nothing was sent: refused, unreachable, TLS failure, connect timeout),
`Http1ConnectionError` (the exchange broke: reset, early close, a malformed answer), `ResponseTooLarge`
(over the size limit), `TimeoutError` (the whole exchange over its time). A TLS failure is also told to
the pool's `on_tls_failure` (a log-safe description), so that an untrusted certificate is logged as
such and not only counted as a connect error.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from liveness_proxy.upstream.tls import describe_tls_failure

# Bounds a hostile or broken upstream cannot push past: the whole header block, and header count.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
# What may arrive before the head is complete: the header block plus the status line, with room.
_MAX_HEAD_READ = MAX_HEADER_BYTES + 1024
_UNSAFE_IN_VALUE = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


class Http1Error(Exception):
    """Base of this module's errors."""


class Http1ConnectError(Http1Error):
    """No connection could be made: the request was not sent."""


class Http1ConnectionError(Http1Error):
    """The exchange failed after the connection was made."""


class ResponseTooLarge(Http1Error):
    """The answer's headers or body exceed the configured limits."""

    def __init__(self, status: int) -> None:
        super().__init__(f"response too large (HTTP {status})")
        self.status = status


@dataclass(frozen=True, slots=True)
class Http1Response:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower-case bytes), decoded as latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one exchange at a time."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Http1Response] | None = None
        self._limit = 0
        self._received = 0
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._headers_done = False
        self._body = bytearray()
        self._body_bytes = 0
        self._head_received = 0
        self._timer: asyncio.TimerHandle | None = None
        self._failure: Http1Error | None = None
        self._complete = False
        self._keep_alive = False

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection hands over a stream transport (uvloop's is not an asyncio.Transport
        # subclass, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Nothing was asked: a server that talks out of turn (a late 408, say) is not trusted
            # with the next request.
            self.close()
            return
        self._received += len(data)
        if not self._headers_done:
            self._head_received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Http1ConnectionError("the upstream switched protocols"))
            return
        except httptools.HttpParserError:
            if self._failure is None:  # a callback below stopped the parser on purpose
                self._failure = Http1ConnectionError("the upstream sent a malformed HTTP answer")
        if self._failure is None and not self._headers_done and self._head_received > _MAX_HEAD_READ:
            # httptools buffers a header line until it ends and reports it only then: without this
            # a header that never ends would grow (and be re-copied) until the deadline.
            self._failure = ResponseTooLarge(self._parser.get_status_code())
        if self._failure is not None:
            self._fail(self._failure)
        elif self._complete:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._headers_done and not self._complete and self._close_delimited():
            # A body without Content-Length or chunking ends where the connection does (a clean
            # close only: a reset cuts the body short).
            self._complete = True
            self._keep_alive = False
            self._finish()
            return
        if isinstance(exc, ssl.SSLError):
            # E.g. a TLS 1.3 server that refuses our client certificate (or its absence) only after
            # the handshake: the alert arrives with the answer.
            self._pool._tls_failed(exc)
        error = Http1ConnectionError("the upstream closed the connection")
        error.__cause__ = exc
        self._fail(error)

    # -- httptools callbacks (they must not raise: they record, data_received decides) ---------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._stop(Http1ConnectionError("the upstream sent more than one answer"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADERS:
            self._stop(ResponseTooLarge(self._parser.get_status_code()))
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        for name, value in self._headers:
            # A body announced as too large is refused now, not after buffering up to the limit
            # (measured: 4 MiB held per call while the rest arrived).
            # (More than 18 digits is over any limit, and int() refuses thousands of them.)
            if (
                name == b"content-length"
                and value.isdigit()
                and (len(value) > 18 or int(value) > self._limit)
            ):
                self._stop(ResponseTooLarge(self._status))
                return

    def on_body(self, body: bytes) -> None:
        if self._failure is not None:
            return  # refused already: keep nothing more
        self._body_bytes += len(body)
        if self._body_bytes > self._limit:
            self._stop(ResponseTooLarge(self._status))
            return
        self._body += body  # one buffer: many tiny chunks must not cost an object each

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim answer (we never send Expect, but a server may): the real one follows.
            self._headers.clear()
            self._header_bytes = 0
            self._head_received = 0
            self._headers_done = False
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()

    # -- the exchange ---------------------------------------------------------------------------------

    async def exchange(self, request: bytes, limit: int, deadline: float) -> Http1Response:
        transport = self.transport
        if transport is None:  # create_connection hands over connected protocols only
            raise Http1ConnectionError("the connection was never made")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        # One plain loop timer, not `asyncio.timeout()`: its bookkeeping was ~8% of a proxied request
        # (measured, docs/performance.md).
        self._timer = loop.call_at(deadline, self._time_out, waiter)
        self._limit = limit
        self._received = 0
        self._status = 0
        self._headers = []
        self._header_bytes = 0
        self._headers_done = False
        self._head_received = 0
        self._body = bytearray()
        self._body_bytes = 0
        self._failure = None
        self._complete = False
        self._keep_alive = False
        transport.write(request)
        try:
            response: Http1Response = await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                # Abandoned mid-exchange: the connection's state is unknown, so it goes. (If the
                # answer had already arrived, the connection is back in the pool, maybe serving
                # another request by now: it must not be touched.)
                self._cancel_timer()
                self.close()
            raise
        return response

    def _time_out(self, waiter: asyncio.Future[Http1Response]) -> None:
        if waiter is not self._waiter or waiter.done():
            return  # that exchange is over; the connection may be serving another one
        # The connection goes with the exchange: a late answer must not be read as the next one's.
        self._fail(TimeoutError("the upstream did not answer in time"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def received_nothing(self) -> bool:
        return self._received == 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self._pool._forget(self)

    def _close_delimited(self) -> bool:
        if self._status in (204, 304):
            return False
        names = {name for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _stop(self, error: Http1Error) -> None:
        if self._failure is None:
            self._failure = error

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        waiter = self._waiter
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is None:  # both callers return before this when nothing was asked
            self.close()
            return
        self._cancel_timer()
        response = Http1Response(self._status, tuple(self._headers), bytes(self._body))
        self._body = bytearray()
        if not waiter.done():
            waiter.set_result(response)
        if self._keep_alive and not self.closed:
            self._pool._release(self)
        else:
            self.close()


class Http1Pool:
    """Keep-alive connections to one origin (`http://host:port` or `https://host:port`), at most
    `max_connections` open at once; callers beyond that wait for one to be released."""

    def __init__(
        self,
        origin: str,
        *,
        max_connections: int,
        connect_timeout_seconds: float,
        keepalive_seconds: float = 4.0,
        user_agent: str = "liveness-proxy",
        ssl_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str], None] | None = None,
    ) -> None:
        """`ssl_context` is used for an https origin (a default verifying context if None);
        `on_tls_failure` hears a log-safe description of every failed TLS handshake or TLS alert."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context if ssl_context is not None else ssl.create_default_context()
        self._on_tls_failure = on_tls_failure
        default_port = (parts.scheme == "https" and self._port == 443) or (
            parts.scheme == "http" and self._port == 80
        )
        host = f"[{self._host}]" if ":" in self._host else self._host
        host_header = host if default_port else f"{host}:{self._port}"
        self._fixed_headers = (
            f"Host: {host_header}\r\nUser-Agent: {user_agent}\r\nAccept-Encoding: identity\r\n"
        )
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout_seconds
        self._keepalive_seconds = keepalive_seconds
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open) + self._connecting

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        *,
        max_body_bytes: int,
        timeout_seconds: float,
    ) -> Http1Response:
        """One exchange, over in `timeout_seconds` (waiting for a connection, connecting, sending and
        receiving, and the one resend included) or TimeoutError. `target` is the path (and query),
        already safe to send as it is.

        The deadline is one timer on the event loop, armed per exchange: asyncio.timeout() around
        every call cost ~8% of a proxied request (profiled), for the same guarantee."""
        request = self._serialize(method, target, headers, body)
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        connection = self._take_idle() or await self._acquire(deadline)
        try:
            return await connection.exchange(request, max_body_bytes, deadline)
        except Http1ConnectionError:
            if not (method == "GET" and connection.reused and connection.received_nothing):
                raise
        # The keep-alive connection was closed under us before any answer: once more, on a new one.
        connection = await self._acquire(deadline, fresh=True)
        return await connection.exchange(request, max_body_bytes, deadline)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(Http1ConnectError("the connection pool is closed"))

    # -- pool internals --------------------------------------------------------------------------------

    def _serialize(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed_headers]
        for name, value in headers:
            # A value from elsewhere (an access token the token endpoint sent) must not be able to
            # end the header line and add headers or a second request of its own.
            if _UNSAFE_IN_VALUE.search(value) or not _HEADER_NAME.fullmatch(name):
                raise Http1ConnectError(f"refusing to send header {name!r}: it contains a control character")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
            try:
                return "".join(lines).encode("latin-1") + body
            except UnicodeEncodeError:
                raise Http1ConnectError("refusing to send a header that is not latin-1") from None
        lines.append("\r\n")
        try:
            return "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise Http1ConnectError("refusing to send a header that is not latin-1") from None

    async def _acquire(self, deadline: float, *, fresh: bool = False) -> _Connection:
        async with asyncio.timeout_at(deadline):
            while True:
                if self._closed:
                    raise Http1ConnectError("the connection pool is closed")
                if not fresh:
                    connection = self._take_idle()
                    if connection is not None:
                        return connection
                if self.open_connections < self._max_connections:
                    return await self._connect()
                if fresh and self._idle:
                    # At the limit: make room by dropping the idlest connection, then connect anew.
                    self._idle.popleft().close()
                    continue
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_one()  # we were handed a turn we will not use: pass it on
                    raise

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if connection.closed:
                continue
            if now - connection.idle_since > self._keepalive_seconds:
                connection.close()
                continue
            connection.reused = True
            return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        made: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._ssl is None:
                    _transport, made = await loop.create_connection(
                        lambda: _Connection(self), self._host, self._port
                    )
                else:
                    # SNI and the hostname check use the configured host, whatever address it
                    # resolved to; the handshake is part of connecting and shares its timeout
                    # (asyncio's own default is 60 s).
                    _transport, made = await loop.create_connection(
                        lambda: _Connection(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host,
                        ssl_handshake_timeout=self._connect_timeout,
                    )
        except ssl.SSLError as exc:  # an untrusted certificate, a wrong host name, no common protocol
            self._tls_failed(exc)
            raise Http1ConnectError(f"cannot connect to the upstream: {describe_tls_failure(exc)}") from exc
        except OSError as exc:  # refused, unreachable, name not resolved, timed out
            raise Http1ConnectError(f"cannot connect to the upstream ({type(exc).__name__})") from exc
        finally:
            self._connecting -= 1
            if made is None:
                self._wake_one()  # the slot this attempt held is free again: a waiter may use it
        connection = made
        if self._closed:
            connection.close()
            raise Http1ConnectError("the connection pool is closed")
        self._open.add(connection)
        return connection

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        if self._on_tls_failure is not None:
            self._on_tls_failure(describe_tls_failure(exc))

    def _release(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        # Idle connections past their time are closed as others come back, oldest first.
        while self._idle and connection.idle_since - self._idle[0].idle_since > self._keepalive_seconds:
            self._idle.popleft().close()
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
