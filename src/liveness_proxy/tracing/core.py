"""`Tracing`: one app's tracer, off unless configured, and the few operations the proxy needs.

No global state: the tracer provider is this object's own (never `trace.set_tracer_provider`), so
two apps in one process trace independently, and a host application's provider is left alone.
The *current span* lives where OpenTelemetry keeps it, in a context variable, which is what lets a
span started by the middleware be the parent of one started deep in the upstream client.

Off, every operation returns at once and builds no span object (docs/performance.md measures it).
Spans never record exception messages or stack traces, which can quote a URL or a value: a failed
span carries the error's class (or the problem's slug) as `error.type`, and status ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from liveness_proxy._version import __version__
from liveness_proxy.errors import ProblemError
from liveness_proxy.tracing.options import TracingOptions

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

Attributes = Mapping[str, AttributeValue]
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
# Stateless: its `extract` only parses (one instance is as good as one per call, and cheaper).
_W3C_PROPAGATOR = TraceContextTextMapPropagator()


def traceparent_of(span_context: SpanContext) -> str | None:
    """The W3C `traceparent` value naming `span_context`, or None when it is not valid."""
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The `traceparent` of the current span (ours, never a caller's raw header), or None when no
    span is current: with tracing off, always None, at the cost of one context-variable read. Kept
    with durable work (a job row), so that the work done later joins the trace that caused it."""
    return traceparent_of(trace.get_current_span().get_span_context())


def sampled_trace_id() -> str | None:
    """The current trace id in hex if the current span is sampled (an exemplar's), else None."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and span_context.trace_flags.sampled:
        return f"{span_context.trace_id:032x}"
    return None


def mark_failed(span: Span, error: BaseException) -> None:
    """Status ERROR and `error.type`: the problem's slug or the exception's class, never its text."""
    span.set_status(Status(StatusCode.ERROR))
    span.set_attribute(
        "error.type", error.slug if isinstance(error, ProblemError) else type(error).__qualname__
    )


class ActiveSpan:
    """A started span made current for a `with` block, ended (and marked failed on an exception)
    when the block ends. A class, not a generator context manager: it is entered per request."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token: object = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, _type: object, error: BaseException | None, _traceback: object) -> None:
        if error is not None:
            mark_failed(self.span, error)
        self.span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


def context_of(traceparent: str | None) -> Context | None:
    """A context whose parent is the span `traceparent` names (as stored with a job), or None."""
    if not traceparent:
        return None
    span_context = parse_traceparent(traceparent)
    return None if span_context is None else trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def parse_traceparent(value: str) -> SpanContext | None:
    """A W3C traceparent as a remote span context, without any tracestate; None when malformed
    (the propagator's own validation: version, lengths, hex, all-zero ids)."""
    extracted = trace.get_current_span(_W3C_PROPAGATOR.extract({"traceparent": value}))
    found = extracted.get_span_context()
    if not found.is_valid:
        return None
    return SpanContext(found.trace_id, found.span_id, is_remote=True, trace_flags=found.trace_flags)


class Tracing:
    """The app's tracing. Built from options (nothing runs yet); `start()` in the lifespan builds
    the provider and its exporter when tracing is configured; `stop()` flushes and ends it."""

    def __init__(self, options: TracingOptions, *, exporter: SpanExporter | None = None) -> None:
        """`exporter` replaces the configured ones (a test's in-memory exporter)."""
        self.options = options
        self._exporter = exporter
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None

    @classmethod
    def off(cls) -> Tracing:
        return cls(TracingOptions())

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def describe(self) -> str:
        """For the "started" log line: "off", the exporters ("otlp", "console"), or "custom"."""
        if self.tracer is None:
            return "off"
        return "custom" if self._exporter is not None else ",".join(sorted(self.options.exporters))

    def start(self) -> None:
        if self.tracer is not None or not (self.options.enabled or self._exporter is not None):
            return
        resource = Resource.create(
            {
                **self.options.resource_attributes,
                "service.name": self.options.service_name,
                "service.version": __version__,
            }
        )
        provider = TracerProvider(sampler=self.options.sampler, resource=resource, shutdown_on_exit=False)
        for exporter in self._exporters():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        self.tracer = provider.get_tracer("liveness_proxy", __version__)

    def _exporters(self) -> Iterator[SpanExporter]:
        if self._exporter is not None:
            yield self._exporter
            return
        if "otlp" in self.options.exporters:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            yield OTLPSpanExporter(endpoint=self.options.traces_endpoint, headers=dict(self.options.headers))
        if "console" in self.options.exporters:
            yield ConsoleSpanExporter(service_name=self.options.service_name)

    async def stop(self) -> None:
        """Exports what is buffered (the SDK bounds it by its export timeout) and ends the provider;
        in a thread: the SDK's shutdown blocks on the exporter."""
        provider, self._provider, self.tracer = self._provider, None, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)

    def force_flush(self) -> bool:
        return self._provider.force_flush() if self._provider is not None else True

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes | None = None,
        links: Sequence[Link] | None = None,
        context: Context | None = None,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """`start_span`'s span, current for the block and ended with it; nothing when off, and
        nothing without a sampled current span (see `_no_recording_parent`)."""
        span = self.start_span(name, kind=kind, attributes=attributes, links=links, context=context)
        return _NO_SPAN if span is None else ActiveSpan(span)

    def start_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes | None = None,
        links: Sequence[Link] | None = None,
        context: Context | None = None,
    ) -> Span | None:
        """A started span, the child of the current span (or of `context`), that the caller ends
        (one that outlives a block: a token refresh); None when off or without a sampled parent."""
        tracer = self.tracer
        if tracer is None or (context is None and _no_recording_parent()):
            return None
        return tracer.start_span(name, context, kind, attributes, links)

    def outbound_headers(self) -> list[tuple[str, str]]:
        """`traceparent` of the current span, for an outbound request: ours, so the callee joins
        the trace; never the caller's header, and never a tracestate."""
        if self.tracer is None:
            return []
        traceparent = current_traceparent()
        return [] if traceparent is None else [("traceparent", traceparent)]


def _no_recording_parent() -> bool:
    """Whether there is no sampled span to be the parent. Then nothing is built:
    - under an unsampled span, children would be dropped anyway by the parent-based samplers (the
      default), and building them cost ~6 us each (docs/performance.md, tracing at 0%); outbound
      calls carry the parent's traceparent, which says "not sampled" just the same;
    - with no span at all, the work is a route that is not traced (`/readyz` waiting for a token):
      it must not start traces of its own. Work that is its own root says so (`context=new_root()`)."""
    return not trace.get_current_span().is_recording()


def new_root() -> Context:
    """An empty context: a span started in it begins a trace of its own (a shared token refresh)."""
    return Context()


def client_attributes(method: str, origin: str, **extra: AttributeValue) -> dict[str, AttributeValue]:
    """HTTP client attributes (semantic conventions) for a call to `origin` ("scheme://host:port").
    No `url.full`: a path can hold a session id, and a receiver's URL a secret of its own."""
    parts = urlsplit(origin)
    scheme = parts.scheme or "http"
    return {
        "http.request.method": method,
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if scheme == "https" else 80),
        "url.scheme": scheme,
        **extra,
    }


def record_answer(span: Span | None, status: int) -> None:
    """The answer's status on a client span; 4xx and 5xx are errors of the call (the conventions)."""
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(status))
