"""The server span of each request, and whether it may continue the caller's trace.

An incoming W3C `traceparent` is continued only when the direct peer is trusted to forward headers
(`FORWARDED_ALLOW_IPS`, loopback by default, the addresses uvicorn takes `X-Forwarded-For` from) or
when `LIVENESS_PROXY_TRACE_TRUST_INCOMING` says every caller may. From anyone else it becomes a
span link on a new trace: the request stays findable from the caller's trace, but an outsider
cannot choose our trace ids or force sampling (a sampled flag on every request would make us export
every span). A `tracestate` is never continued: it would travel on to Cynopsis and webhooks.

Health, readiness and metrics are not traced: probes and scrapes every few seconds would drown the
spans that matter.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from starlette.types import Scope
from uvicorn.middleware.proxy_headers import _TrustedHosts

from liveness_proxy.tracing.core import Tracing, parse_traceparent

# Set by the server (serving/forwarders.py) before it rewrites the client address from
# X-Forwarded-For: whether the socket's peer is a trusted forwarder. Absent (a host application
# serves the app), the client address is the peer's.
FORWARDER_TRUSTED = "liveness_proxy.forwarder_trusted"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_UNTRUSTED_LINK = {"liveness_proxy.link": "incoming traceparent (caller not trusted)"}


class ServerSpan:
    """One request's span, current from `ServerSpans.start` until `finish`."""

    __slots__ = ("_method", "_token", "span")

    def __init__(self, span: Span, method: str) -> None:
        self.span = span
        self._method = method
        self._token = otel_context.attach(trace.set_span_in_context(span))

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    @property
    def sampled(self) -> bool:
        return self.span.get_span_context().trace_flags.sampled

    def finish(self, route: str | None, status: int, subject_commitment: object) -> None:
        """Names the span after the route template (`GET /v1/liveness/sessions/{session_id}/result`),
        never the raw path (None: no route matched; the span keeps the method alone), and ends it.
        A 5xx is an error of ours; a 4xx is the caller's, not ours."""
        span = self.span
        if span.is_recording():
            if route is not None:
                span.update_name(f"{self._method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if isinstance(subject_commitment, str):
                # The commitment, never the subject: spans outlive an erasure (store/subjects.py).
                span.set_attribute("liveness_proxy.subject_commitment", subject_commitment)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", str(status))
        span.end()
        otel_context.detach(self._token)


class ServerSpans:
    """Starts the server span of a request when tracing is on."""

    def __init__(self, tracing: Tracing, *, untraced_paths: frozenset[str] = frozenset()) -> None:
        """`untraced_paths`: paths within the app that get no span (the app's probes and scrapes)."""
        self._tracing = tracing
        self._untraced_paths = untraced_paths
        self._trust_everyone = tracing.options.trust_incoming
        self._trusted = _TrustedHosts(tracing.options.trusted_forwarders)

    def start(self, scope: Scope, request_id: str) -> ServerSpan | None:
        tracer = self._tracing.tracer
        if tracer is None or _route_path(scope) in self._untraced_paths:
            return None
        method = scope.get("method", "")
        known_method = method if method in _KNOWN_METHODS else "_OTHER"
        parent, links = None, None
        incoming = _header(scope, b"traceparent")
        if incoming is not None:
            span_context = parse_traceparent(incoming)
            if span_context is not None:
                if self._may_continue(scope):
                    parent = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
                else:
                    links = [Link(span_context, _UNTRUSTED_LINK)]
        span = tracer.start_span(
            known_method,
            parent,
            SpanKind.SERVER,
            {
                "http.request.method": known_method,
                "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1"),
                "liveness_proxy.request_id": request_id,
            },
            links,
        )
        return ServerSpan(span, known_method)

    def _may_continue(self, scope: Scope) -> bool:
        if self._trust_everyone:
            return True
        trusted = scope.get(FORWARDER_TRUSTED)
        if isinstance(trusted, bool):
            return trusted
        client = scope.get("client")
        if not client:
            return False
        return str(client[0]) in self._trusted


def _route_path(scope: Scope) -> str:
    """The path within the app: mounted in a host (`app.mount("/liveness", proxy)`), the scope's
    path still starts with the mount's `root_path`."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
