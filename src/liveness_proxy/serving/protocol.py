"""What `serve` adds to uvicorn's protocol: limits on what one client may hold of the server.

uvicorn bounds neither the time a client may take to send its request head nor the head's size
(its httptools protocol buffers any head for as long as the client trickles it in), nor the time a
client may leave its answers unread, nor how many requests it may queue on one connection; and its
`limit_concurrency` answers plain text and counts every connection against every other. The
protocol class here is uvicorn's httptools protocol with:

- a head deadline: from the moment a connection is opened, or a response was sent on it, the next
  request head must be complete within LIVENESS_PROXY_HEADER_TIMEOUT_SECONDS. A partial head gets
  408 and the connection is closed; a connection with no byte of a new request is closed silently
  (a keep-alive client must be free to reconnect without seeing an error). uvicorn's keep-alive
  timer still runs, so an idle keep-alive connection lasts the shorter of the two timeouts.
- a head size limit: request line plus headers over LIVENESS_PROXY_MAX_HEADER_BYTES get 431 and
  the connection is closed (a head that never ends is cut as soon as the bytes exceed it).
- a connection limit: a connection opened while LIVENESS_PROXY_MAX_CONNECTIONS are already open
  answers its request with 503 and is closed; connections admitted earlier are served as usual.
- a send deadline: a connection whose answers pile up unread (uvicorn's flow control paused the
  app's writes: more than 64 KiB held back) for LIVENESS_PROXY_SEND_TIMEOUT_SECONDS is aborted, and
  on Linux the kernel gets the same time (TCP_USER_TIMEOUT) for the bytes it holds, which also
  covers answers handed over before the connection was closed. No answer can reach such a client,
  so none is attempted.
- a pipelining cap: a request that arrives while LIVENESS_PROXY_MAX_PIPELINED_REQUESTS already
  wait behind the one being answered is not read; the answers due are sent and the connection
  closes after the last of them.
- framing refused at once: a transfer coding other than `chunked` gets 400, and so does a body
  whose framing cannot be parsed, in place of the request's own answer when the app has not
  started one (the app would otherwise wait for the rest of the body until its body deadline).
- problem+json answers (with a fresh request id and the security headers) for these and for
  unparsable requests, instead of uvicorn's plain text.
- on SIGTERM, a request still running when LIVENESS_PROXY_SHUTDOWN_TIMEOUT_SECONDS has passed gets
  503 problem+json under its own request id just before uvicorn cancels it (uvicorn would answer a
  plain-text 500).

The request *body* deadline is the app's (`read_json_object`), so that library mode has it too.

This subclasses uvicorn internals (`HttpToolsProtocol` and its request cycle, uvicorn 0.54): an
upgrade of uvicorn must re-run tests/e2e/test_serve_limits.py, test_serve_abuse.py,
test_shutdown.py and test_tls_serve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from liveness_proxy.browser import SecurityHeaders
from liveness_proxy.errors import (
    BadRequest,
    ProblemError,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    problem_head,
    render_problem,
)
from liveness_proxy.middleware import new_request_id, request_id_of
from liveness_proxy.wiring import ServeOptions

# " HTTP/1.1\r\n" after the target; ": " and CRLF of each header field; the empty line at the end.
_REQUEST_LINE_TAIL_BYTES = 11
_HEADER_SEPARATOR_BYTES = 4
_HEAD_END_BYTES = 2
# The one transfer coding a request may declare: the app reads bodies as they are, so `gzip, chunked`
# would hand it compressed bytes as if they were JSON.
_CHUNKED = b"chunked"
# Linux only; elsewhere the send deadline covers what the server holds, not what the kernel does.
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


@dataclass(frozen=True, slots=True)
class ServeLimits:
    """What the protocol enforces per connection. Picklable: uvicorn hands it to spawned workers."""

    max_connections: int
    max_header_bytes: int
    header_timeout_seconds: float
    hsts_max_age_seconds: int
    send_timeout_seconds: float
    max_pipelined_requests: int

    @classmethod
    def from_options(cls, options: ServeOptions) -> ServeLimits:
        return cls(
            max_connections=options.max_connections,
            max_header_bytes=options.max_header_bytes,
            header_timeout_seconds=options.header_timeout_seconds,
            hsts_max_age_seconds=options.hsts_max_age_seconds,
            send_timeout_seconds=options.send_timeout_seconds,
            max_pipelined_requests=options.max_pipelined_requests,
        )


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head, send and body-framing limits of this module."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServeLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._security_headers = SecurityHeaders(hsts_max_age_seconds=limits.hsts_max_age_seconds)
        self._head_deadline: asyncio.TimerHandle | None = None
        # Between the end of one message (or the connection's start) and the end of the next head.
        self._awaiting_head = True
        self._head_started = False  # the parser saw the first byte of the awaited head
        self._head_bytes_received = 0  # raw bytes received while awaiting the head
        self._admitted = True
        self._trailer_bytes = 0  # trailer fields after the current chunked body (read by nobody)
        self._refused = False  # answered and closing: the parser's further callbacks are ignored
        self._drain_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        # The request the app is running (`cycle` is the newest, which may be queued behind it).
        self._running_cycle: RequestResponseCycle | None = None
        # The newest request has a cycle but its body has not all arrived yet.
        self._body_incomplete = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # `connections` includes this one now: it is over the limit if more than the maximum are open.
        self._admitted = len(self.connections) <= self._limits.max_connections
        self._watch_sends(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._cancel_send_deadline()
        self._nothing_more_reaches_the_client()
        if self._drain_deadline is not None:
            self._drain_deadline.cancel()
            self._drain_deadline = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown began: idle connections close now, a request in flight may
        finish within `timeout_graceful_shutdown`. Past it, uvicorn cancels the request's task and
        answers a plain-text 500; this answers 503 problem+json first (the task is still cancelled,
        and its audit record says so)."""
        super().shutdown()
        grace = self.config.timeout_graceful_shutdown
        if grace is not None and not self.transport.is_closing() and self._request_in_flight():
            # uvicorn's own deadline starts 0.1 s after this call: ours passes first.
            self._drain_deadline = self.loop.call_later(grace, self._drain_deadline_passed)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            self._head_bytes_received += len(data)
        super().data_received(data)
        # A head that is still incomplete although more than the maximum arrived: httptools would
        # buffer it for as long as the client keeps sending; a complete one is measured when parsed.
        if (
            self._awaiting_head
            and self._head_bytes_received > self._limits.max_header_bytes
            and not self._refused
            and not self.transport.is_closing()
        ):
            self._refuse(RequestHeaderFieldsTooLarge())

    def handle_websocket_upgrade(self) -> None:
        # uvicorn calls this after the parser saw an Upgrade head, even one refused above.
        if not self._refused:
            super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn when httptools cannot parse the request; `msg` is uvicorn's own text.
        self._refuse(BadRequest("The request is not valid HTTP/1.1."))

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        self._trailer_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head:
            super().on_header(name, value)
            return
        # A trailer field after a chunked body. uvicorn would append it to the request's headers,
        # unbounded (the head is measured and complete by now): nothing here reads trailers, so
        # they are counted and dropped, and too many of them get 431 like a big head (in place of
        # the request's answer if the app has not begun one: it is still waiting for the body's end).
        self._trailer_bytes += len(name) + len(value) + _HEADER_SEPARATOR_BYTES
        if self._trailer_bytes > self._limits.max_header_bytes:
            self._refuse(RequestHeaderFieldsTooLarge())

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._cancel_head_deadline()
        self._awaiting_head = False
        self._head_started = False
        # Measured once from what uvicorn kept of the head (cheaper than counting in on_url and on_
        # header, which run for every piece); within a few bytes of its size on the wire.
        head_size = (
            len(self.parser.get_method())
            + 1
            + len(self.url)
            + _REQUEST_LINE_TAIL_BYTES
            + sum(len(name) + len(value) for name, value in self.headers)
            + _HEADER_SEPARATOR_BYTES * len(self.headers)
            + _HEAD_END_BYTES
        )
        if head_size > self._limits.max_header_bytes:
            self._refuse(RequestHeaderFieldsTooLarge())
            return
        if not self._transfer_coding_supported():
            self._refuse(BadRequest("The only transfer coding accepted is chunked."))
            return
        # Requests still in flight on connections that went away count too: a client that sends a
        # request and disconnects, again and again, must not pile up unbounded work.
        if not self._admitted or len(self.tasks) >= self._limits.max_connections:
            self.logger.warning("Connection limit reached: request refused with 503.")
            self._refuse(ServiceUnavailable("The server is at its connection limit.", retry_after_seconds=1))
            return
        if self._request_in_flight() and len(self.pipeline) >= self._limits.max_pipelined_requests:
            # No answer can be written for it before those due (see `_refuse`); it is not read, and
            # the connection closes after the last answer due, as any server may close a persistent
            # connection (a pipelining client resends what was not answered).
            self.logger.warning("Too many pipelined requests: the connection closes after the answers due.")
            self._refused = True
            self._cancel_head_deadline()
            self._close_after_the_answers_due()
            return
        super().on_headers_complete()
        self._body_incomplete = True

    def _transfer_coding_supported(self) -> bool:
        """No Transfer-Encoding, or `chunked` alone. httptools refuses most other forms itself, but
        only once the head is complete and the app has the request, and it takes `gzip, chunked`."""
        codings = [
            coding.strip().lower()
            for name, value in self.headers
            if name == b"transfer-encoding"
            for coding in value.split(b",")
        ]
        return not codings or codings == [_CHUNKED]

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._body_incomplete = False
        self._awaiting_head = True
        self._head_started = False
        self._head_bytes_received = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        # A pipelined request whose head already arrived is running now: the app has it, no deadline.
        if self.cycle is not None and not self.cycle.response_complete:
            return
        self._arm_head_deadline()

    # -- head deadline -------------------------------------------------------------------------

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(
            self._limits.header_timeout_seconds, self._head_deadline_passed
        )

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _request_in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_deadline_passed(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self._refused:
            return
        if self._request_in_flight():
            return  # the app is answering a request: not ours to cut (cannot happen; defensive)
        if self._awaiting_head and (self._head_started or self._head_bytes_received):
            timeout = self._limits.header_timeout_seconds
            self._refuse(RequestTimeout(f"The request head was not received within {timeout:g} seconds."))
            return
        # Idle, or the unread rest of a body the app answered without reading: nobody awaits an
        # answer, so none is sent.
        self.transport.close()

    def _drain_deadline_passed(self) -> None:
        self._drain_deadline = None
        if self.transport.is_closing() or not self._request_in_flight():
            return
        cycle = self.cycle
        if self.pipeline or cycle.response_started:
            # Half an answer cannot be taken back, and with pipelined requests queued `cycle` is
            # not the one running: the client sees the connection cut.
            self.transport.close()
            return
        self._refused = True
        self._cancel_head_deadline()
        self._write_refusal(
            ServiceUnavailable("The server is shutting down.", retry_after_seconds=1),
            self._take_over_from_the_app(cycle),
        )

    # -- send deadline -------------------------------------------------------------------------

    def _watch_sends(self, transport: asyncio.Transport) -> None:
        """The send deadline has two halves. What the server holds back (the socket takes no more)
        is watched through the transport's flow control: pause_writing() starts the deadline and
        resume_writing() ends it (below). What the kernel already holds, the transport cannot see:
        with TCP_USER_TIMEOUT the kernel itself drops a connection whose bytes stay unacknowledged,
        or unsent behind a zero window, for as long. That also covers answers written before a
        close (the connection is gone from the server's count then, not from the kernel's memory),
        and bytes held back below the transport's high-water mark, or inside a TLS layer."""
        sock = transport.get_extra_info("socket")
        if _TCP_USER_TIMEOUT is not None and sock is not None:
            milliseconds = round(self._limits.send_timeout_seconds * 1000)
            with contextlib.suppress(OSError):  # not a TCP socket (a Unix one): nothing to bound
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, milliseconds)

    def pause_writing(self) -> None:
        # More than the high-water mark (64 KiB) is held back; uvicorn's request cycle then also
        # waits before the app's next write, so answers do not pile up behind one left unread.
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(
                self._limits.send_timeout_seconds, self._send_deadline_passed
            )

    def resume_writing(self) -> None:
        self._cancel_send_deadline()
        if self.transport.is_closing():
            # Resumed because the held bytes were dropped (aborted, or the kernel gave up on the
            # client): the app's pending write must not go on to a transport already closed.
            self._nothing_more_reaches_the_client()
        super().resume_writing()

    def _cancel_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_deadline_passed(self) -> None:
        self._send_deadline = None
        timeout = self._limits.send_timeout_seconds
        self.logger.warning("A client left its answers unread for %g s: connection aborted.", timeout)
        self._nothing_more_reaches_the_client()
        # Not close(): that would wait, without end, for the client to take what is held back.
        self.transport.abort()

    def _nothing_more_reaches_the_client(self) -> None:
        """The app's reads and writes go nowhere from now on (uvicorn's cycle sees a client that
        went away). uvicorn's connection_lost() does this for the newest request only, and only
        once the loss is reported: the request running may be an earlier one, and the app may
        resume its pending write before that, to a uvloop transport which then raises."""
        for cycle in (self._running_cycle, self.cycle):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()

    # -- refusals ------------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running_cycle = cycle
        super()._start_asgi_task(cycle, functools.partial(self._run_app_unless_refused, cycle, app))

    async def _run_app_unless_refused(
        self, cycle: RequestResponseCycle, app: ASGI3Application, scope: Any, receive: Any, send: Any
    ) -> None:
        # The task starts on the loop's next turn: a body refused in the same read as the head was
        # answered before the app could begin, and the app spends nothing on it (no credential
        # lookup, no audit record: a refusal of the protocol's, like an unparsable head).
        if self._refused and cycle.disconnected:
            return
        await app(scope, receive, send)

    def _refuse(self, error: ProblemError) -> None:
        """Answers `error` as problem+json straight onto the socket and closes the connection; or,
        while an earlier answer is due, closes the connection after it instead."""
        self._refused = True
        self._cancel_head_deadline()
        if not self._request_in_flight():
            self._write_refusal(error, new_request_id())
            return
        cycle = self.cycle
        if self._body_incomplete and not self.pipeline and not cycle.response_started:
            # The refusal is about the body of the request the app is running (bad framing, too many
            # trailers), and the app has not begun its answer: it would wait for the rest of the
            # body until its body deadline. The refusal is the request's answer instead.
            request_id = self._take_over_from_the_app(cycle)
            # The id links this answer to the app's record of the request (a 499, see below).
            self.logger.warning("Request %s: body refused with %d.", request_id, error.response_status())
            self._write_refusal(error, request_id)
            return
        # An earlier (pipelined) request is still being answered: writing now would cut into its
        # answer, and a refused request gets none.
        self._close_after_the_answers_due()

    def _close_after_the_answers_due(self) -> None:
        """Reads no more; the connection closes after the last answer due. A queued request whose
        body had not all arrived is dropped: the app would wait for the rest until its deadline."""
        if self._body_incomplete and self.pipeline:
            self.pipeline.popleft()  # the newest; uvicorn queues with appendleft
            self._body_incomplete = False
        last_due = self.pipeline[0][0] if self.pipeline else self._running_cycle
        if last_due is not None:
            self.cycle = last_due
            last_due.keep_alive = False
        self.flow.pause_reading()

    def _take_over_from_the_app(self, cycle: RequestResponseCycle) -> str:
        """Makes the app's later writes and reads go nowhere (uvicorn's cycle treats it as a client
        that went away: a body read ends in ClientDisconnect, so a running app's record is a 499;
        an app not started yet never runs), so that the refusal written in its place is the only
        answer; returns the request's id."""
        cycle.disconnected = True
        cycle.message_event.set()
        # The id the app gave this request (and its record), so the caller can quote it; a fresh
        # one if the app has not started on it.
        return request_id_of(cycle.scope)  # type: ignore[arg-type]

    def _write_refusal(self, error: ProblemError, request_id: str) -> None:
        body = render_problem(error, request_id)
        headers: list[tuple[bytes, bytes]] = [
            *self.server_state.default_headers,
            *problem_head(error, request_id),
            (b"content-length", str(len(body)).encode()),
        ]
        self._security_headers.add_to(headers, {"scheme": self.scheme})
        if not any(name == b"connection" for name, _ in headers):
            headers.append((b"connection", b"close"))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        self.transport.write(STATUS_LINE[error.response_status()] + head + b"\r\n" + body)
        self.transport.close()


def protocol_class(limits: ServeLimits) -> Callable[..., asyncio.Protocol]:
    """What `serve` passes as uvicorn's `http`: the protocol bound to `limits`. A partial of a
    module-level class pickles by reference, so `--workers N` hands it to each worker as is."""
    return functools.partial(LimitedHttpToolsProtocol, limits=limits)
