"""The HTTP/1.1 client of every outbound call: `Http1Pool` (keep-alive connections to one origin) and
`Http1Transport` (the `HttpTransport` of http/base.py, one pool per origin).

Why not aiohttp: profiled under load (docs/performance.md), aiohttp's `ClientSession.request` cost
about a third of the proxy's CPU per proxied request (request and response objects, header merging,
tracing hooks, timer contexts). This client writes one pre-assembled request and parses the answer
with httptools (llhttp, the parser uvicorn already uses for our own server side). The rare calls
(access tokens, JWKS) use it too, so there is one HTTP stack with one set of rules and errors.

The scope is small on purpose: HTTP/1.1; keep-alive with an idle limit; Content-Length, chunked and
close-delimited bodies, bounded in size while they arrive; no redirects (an `Authorization` header
must not travel to a host we did not configure), no proxies from the environment, no cookies, no
compression (`Accept-Encoding: identity` is sent; an encoded answer is refused by the transport);
TLS with the verifying context it is given (upstream/tls.py for Cynopsis; the system trust store
otherwise), the handshake bounded by the connect timeout, SNI and the hostname check on the
origin's host. A GET that fails on a reused keep-alive connection before any byte of the answer
arrived is sent once more on a new connection (RFC 9112 section 9.3.1: the server may have closed it
just as we wrote); any other request is never sent twice.

Errors are those of http/errors.py: `ConnectError` (nothing was sent; `TlsError` for a failed
handshake), `ConnectionClosed` and `MalformedResponse` (the exchange broke), `ResponseTooLarge`,
`Timeout` (the whole exchange over its time). A TLS failure is also told to the pool's
`on_tls_failure` (a log-safe description), so that an untrusted certificate is logged as such and
not only counted as a connect error.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from urllib.parse import urlsplit

from liveness_proxy.http._connection import MAX_HEADER_BYTES, MAX_HEADERS, Connection
from liveness_proxy.http.base import USER_AGENT, HttpResponse, Url, refuse_encoded, system_ssl_context
from liveness_proxy.http.errors import (
    ConnectError,
    ExchangeError,
    Timeout,
    TlsError,
    describe_tls_failure,
)

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "Http1Pool", "Http1Transport"]

_UNSAFE_IN_VALUE = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
# Idle connections are dropped before the shortest idle timeout common servers use (5 s: uvicorn,
# Node.js; nginx and cloud balancers wait 60 s or more). Otherwise a request can go out on a
# connection the server is closing at that moment, and a POST cannot be re-sent safely: the caller
# would get a 502 for a race. Under load connections are never idle that long, so this costs a
# reconnect only after a quiet spell.
KEEPALIVE_SECONDS = 4.0


class Http1Pool:
    """Keep-alive connections to one origin (`http://host:port` or `https://host:port`), at most
    `max_connections` open at once; callers beyond that wait for one to be released."""

    def __init__(
        self,
        origin: str,
        *,
        max_connections: int,
        connect_timeout_seconds: float,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        user_agent: str = USER_AGENT,
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
            self._ssl = ssl_context if ssl_context is not None else system_ssl_context()
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
        self._idle: deque[Connection] = deque()
        self._open: set[Connection] = set()
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
    ) -> HttpResponse:
        """One exchange, over in `timeout_seconds` (waiting for a connection, connecting, sending and
        receiving, and the one resend included) or `Timeout`. `target` is the path (and query),
        already safe to send as it is.

        The deadline is one timer on the event loop, armed per exchange: asyncio.timeout() around
        every call cost ~8% of a proxied request (profiled), for the same guarantee."""
        request = self._serialize(method, target, headers, body)
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        connection = self._take_idle() or await self._acquire(deadline)
        try:
            return await connection.exchange(request, max_body_bytes, deadline)
        except ExchangeError:
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
                waiter.set_exception(ConnectError("the connection pool is closed"))

    # -- pool internals --------------------------------------------------------------------------------

    def _serialize(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed_headers]
        for name, value in headers:
            # A value from elsewhere (an access token the token endpoint sent) must not be able to
            # end the header line and add headers or a second request of its own.
            if _UNSAFE_IN_VALUE.search(value) or not _HEADER_NAME.fullmatch(name):
                raise ConnectError(f"refusing to send header {name!r}: it contains a control character")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
            try:
                return "".join(lines).encode("latin-1") + body
            except UnicodeEncodeError:
                raise ConnectError("refusing to send a header that is not latin-1") from None
        lines.append("\r\n")
        try:
            return "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ConnectError("refusing to send a header that is not latin-1") from None

    async def _acquire(self, deadline: float, *, fresh: bool = False) -> Connection:
        try:
            return await self._acquire_by(deadline, fresh=fresh)
        except TimeoutError as exc:
            # asyncio.timeout_at's own TimeoutError: no connection (or none in time) before the deadline.
            raise Timeout("no connection to the upstream in time") from exc

    async def _acquire_by(self, deadline: float, *, fresh: bool) -> Connection:
        async with asyncio.timeout_at(deadline):
            while True:
                if self._closed:
                    raise ConnectError("the connection pool is closed")
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

    def _take_idle(self) -> Connection | None:
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

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        made: Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._ssl is None:
                    _transport, made = await loop.create_connection(
                        lambda: Connection(self), self._host, self._port
                    )
                else:
                    # SNI and the hostname check use the configured host, whatever address it
                    # resolved to; the handshake is part of connecting and shares its timeout
                    # (asyncio's own default is 60 s).
                    _transport, made = await loop.create_connection(
                        lambda: Connection(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host,
                        ssl_handshake_timeout=self._connect_timeout,
                    )
        except ssl.SSLError as exc:  # an untrusted certificate, a wrong host name, no common protocol
            raise TlsError(self._tls_failed(exc)) from exc
        except OSError as exc:  # refused, unreachable, name not resolved, timed out
            raise ConnectError(f"cannot connect to the upstream ({type(exc).__name__})") from exc
        finally:
            self._connecting -= 1
            if made is None:
                self._wake_one()  # the slot this attempt held is free again: a waiter may use it
        connection = made
        if self._closed:
            connection.close()
            raise ConnectError("the connection pool is closed")
        self._open.add(connection)
        return connection

    def _tls_failed(self, exc: ssl.SSLError) -> str:
        description = describe_tls_failure(exc)
        if self._on_tls_failure is not None:
            self._on_tls_failure(description)
        return description

    def _release(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        # Idle connections past their time are closed as others come back, oldest first.
        while self._idle and connection.idle_since - self._idle[0].idle_since > self._keepalive_seconds:
            self._idle.popleft().close()
        self._wake_one()

    def _forget(self, connection: Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Http1Transport:
    """The `HttpTransport` (http/base.py) over `Http1Pool`s: one per origin, made on first use.

    Every pool shares this transport's settings: one TLS context (so the Cynopsis calls and the JWKS
    fetch, which trust different CAs, use transports of their own), at most `max_connections` per
    origin, the connect timeout, the keep-alive limit. Origins come from configuration, so a few are
    all there ever are: past `max_origins` a request to a new one is refused (`ConnectError`)
    rather than growing the map, should a URL ever come from anywhere else.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str], None] | None = None,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        user_agent: str = USER_AGENT,
        max_origins: int = 4,
    ) -> None:
        """`ssl_context` verifies https origins (the system's trust store if None: `system_ssl_context`);
        `on_tls_failure` hears a log-safe description of every failed TLS handshake or TLS alert."""
        self._ssl = ssl_context if ssl_context is not None else system_ssl_context()
        self._on_tls_failure = on_tls_failure
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout_seconds
        self._keepalive_seconds = keepalive_seconds
        self._user_agent = user_agent
        self._max_origins = max_origins
        self._pools: dict[str, Http1Pool] = {}
        self._closed = False

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
        pool = self._pools.get(url.origin) or self._new_pool(url.origin)
        response = await pool.request(
            method, url.target, headers, body, max_body_bytes=max_body_bytes, timeout_seconds=timeout_seconds
        )
        return refuse_encoded(response)

    def pool(self, origin: str) -> Http1Pool | None:
        """The pool of `origin`, if one was made (e.g. to look at its open connections)."""
        return self._pools.get(origin)

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.close()

    async def __aenter__(self) -> Http1Transport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _new_pool(self, origin: str) -> Http1Pool:
        if self._closed:
            raise ConnectError("the transport is closed")
        if len(self._pools) >= self._max_origins:
            raise ConnectError(f"refusing a connection pool for more than {self._max_origins} origins")
        try:
            pool = Http1Pool(
                origin,
                max_connections=self._max_connections,
                connect_timeout_seconds=self._connect_timeout,
                keepalive_seconds=self._keepalive_seconds,
                user_agent=self._user_agent,
                ssl_context=self._ssl,
                on_tls_failure=self._on_tls_failure,
            )
        except ValueError as exc:
            raise ConnectError(str(exc)) from None
        self._pools[origin] = pool
        return pool
