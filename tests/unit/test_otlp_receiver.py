"""The tests' OTLP receiver (tests/otlp_receiver.py) against the real OpenTelemetry SDK and its
OTLP/HTTP exporter: what the SDK sends, over a real socket, is what the receiver decodes. Each
test has a TracerProvider of its own (never the global one)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer, format_span_id, format_trace_id

from otlp_receiver import OtlpReceiver, ReceivedSpan, render_tree


@dataclass(frozen=True)
class Produced:
    """The ids the SDK gave the spans `_produce_trace` made, as lowercase hex."""

    trace_id: str
    server: str
    client: str
    audit: str
    refresh_trace_id: str
    refresh: str


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _provider(exporter: SpanExporter, *, batch: bool = False) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test"}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def _produce_trace(tracer: Tracer) -> Produced:
    """A token refresh on a trace of its own; then a server span with a client child linked to
    the refresh and an internal child that fails with an event."""
    with tracer.start_as_current_span("token refresh", kind=SpanKind.INTERNAL) as refresh:
        refresh.set_attribute("refresh.outcome", "ok")
    with tracer.start_as_current_span(
        "GET /v1/liveness/sessions/{session_id}/result",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "http.response.status_code": 200,
            "retry.ratio": 0.5,
            "cache.hit": False,
            "route.tags": ["result", "read"],
            "secret.marker": "marker-3f9a",
        },
    ) as server:
        with tracer.start_as_current_span(
            "upstream result",
            kind=SpanKind.CLIENT,
            links=[Link(refresh.get_span_context(), {"link.reason": "waited for token"})],
        ) as client:
            client.set_attribute("server.port", 8443)
        with tracer.start_as_current_span("audit commit") as audit:
            audit.add_event("retry", {"attempt": 2})
            audit.set_status(Status(StatusCode.ERROR, "store unavailable"))
    return Produced(
        trace_id=format_trace_id(server.get_span_context().trace_id),
        server=format_span_id(server.get_span_context().span_id),
        client=format_span_id(client.get_span_context().span_id),
        audit=format_span_id(audit.get_span_context().span_id),
        refresh_trace_id=format_trace_id(refresh.get_span_context().trace_id),
        refresh=format_span_id(refresh.get_span_context().span_id),
    )


def _by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def test_spans_parents_attributes_links_and_events_decode_as_sent(receiver: OtlpReceiver) -> None:
    provider = _provider(OTLPSpanExporter(endpoint=receiver.traces_url), batch=True)
    try:
        produced = _produce_trace(provider.get_tracer("receiver-test"))
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()

    spans = _by_name(receiver.wait_for(lambda span: True, count=4))
    assert set(spans) == {
        "token refresh",
        "GET /v1/liveness/sessions/{session_id}/result",
        "upstream result",
        "audit commit",
    }
    server = spans["GET /v1/liveness/sessions/{session_id}/result"]
    client, audit, refresh = spans["upstream result"], spans["audit commit"], spans["token refresh"]

    assert (server.trace_id, server.span_id, server.parent_span_id) == (
        produced.trace_id,
        produced.server,
        None,
    )
    assert (client.span_id, client.parent_span_id) == (produced.client, produced.server)
    assert (audit.span_id, audit.parent_span_id) == (produced.audit, produced.server)
    assert client.trace_id == audit.trace_id == produced.trace_id
    assert (refresh.trace_id, refresh.span_id) == (produced.refresh_trace_id, produced.refresh)
    assert refresh.trace_id != server.trace_id
    assert [server.kind, client.kind, audit.kind, refresh.kind] == [
        "SERVER",
        "CLIENT",
        "INTERNAL",
        "INTERNAL",
    ]

    assert server.attributes == {
        "http.request.method": "GET",
        "http.response.status_code": 200,
        "retry.ratio": 0.5,
        "cache.hit": False,
        "route.tags": ["result", "read"],
        "secret.marker": "marker-3f9a",
    }
    assert isinstance(server.attributes["http.response.status_code"], int)
    assert client.attributes == {"server.port": 8443}
    [link] = client.links
    assert (link.trace_id, link.span_id) == (produced.refresh_trace_id, produced.refresh)
    assert link.attributes == {"link.reason": "waited for token"}
    assert server.links == []

    assert (audit.status_code, audit.status_message) == ("ERROR", "store unavailable")
    assert server.status_code == "UNSET"
    [event] = audit.events
    assert (event.name, event.attributes) == ("retry", {"attempt": 2})
    assert audit.start_ns <= event.time_ns <= audit.end_ns
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    assert server.resource_attributes["service.name"] == "receiver-test"
    assert server.scope_name == "receiver-test"

    requests = receiver.requests()
    assert requests, "the exporter sent nothing"
    assert {(request.content_type, request.content_encoding) for request in requests} == {
        ("application/x-protobuf", None)
    }
    assert sum(request.span_count for request in requests) == 4
    assert any(b"marker-3f9a" in body for body in receiver.raw_bodies())
    assert receiver.rejected() == []
    assert list(receiver.traces()) == [produced.refresh_trace_id, produced.trace_id]


def test_gzip_export_configured_by_the_environment(
    receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a proxy process gets: the base URL and the compression, from OTEL_* variables.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    provider = _provider(OTLPSpanExporter())
    try:
        produced = _produce_trace(provider.get_tracer("receiver-test"))
    finally:
        provider.shutdown()

    spans = receiver.wait_for(lambda span: span.trace_id == produced.trace_id, count=3)
    assert {span.name for span in spans} == {
        "GET /v1/liveness/sessions/{session_id}/result",
        "upstream result",
        "audit commit",
    }
    requests = receiver.requests()
    assert {request.content_encoding for request in requests} == {"gzip"}
    assert {request.path for request in requests} == {"/v1/traces"}
    for request in requests:
        assert request.wire_bytes != len(request.body)  # the body came compressed, and was decoded
    # The leak scan reads decompressed bytes: the marker is plain in them.
    assert any(b"marker-3f9a" in body for body in receiver.raw_bodies())


def test_deflate_export_is_decoded(receiver: OtlpReceiver) -> None:
    provider = _provider(OTLPSpanExporter(endpoint=receiver.traces_url, compression=Compression.Deflate))
    try:
        _produce_trace(provider.get_tracer("receiver-test"))
    finally:
        provider.shutdown()
    assert len(receiver.wait_for(lambda span: True, count=4)) == 4
    assert {request.content_encoding for request in receiver.requests()} == {"deflate"}


def test_render_tree_nests_children_in_start_order_and_shows_links(receiver: OtlpReceiver) -> None:
    provider = _provider(OTLPSpanExporter(endpoint=receiver.traces_url))
    try:
        produced = _produce_trace(provider.get_tracer("receiver-test"))
    finally:
        provider.shutdown()
    receiver.wait_for(lambda span: True, count=4)
    trace = receiver.traces()[produced.trace_id]

    assert render_tree(trace, durations=False) == (
        f"trace {produced.trace_id}\n"
        "  GET /v1/liveness/sessions/{session_id}/result [SERVER] cache.hit=False "
        "http.request.method=GET http.response.status_code=200 retry.ratio=0.5 "
        "route.tags=[result,read] secret.marker=marker-3f9a\n"
        "    upstream result [CLIENT] server.port=8443\n"
        f"        -> link to {produced.refresh_trace_id}/{produced.refresh} link.reason='waited for token'\n"
        "    audit commit [INTERNAL] ERROR(store unavailable)\n"
    )
    with_durations = render_tree(trace, attributes=["http.request.method"]).splitlines()
    assert re.fullmatch(
        r"  GET /v1/liveness/sessions/\{session_id\}/result \[SERVER\] \d+\.\d ms http\.request\.method=GET",
        with_durations[1],
    ), with_durations


def test_render_tree_marks_a_span_whose_parent_did_not_arrive(receiver: OtlpReceiver) -> None:
    provider = _provider(OTLPSpanExporter(endpoint=receiver.traces_url))
    try:
        produced = _produce_trace(provider.get_tracer("receiver-test"))
    finally:
        provider.shutdown()
    spans = receiver.wait_for(lambda span: span.trace_id == produced.trace_id, count=3)
    without_server = [span for span in spans if span.span_id != produced.server]

    rendered = render_tree(without_server, durations=False, attributes=[])

    assert rendered == (
        f"trace {produced.trace_id}\n"
        f"  upstream result [CLIENT] (parent {produced.server} not received)\n"
        f"      -> link to {produced.refresh_trace_id}/{produced.refresh} link.reason='waited for token'\n"
        f"  audit commit [INTERNAL] ERROR(store unavailable) (parent {produced.server} not received)\n"
    )


def test_what_is_not_an_otlp_protobuf_export_is_refused_and_recorded(receiver: OtlpReceiver) -> None:
    with httpx.Client(base_url=receiver.endpoint, timeout=5) as client:
        json_export = client.post("/v1/traces", json={"resourceSpans": []})
        wrong_path = client.post(
            "/v1/metrics", content=b"", headers={"Content-Type": "application/x-protobuf"}
        )
        garbage = client.post(
            "/v1/traces", content=b"\xff\xff\xff", headers={"Content-Type": "application/x-protobuf"}
        )
        bad_gzip = client.post(
            "/v1/traces",
            content=b"not gzip",
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        )
    assert [json_export.status_code, wrong_path.status_code, garbage.status_code, bad_gzip.status_code] == [
        415,
        404,
        400,
        400,
    ]
    assert [(refused.path, refused.status) for refused in receiver.rejected()] == [
        ("/v1/traces", 415),
        ("/v1/metrics", 404),
        ("/v1/traces", 400),
        ("/v1/traces", 400),
    ]
    assert receiver.spans() == []
    assert receiver.requests() == []


def test_an_empty_export_is_answered_with_an_empty_response(receiver: OtlpReceiver) -> None:
    answer = httpx.post(
        receiver.traces_url, content=b"", headers={"Content-Type": "application/x-protobuf"}, timeout=5
    )
    assert (answer.status_code, answer.headers["content-type"], answer.content) == (
        200,
        "application/x-protobuf",
        b"",
    )
    assert [request.span_count for request in receiver.requests()] == [0]


def test_wait_for_names_what_arrived_when_the_wanted_spans_do_not(receiver: OtlpReceiver) -> None:
    provider = _provider(OTLPSpanExporter(endpoint=receiver.traces_url))
    try:
        _produce_trace(provider.get_tracer("receiver-test"))
    finally:
        provider.shutdown()
    receiver.wait_for(lambda span: True, count=4)

    with pytest.raises(AssertionError, match=r"0 of 1 wanted spans .*'upstream result \[CLIENT\]'"):
        receiver.wait_for(lambda span: span.kind == "CONSUMER", timeout=0.1)
    receiver.clear()
    assert (receiver.spans(), receiver.requests(), receiver.raw_bodies()) == ([], [], [])
