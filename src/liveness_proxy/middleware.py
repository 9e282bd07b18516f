"""Pure-ASGI middleware: request id, access log, and the last-resort error answer."""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from liveness_proxy.errors import InternalError, ProblemError, problem_head, render_problem
from liveness_proxy.observability import AccessLog
from liveness_proxy.tracing import ServerSpans

UNMATCHED_ROUTE = "unmatched"
_IPV6_CLIENT_PREFIX = 64
_MAX_ADDRESS_LENGTH = 64
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_REQUEST_ID_PATTERN = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestObserver(Protocol):
    """Observes each request: (route template, method, status, seconds), and the trace id of a
    sampled request (an exemplar), e.g. the request metrics."""

    def __call__(
        self, route: str, method: str, status: int, seconds: float, trace_id: str | None = None, /
    ) -> None: ...


def new_request_id() -> str:
    return secrets.token_hex(16)


class RequestIds:
    """Fresh request ids: 128 random bits each, as before, but drawn from the kernel 4 KiB at a time
    instead of 16 bytes per request (a syscall per request was a measurable share of the hot path).
    Ids stay unpredictable: one caller's ids tell nothing about another's, nor the request volume."""

    _IDS_PER_DRAW = 256

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def next(self) -> str:
        if self._offset >= len(self._pool):
            self._pool = secrets.token_bytes(16 * self._IDS_PER_DRAW)
            self._offset = 0
        start = self._offset
        self._offset = start + 16
        return self._pool[start : start + 16].hex()


def request_id_of(scope: Scope) -> str:
    """The id RequestContextMiddleware put on this request (a fresh one if it did not run)."""
    state = scope.get("state")
    if isinstance(state, dict):
        value: object = state.get("request_id")
        if isinstance(value, str):
            return value
    return new_request_id()


def client_address(scope: Scope) -> str:
    """The client's address as the server resolved it: the socket's peer, or the forwarded address
    when the server trusts the peer to forward it (uvicorn's `--forwarded-allow-ips`); "unknown"
    when the server gave none (a Unix socket, a test transport).

    An IPv6 client is its /64: one subscriber usually holds a whole /64, so per-address limits on
    single IPv6 addresses would be no limit. An IPv4 client seen through IPv6 (a dual-stack socket's
    `::ffff:a.b.c.d`, NAT64's `64:ff9b::a.b.c.d`) is its IPv4 address, not one /64 for all of
    them. Whatever a trusted forwarder passed on that is no address is cut to 64 characters (it
    keys counters and audit records)."""
    client = scope.get("client")
    if not client:
        return "unknown"
    host = str(client[0])
    if ":" not in host:
        return host[:_MAX_ADDRESS_LENGTH]
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return host[:_MAX_ADDRESS_LENGTH]
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address in _NAT64_PREFIX:
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, _IPV6_CLIENT_PREFIX)))


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/liveness/sessions/{session_id}/result`), never the
    raw path: session ids stay out of logs and metric labels; UNMATCHED_ROUTE when none matched.

    Starlette's router stores the matched route in `scope["route"]` (also for a method mismatch, so
    a 405 keeps its template), in the same scope dict the middleware passed on: it is visible here
    after the app returns, as long as no middleware in between replaces the scope with a copy.
    """
    template = getattr(scope.get("route"), "path", None)
    # An empty template would be a root Mount: not informative; this app mounts nothing.
    if isinstance(template, str) and template:
        return template
    return UNMATCHED_ROUTE


async def send_problem(
    send: Send, error: ProblemError, request_id: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answers `error` as problem+json straight from ASGI middleware (outside Starlette's handlers)."""
    body = render_problem(error, request_id)
    await send(
        {
            "type": "http.response.start",
            "status": error.response_status(),
            "headers": [
                *problem_head(error, request_id),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Gives every request an id (the caller's X-Request-ID when well-formed, else a new one),
    echoes it on the response, writes one access-log line, and turns any unhandled exception into
    a 500 problem that carries nothing but the request id."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: structlog.typing.FilteringBoundLogger,
        access_log: AccessLog | None = None,
        response_headers: Callable[[list[tuple[bytes, bytes]], Scope], None] | None = None,
        observe: RequestObserver | None = None,
        server_spans: ServerSpans | None = None,
    ) -> None:
        self.app = app
        self.logger = logger
        self._ids = RequestIds()
        self._access_log = access_log
        # Optional jobs folded into this one layer (the proxy's app uses both): each middleware
        # layer is one more `send` wrapper and one more coroutine every resumption crosses, and
        # separate layers for headers and metrics cost ~13 us per request each (profiled).
        self._response_headers = response_headers  # adds headers to every response, the 500 too
        self._observe = observe  # (route template, method, status, seconds), e.g. request metrics
        # Tracing folds in here too: the server span covers everything the other layers do.
        self._server_spans = server_spans

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        caller_request_id = self._caller_request_id(scope)
        request_id = caller_request_id or self._ids.next()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        encoded_id = request_id.encode("ascii")
        status = 500
        response_started = False

        response_headers = self._response_headers
        server_span = None if self._server_spans is None else self._server_spans.start(scope, request_id)

        async def send_with_context(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", encoded_id))
                if response_headers is not None:
                    response_headers(headers, scope)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except ClientDisconnect:
            status = 499  # nobody is left to answer; not an error of ours
        except Exception:
            self.logger.exception("unhandled_error", request_id=request_id, path=scope.get("path", ""))
            if not response_started:
                status = 500
                error = InternalError("An internal error occurred; quote the request id when reporting it.")
                # Through the same wrapper: the last-resort 500 gets the request id and headers too.
                await send_problem(send_with_context, error, request_id)
        finally:
            seconds = time.perf_counter() - started
            method = scope.get("method", "")
            route = route_template(scope)
            trace_id = exemplar = None
            if server_span is not None:
                trace_id = server_span.trace_id
                exemplar = trace_id if server_span.sampled else None
                try:
                    server_span.finish(
                        None if route == UNMATCHED_ROUTE else route, status, state.get("subject_commitment")
                    )
                except Exception as exc:
                    # A host's span processor that raises must not cost the metrics and the log line.
                    self.logger.warning("span_not_finished", reason=type(exc).__name__)
            if self._observe is not None:
                self._observe(route, method, status, seconds, exemplar)
            fields = {
                "request_id": request_id,
                # With tracing on, the trace this request is part of (sampled or not); else null.
                "trace_id": trace_id,
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                # The commitment, never the subject: the log outlives an erasure (store/subjects.py).
                "subject_commitment": state.get("subject_commitment"),
                "upstream_status": state.get("upstream_status"),
            }
            if self._access_log is not None:
                self._access_log.request(fields, own_request_id=caller_request_id is None)
            else:
                self.logger.info("request", **fields)

    @staticmethod
    def _caller_request_id(scope: Scope) -> str | None:
        """The caller's X-Request-ID when well-formed; None: the proxy draws one."""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                if _REQUEST_ID_PATTERN.fullmatch(value):
                    return bytes(value).decode("ascii")
                break
        return None
