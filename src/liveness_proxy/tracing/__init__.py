"""OpenTelemetry tracing, off unless configured (options.py), one provider per app (core.py), the
server span of each request (server.py)."""

from liveness_proxy.tracing.core import (
    ActiveSpan,
    Tracing,
    client_attributes,
    context_of,
    current_traceparent,
    mark_failed,
    new_root,
    parse_traceparent,
    record_answer,
    sampled_trace_id,
    traceparent_of,
)
from liveness_proxy.tracing.options import TracingOptions
from liveness_proxy.tracing.server import FORWARDER_TRUSTED, ServerSpan, ServerSpans

__all__ = [
    "FORWARDER_TRUSTED",
    "ActiveSpan",
    "ServerSpan",
    "ServerSpans",
    "Tracing",
    "TracingOptions",
    "client_attributes",
    "context_of",
    "current_traceparent",
    "mark_failed",
    "new_root",
    "parse_traceparent",
    "record_answer",
    "sampled_trace_id",
    "traceparent_of",
]
