"""The span helpers on their own: the SDK's real tracer, its in-memory exporter as the edge."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from liveness_proxy.errors import Unauthenticated
from liveness_proxy.tracing import Tracing, TracingOptions, new_root, parse_traceparent
from liveness_proxy.upstream.oauth import FetchedToken
from liveness_proxy.upstream.tokens import TokenManager

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingOptions(), exporter=exporter)
    tracing.start()
    return tracing, exporter


class SlowFetcher:
    async def fetch(self) -> FetchedToken:
        await asyncio.sleep(10)
        raise AssertionError("never reached")


async def test_a_refresh_cancelled_before_it_ran_still_ends_its_span() -> None:
    tracing, exporter = traced()
    tokens = TokenManager(
        SlowFetcher(), refresh_margin=lambda _: 1.0, failure_backoff_seconds=1, tracing=tracing
    )
    with tracing.span("request", context=new_root()):
        tokens._start_refresh()  # a refresh started, then a shutdown before its task's first step
    await tokens.close()
    await asyncio.sleep(0)
    await tracing.stop()
    assert "upstream token refresh" in {span.name for span in exporter.get_finished_spans()}


def test_a_failed_span_names_the_problem_or_the_class_never_the_message() -> None:
    tracing, exporter = traced()
    with pytest.raises(Unauthenticated), tracing.span("authenticate", context=new_root()):
        raise Unauthenticated("the key lpk_0123456789abcdef_secret is revoked")
    with pytest.raises(ValueError, match="postgresql"), tracing.span("store", context=new_root()):
        raise ValueError("postgresql://user:password@db/x")
    assert tracing.force_flush()
    refused, broken = exporter.get_finished_spans()
    assert refused.status.status_code is StatusCode.ERROR
    assert dict(refused.attributes or {}) == {"error.type": "unauthenticated"}
    assert dict(broken.attributes or {}) == {"error.type": "ValueError"}
    assert refused.status.description is None
    assert refused.events == ()
    assert broken.events == ()


def test_no_span_without_a_recording_parent_unless_asked_for_a_root() -> None:
    tracing, exporter = traced()
    with tracing.span("orphan") as orphan:
        assert orphan is None
        assert tracing.outbound_headers() == []
    with tracing.span("root", context=new_root()) as root:
        assert root is not None
        [(name, value)] = tracing.outbound_headers()
        assert name == "traceparent"
        assert value.split("-")[2] == f"{root.get_span_context().span_id:016x}"
    assert tracing.force_flush()
    assert [span.name for span in exporter.get_finished_spans()] == ["root"]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01x",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\x00",
    ],
)
def test_malformed_traceparents_are_ignored(garbage: str) -> None:
    assert parse_traceparent(garbage) is None


def test_a_parsed_traceparent_is_remote_and_carries_no_tracestate() -> None:
    parsed = parse_traceparent(TRACEPARENT)
    assert parsed is not None
    assert parsed.is_remote
    assert f"{parsed.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert len(parsed.trace_state) == 0
