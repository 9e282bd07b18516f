"""One keep-alive HTTP/1.1 connection of an `Http1Pool` (http1.py): an asyncio protocol that writes a
request and parses the answer with httptools, bounded in size while it arrives.

Kept apart from the pool so each stays readable; the pool is its only user. The httptools callbacks
must not raise (the parser would lose its state): they record a failure, and `data_received`
decides what it means.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, cast

import httptools

from liveness_proxy.http.base import HttpResponse
from liveness_proxy.http.errors import (
    ConnectionClosed,
    HttpError,
    MalformedResponse,
    ResponseTooLarge,
    Timeout,
)

# Bounds a hostile or broken upstream cannot push past: the whole header block, and header count.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
# What may arrive before the head is complete: the header block plus the status line, with room.
_MAX_HEAD_READ = MAX_HEADER_BYTES + 1024


class ConnectionOwner(Protocol):
    """What a connection tells its pool."""

    def _release(self, connection: Connection) -> None:
        """The exchange is over and the connection may serve another one."""

    def _forget(self, connection: Connection) -> None:
        """The connection is closed."""

    def _tls_failed(self, exc: ssl.SSLError) -> object:
        """A TLS alert arrived after the handshake."""


class Connection(asyncio.Protocol):
    """One keep-alive connection: at most one exchange at a time."""

    def __init__(self, pool: ConnectionOwner) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[HttpResponse] | None = None
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
        self._failure: HttpError | None = None
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
            self._fail(MalformedResponse("the upstream switched protocols"))
            return
        except httptools.HttpParserError:
            if self._failure is None:  # a callback below stopped the parser on purpose
                self._failure = MalformedResponse("the upstream sent a malformed HTTP answer")
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
        error = ConnectionClosed("the upstream closed the connection")
        error.__cause__ = exc
        self._fail(error)

    # -- httptools callbacks (they must not raise: they record, data_received decides) ---------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._stop(MalformedResponse("the upstream sent more than one answer"))

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

    async def exchange(self, request: bytes, limit: int, deadline: float) -> HttpResponse:
        transport = self.transport
        if transport is None:  # create_connection hands over connected protocols only
            raise ConnectionClosed("the connection was never made")
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
            response: HttpResponse = await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                # Abandoned mid-exchange: the connection's state is unknown, so it goes. (If the
                # answer had already arrived, the connection is back in the pool, maybe serving
                # another request by now: it must not be touched.)
                self._cancel_timer()
                self.close()
            raise
        return response

    def _time_out(self, waiter: asyncio.Future[HttpResponse]) -> None:
        if waiter is not self._waiter or waiter.done():
            return  # that exchange is over; the connection may be serving another one
        # The connection goes with the exchange: a late answer must not be read as the next one's.
        self._fail(Timeout("the upstream did not answer in time"))

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

    def _stop(self, error: HttpError) -> None:
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
        response = HttpResponse(self._status, tuple(self._headers), bytes(self._body))
        self._body = bytearray()
        if not waiter.done():
            waiter.set_result(response)
        if self._keep_alive and not self.closed:
            self._pool._release(self)
        else:
            self.close()
