"""A real OTLP/HTTP trace receiver for the tests: an HTTP server on a free loopback port, in a thread of
its own, that takes `POST <anything>/v1/traces` the way a collector does (protobuf, optionally gzip or
deflate), decodes each `ExportTraceServiceRequest` with the official opentelemetry-proto classes and
keeps the spans as plain dataclasses. Both an in-process app and a proxy in a subprocess can export
to it: `OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint>`.

    with OtlpReceiver() as receiver:
        ...  # run something that exports spans to receiver.endpoint
        [server] = receiver.wait_for(lambda span: span.kind == "SERVER")
        print(render_tree(receiver.traces()[server.trace_id]))

Anything else (another path, JSON, an unknown encoding, a body that is not the protobuf) is answered
4xx and recorded under `rejected()`: a test that sees no spans can tell "nothing was sent" from
"something was sent wrong".
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeAlias

# protobuf's runtime ships no type information (only the generated opentelemetry-proto modules do).
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

# What an OTLP attribute decodes to: AnyValue's scalars, arrays as lists, key-value lists as dicts;
# None for an empty AnyValue (the protocol allows it).
AttributeValue: TypeAlias = (
    "str | bool | int | float | bytes | list[AttributeValue] | dict[str, AttributeValue] | None"
)
Attributes: TypeAlias = dict[str, AttributeValue]

TRACES_PATH_SUFFIX = "/v1/traces"
PROTOBUF = "application/x-protobuf"
_KINDS = {
    Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUSES = {
    Status.STATUS_CODE_UNSET: "UNSET",
    Status.STATUS_CODE_OK: "OK",
    Status.STATUS_CODE_ERROR: "ERROR",
}


@dataclass(frozen=True, slots=True)
class ReceivedLink:
    trace_id: str
    span_id: str
    attributes: Attributes


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: Attributes


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as it arrived; ids are lowercase hex (32 and 16 digits), as in a traceparent."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER or UNSPECIFIED
    attributes: Attributes
    links: list[ReceivedLink]
    events: list[ReceivedEvent]
    status_code: str  # UNSET, OK or ERROR
    status_message: str
    start_ns: int
    end_ns: int
    resource_attributes: Attributes
    scope_name: str
    # The W3C trace flags and (bit 8/9) whether the parent was remote, as the exporter sent them.
    flags: int

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One POST as it came over the wire: `body` is the protobuf after content decoding."""

    path: str
    content_type: str
    content_encoding: str | None
    wire_bytes: int
    body: bytes
    span_count: int


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    method: str
    path: str
    status: int
    reason: str


@dataclass
class OtlpReceiver:
    """The receiver; a context manager that serves until it exits. Thread-safe reads."""

    _spans: list[ReceivedSpan] = field(default_factory=list)
    _requests: list[ReceivedRequest] = field(default_factory=list)
    _rejected: list[RejectedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> OtlpReceiver:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # Exporters keep their connection open; handler threads must not keep the test alive.
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        """The base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (spans go to <endpoint>/v1/traces)."""
        assert self._server is not None, "use OtlpReceiver as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def traces_url(self) -> str:
        """The full signal URL, for an exporter given its endpoint directly."""
        return self.endpoint + TRACES_PATH_SUFFIX

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def raw_bodies(self) -> list[bytes]:
        """Every accepted request's protobuf bytes (decompressed): what to scan for leaked secrets."""
        with self._lock:
            return [request.body for request in self._requests]

    def rejected(self) -> list[RejectedRequest]:
        with self._lock:
            return list(self._rejected)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id (traces in order of first arrival), each sorted by start time."""
        grouped: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans():
            grouped.setdefault(span.trace_id, []).append(span)
        return {trace_id: sorted(spans, key=_start_order) for trace_id, spans in grouped.items()}

    def clear(self) -> None:
        """Forgets everything received: for a test that looks at one phase at a time."""
        with self._lock:
            self._spans.clear()
            self._requests.clear()
            self._rejected.clear()

    def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], *, count: int = 1, timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans that satisfy `predicate`, once there are at least `count` of them (batch
        exporters send late); AssertionError, naming what did arrive, after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [span for span in self.spans() if predicate(span)]
            if len(matching) >= count:
                return matching
            if time.monotonic() >= deadline:
                raise AssertionError(self._shortfall(len(matching), count, timeout))
            time.sleep(0.02)

    def _shortfall(self, matched: int, count: int, timeout: float) -> str:
        names = sorted({f"{span.name} [{span.kind}]" for span in self.spans()})
        rejected = self.rejected()
        return (
            f"{matched} of {count} wanted spans within {timeout} s; received {len(self.spans())} "
            f"span(s): {names}" + (f"; rejected requests: {rejected}" if rejected else "")
        )

    def _accept(self, request: ReceivedRequest, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._requests.append(request)
            self._spans.extend(spans)

    def _reject(self, rejected: RejectedRequest) -> None:
        with self._lock:
            self._rejected.append(rejected)


def _handler_for(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class OtlpHandler(BaseHTTPRequestHandler):
        # Keep-alive, as a collector does: exporters hold one connection open between batches.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            encoding = (self.headers.get("Content-Encoding") or "").strip().lower() or None
            if not self.path.split("?")[0].endswith(TRACES_PATH_SUFFIX):
                self._refuse(404, f"not a traces path: {self.path}")
                return
            if content_type != PROTOBUF:
                self._refuse(415, f"content type {content_type!r}, only {PROTOBUF} is taken")
                return
            try:
                decoded = _decompress(body, encoding)
                export = ExportTraceServiceRequest.FromString(decoded)
            except (OSError, EOFError, zlib.error, ValueError, DecodeError) as exc:
                self._refuse(400, f"undecodable body ({encoding or 'identity'}): {exc}")
                return
            spans = list(_spans_of(export))
            receiver._accept(
                ReceivedRequest(self.path, content_type, encoding, len(body), decoded, len(spans)), spans
            )
            self._answer(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

        def do_GET(self) -> None:
            self._refuse(405, "only POST")

        def _refuse(self, status: int, reason: str) -> None:
            receiver._reject(RejectedRequest(self.command, self.path, status, reason))
            self._answer(status, reason.encode(), "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a line on stderr per export would bury the test's own output

    return OtlpHandler


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if encoding in (None, "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


def _spans_of(export: ExportTraceServiceRequest) -> Iterable[ReceivedSpan]:
    for resource_spans in export.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    kind=_KINDS.get(span.kind, f"KIND_{span.kind}"),
                    attributes=_attributes(span.attributes),
                    links=[
                        ReceivedLink(link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes))
                        for link in span.links
                    ],
                    events=[
                        ReceivedEvent(event.name, event.time_unix_nano, _attributes(event.attributes))
                        for event in span.events
                    ],
                    status_code=_STATUSES.get(span.status.code, f"STATUS_{span.status.code}"),
                    status_message=span.status.message,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    resource_attributes=resource,
                    scope_name=scope_spans.scope.name,
                    flags=span.flags,
                )


def _attributes(pairs: Iterable[KeyValue]) -> Attributes:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> AttributeValue:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None


def _start_order(span: ReceivedSpan) -> tuple[int, str]:
    return (span.start_ns, span.span_id)


def render_tree(
    spans: Sequence[ReceivedSpan],
    *,
    attributes: Sequence[str] | None = None,
    durations: bool = True,
) -> str:
    """One trace (or several, one after another) as an indented text tree: children under their
    parent, siblings by start time, one line per span: `name [KIND] 1.2 ms key=value ...`, then its
    links (`-> link to <trace>/<span>`). A span whose parent did not arrive is a root marked
    `(parent <id> not received)`. `attributes` picks the attributes shown (default all, sorted);
    `durations=False` leaves timings out, for output a test compares exactly."""
    lines: list[str] = []
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in sorted(spans, key=_start_order):
        by_trace.setdefault(span.trace_id, []).append(span)
    for trace_id, members in by_trace.items():
        ids = {span.span_id for span in members}
        children: dict[str | None, list[ReceivedSpan]] = {}
        for span in members:
            parent = span.parent_span_id if span.parent_span_id in ids else None
            children.setdefault(parent, []).append(span)
        lines.append(f"trace {trace_id}")

        def add(
            span: ReceivedSpan,
            depth: int,
            ids: set[str] = ids,
            children: dict[str | None, list[ReceivedSpan]] = children,
        ) -> None:
            indent = "  " * depth
            lines.append(indent + _span_line(span, ids, attributes, durations))
            for link in span.links:
                shown = _format_attributes(link.attributes, None)
                lines.append(f"{indent}    -> link to {link.trace_id}/{link.span_id}{shown}")
            for child in children.get(span.span_id, []):
                add(child, depth + 1)

        for root in children.get(None, []):
            add(root, 1)
    return "\n".join(lines) + "\n"


def _span_line(span: ReceivedSpan, ids: set[str], attributes: Sequence[str] | None, durations: bool) -> str:
    line = f"{span.name} [{span.kind}]"
    if durations:
        line += f" {span.duration_ms:.1f} ms"
    if span.status_code == "ERROR":
        line += f" ERROR({span.status_message})" if span.status_message else " ERROR"
    line += _format_attributes(span.attributes, attributes)
    if span.parent_span_id is not None and span.parent_span_id not in ids:
        line += f" (parent {span.parent_span_id} not received)"
    return line


def _format_attributes(values: Mapping[str, AttributeValue], keys: Sequence[str] | None) -> str:
    chosen = sorted(values) if keys is None else [key for key in keys if key in values]
    return "".join(f" {key}={_format_value(values[key])}" for key in chosen)


def _format_value(value: AttributeValue) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}={_format_value(item)}" for key, item in sorted(value.items())) + "}"
    return repr(value)
