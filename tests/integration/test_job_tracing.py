"""Durable work joins the trace that caused it, on both engines: a job keeps the traceparent of the
span current when its fact was written (read in the writer's own task, not in a group commit's),
the worker runs it in a child of that span, and a webhook attempt is a CLIENT span whose
traceparent the receiver gets. Spans are read from the SDK's in-memory exporter; the end-to-end
tests against an OTLP receiver are elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth.session_tokens import KeyedHash
from liveness_proxy.background import BackgroundWorker
from liveness_proxy.delivery import VerdictEvents, WebhookSender
from liveness_proxy.http import Http1Transport
from liveness_proxy.store import (
    ClaimedJob,
    JobQueue,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
    VerdictLedger,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.erasure import Erasure
from liveness_proxy.store.jobs import JobKind, enqueue_values
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import jobs
from liveness_proxy.tracing import Tracing, TracingOptions, current_traceparent, new_root, parse_traceparent
from liveness_proxy.webhook_signing import new_webhook_secret, parse_webhook_secrets
from support import TEST_AUDIT_KEYS, TEST_KEYS
from webhook_receiver import WebhookReceiver

COMMITMENT = "c" * 64


class Traced:
    """A started `Tracing` whose spans go to an in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracing = Tracing(TracingOptions(), exporter=self.exporter)

    def spans(self) -> Sequence[ReadableSpan]:
        self.tracing.force_flush()
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> ReadableSpan:
        [span] = [span for span in self.spans() if span.name == name]
        return span


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    made = Traced()
    made.tracing.start()
    yield made
    await made.tracing.stop()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


async def job_rows(engine: AsyncEngine) -> dict[tuple[str, str], dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (await connection.execute(select(jobs))).all()
    return {(row.kind, row.ref): dict(row._mapping) for row in rows}


def owner(session_id: str) -> SessionOwner:
    return SessionOwner(session_id, "alice", "key:1", 100.0, "r-" + session_id, subject_commitment=COMMITMENT)


def ids_of(traceparent: str | None) -> tuple[int, int]:
    assert traceparent is not None
    span_context = parse_traceparent(traceparent)
    assert span_context is not None
    return span_context.trace_id, span_context.span_id


# -- what the jobs keep -------------------------------------------------------------------------------


async def test_group_committed_jobs_keep_each_callers_span_not_the_writers(
    engine: AsyncEngine, traced: Traced
) -> None:
    """Bindings and verdicts are written by a writer task that the first caller started (and whose
    context it copied): each job must still name its own caller's span."""
    ownership = SessionOwnership(engine, first_followup_seconds=3.0)
    ledger = VerdictLedger(
        engine,
        ownership,
        TEST_AUDIT_KEYS,
        events=VerdictEvents(pass_threshold=90.0),
        wall_clock=lambda: 200.0,
    )
    expected: dict[tuple[str, str], str | None] = {}
    try:
        for session_id in ("s-1", "s-2"):
            with traced.tracing.span(f"create {session_id}", context=new_root()):
                await ownership.bind(owner(session_id), "r-" + session_id)
                expected["finalize", session_id] = current_traceparent()
        await ownership.bind(owner("s-3"), "r-s-3")  # outside any span
        expected["finalize", "s-3"] = None
        for session_id in ("s-1", "s-2"):
            with traced.tracing.span(f"result {session_id}", context=new_root()):
                await ledger.record(
                    owner(session_id), SessionVerdict("SUCCEEDED", 97.0, 200.0, "q"), read_by="request"
                )
                verdict_span = current_traceparent()
            [event] = [key for key in await job_rows(engine) if key[0] == "deliver" and key not in expected]
            expected[event] = verdict_span
        # The finalizer gave up: announced from the poll's own task (not a group commit).
        with traced.tracing.span("finalizer poll", context=new_root()):
            assert await ledger.mark_unresolved(owner("s-3"), request_id="finalizer-1")
            unresolved_span = current_traceparent()
        [event] = [key for key in await job_rows(engine) if key[0] == "deliver" and key not in expected]
        expected[event] = unresolved_span
    finally:
        await ledger.close()
        await ownership.close()
    stored = {key: row["trace_parent"] for key, row in (await job_rows(engine)).items()}
    assert stored == expected
    assert len({value for value in expected.values() if value is not None}) == 5  # five distinct spans


async def test_an_erasure_follow_up_keeps_the_erasures_span(engine: AsyncEngine, traced: Traced) -> None:
    subjects = SubjectRegistry(engine, TEST_KEYS.subjects)
    await subjects.resolve("zoë")
    erasure = Erasure(
        engine, subjects, TEST_AUDIT_KEYS, binding_hash=KeyedHash(b"p" * 32).subject, wall_clock=time.time
    )
    with traced.tracing.span("DELETE /v1/admin/subjects", context=new_root()):
        result = await erasure.erase_subject("zoë", request_id="erase-1")
        erasure_span = current_traceparent()
    assert result.commitment is not None
    assert erasure_span is not None
    rows = await job_rows(engine)
    assert rows["erase", result.commitment]["trace_parent"] == erasure_span


async def test_with_tracing_off_jobs_keep_nothing(engine: AsyncEngine) -> None:
    tracing = Tracing(TracingOptions())  # not configured: start() builds no tracer
    tracing.start()
    ownership = SessionOwnership(engine, first_followup_seconds=3.0)
    try:
        with tracing.span("create") as span:
            assert span is None
            await ownership.bind(owner("s-1"), "r-1")
    finally:
        await ownership.close()
        await tracing.stop()
    assert (await job_rows(engine))["finalize", "s-1"]["trace_parent"] is None


# -- the worker's spans ---------------------------------------------------------------------------


class Runner:
    """Settles each job done, after `work` seconds; raises instead when `fail`."""

    def __init__(self, queue: JobQueue, kind: JobKind, *, work: float = 0.0, fail: bool = False) -> None:
        self.queue = queue
        self.kind = kind
        self.concurrency = 4
        self.work = work
        self.fail = fail
        self.seen: list[tuple[ClaimedJob, str | None]] = []  # each job and the traceparent it ran in

    async def ready(self) -> bool:
        return True

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        self.seen.append((job, current_traceparent()))
        await asyncio.sleep(self.work)
        if self.fail:
            raise RuntimeError("a bug in the runner")
        async with self.queue.begin() as connection:
            await self.queue.settle(connection, job, owner=lease_owner, state="done", now=time.time())


async def enqueue(engine: AsyncEngine, kind: JobKind, ref: str, trace_parent: str | None) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            insert(jobs).values(enqueue_values(kind, ref, due_at=0.0, now=0.0, trace_parent=trace_parent))
        )


def worker(
    queue: JobQueue, runners: list[Runner], tracing: Tracing | None, **options: Any
) -> BackgroundWorker:
    return BackgroundWorker(
        queue,
        runners,
        wall_clock=time.time,
        logger=structlog.get_logger(),
        interval_seconds=0.02,
        lease_seconds=options.pop("lease_seconds", 60.0),
        tracing=tracing,
        **options,
    )


async def wait_for_rows(
    engine: AsyncEngine, done: Any, *, timeout: float = 10.0
) -> dict[Any, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await job_rows(engine)
        if done(rows):
            return rows
        assert time.monotonic() < deadline, f"jobs never got there: {rows}"
        await asyncio.sleep(0.02)


def all_done(rows: dict[Any, dict[str, Any]]) -> bool:
    return all(row["state"] == "done" for row in rows.values())


async def test_each_run_is_a_child_of_the_span_that_caused_its_job(
    engine: AsyncEngine, traced: Traced
) -> None:
    causes: dict[str, str | None] = {}
    caused: tuple[tuple[JobKind, str], ...] = (
        ("finalize", "s-1"),
        ("deliver", "evt-1"),
        ("erase", COMMITMENT),
    )
    for kind, ref in caused:
        with traced.tracing.span(f"cause of {kind}", context=new_root()):
            causes[kind] = current_traceparent()
        await enqueue(engine, kind, ref, causes[kind])
    await enqueue(engine, "retention", "sweep", None)
    queue = JobQueue(engine)
    runners = [Runner(queue, kind) for kind in ("finalize", "deliver", "erase", "retention")]
    background = worker(queue, runners, traced.tracing)
    # Started inside a span (a host application's lifespan, say): a job without a cause must not
    # become that span's child.
    with traced.tracing.span("lifespan", context=new_root()):
        background.start()
        lifespan = current_traceparent()
    try:
        await wait_for_rows(engine, all_done)
    finally:
        await background.close()

    names = {
        "finalize": "finalizer poll",
        "deliver": "webhook delivery",
        "erase": "erasure follow-up",
        "retention": "retention sweep",
    }
    for job_kind, name in names.items():
        span = traced.named(name)
        assert span.context is not None
        assert dict(span.attributes or {}) == {
            "liveness_proxy.job.kind": job_kind,
            "liveness_proxy.job.attempt": 1,
            **({"liveness_proxy.webhook.event_id": "evt-1"} if job_kind == "deliver" else {}),
        }
        assert span.status.status_code is StatusCode.UNSET
        if job_kind == "retention":
            assert span.parent is None, "a job without a stored context starts a trace of its own"
            assert span.context.trace_id != ids_of(lifespan)[0]
        else:
            assert span.parent is not None
            assert (span.context.trace_id, span.parent.span_id) == ids_of(causes[job_kind]), job_kind
        # What the runner saw as current is the run's span: what it calls (upstream, a webhook) nests.
        [(_job, seen)] = next(runner for runner in runners if runner.kind == job_kind).seen
        assert ids_of(seen) == (span.context.trace_id, span.context.span_id)
    # Nothing personal: no span attribute holds the session id or the commitment (those jobs' refs).
    values = [str(value) for span in traced.spans() for value in (span.attributes or {}).values()]
    assert not {"s-1", COMMITMENT} & set(values)


async def test_a_run_follows_its_causes_sampling_decision(engine: AsyncEngine, traced: Traced) -> None:
    """The parent-based sampler keeps the cause's decision: a request that was not sampled has no
    sampled follow-up either; a stored value that is not a traceparent starts a new trace."""
    not_sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    await enqueue(engine, "finalize", "s-unsampled", not_sampled)
    await enqueue(engine, "deliver", "evt-garbled", "not a traceparent")
    queue = JobQueue(engine)
    runners = [Runner(queue, "finalize"), Runner(queue, "deliver")]
    background = worker(queue, runners, traced.tracing)
    background.start()
    try:
        await wait_for_rows(engine, all_done)
    finally:
        await background.close()
    assert [span.name for span in traced.spans()] == ["webhook delivery"]
    assert traced.named("webhook delivery").parent is None
    [(_job, unsampled_current)] = runners[0].seen
    # Not recorded, but still in the cause's trace: what it calls carries the trace on.
    assert unsampled_current is not None
    assert unsampled_current.split("-")[1] == not_sampled.split("-")[1]


async def test_a_failing_runner_gives_an_error_span_with_its_class(
    engine: AsyncEngine, traced: Traced
) -> None:
    with traced.tracing.span("cause", context=new_root()):
        cause = current_traceparent()
    await enqueue(engine, "deliver", "evt-1", cause)
    queue = JobQueue(engine)
    background = worker(queue, [Runner(queue, "deliver", fail=True)], traced.tracing)
    background.start()
    try:
        rows = await wait_for_rows(engine, lambda rows: rows["deliver", "evt-1"]["last_error"] is not None)
    finally:
        await background.close()
    assert rows["deliver", "evt-1"]["last_error"] == "the deliver runner failed: RuntimeError"
    span = traced.named("webhook delivery")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None  # never the exception's text
    assert (span.attributes or {})["error.type"] == "RuntimeError"
    assert span.events == ()  # no exception event: its message could quote anything
    assert span.parent is not None
    assert span.parent.span_id == ids_of(cause)[1]


async def test_a_run_cut_short_at_shutdown_ends_its_span_failed(engine: AsyncEngine, traced: Traced) -> None:
    await enqueue(engine, "finalize", "s-1", None)
    queue = JobQueue(engine)
    runner = Runner(queue, "finalize", work=30.0)
    background = worker(queue, [runner], traced.tracing, grace_seconds=0.1)
    background.start()
    deadline = time.monotonic() + 10
    while not runner.seen:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await background.close()
    span = traced.named("finalizer poll")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "CancelledError"


async def test_with_tracing_off_the_worker_runs_jobs_and_exports_nothing(engine: AsyncEngine) -> None:
    unstarted = Traced()  # built with an exporter but never started: off
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # written while tracing was on
    await enqueue(engine, "deliver", "evt-1", stored)
    await enqueue(engine, "finalize", "s-1", None)
    queue = JobQueue(engine)
    runners = [Runner(queue, "deliver"), Runner(queue, "finalize")]
    queued: tuple[tuple[JobKind, str], ...] = (("deliver", "evt-1"), ("finalize", "s-1"))
    for round_number, tracing in enumerate((unstarted.tracing, None)):
        if round_number:
            for kind, ref in queued:
                assert await queue.requeue(kind, ref, now=0.0)
        background = worker(queue, runners, tracing)
        background.start()
        try:
            await wait_for_rows(engine, all_done)
        finally:
            await background.close()
    assert [current for runner in runners for _job, current in runner.seen] == [None] * 4
    assert unstarted.exporter.get_finished_spans() == ()
    assert (await job_rows(engine))["deliver", "evt-1"]["trace_parent"] == stored  # a resend keeps it


# -- the webhook attempt's CLIENT span ----------------------------------------------------------------


async def attempt(url: str, secret: str, tracing: Tracing | None) -> Any:
    transport = Http1Transport(max_connections=1, connect_timeout_seconds=2)
    try:
        sender = WebhookSender(
            transport,
            url,
            keys=parse_webhook_secrets(secret),
            timeout_seconds=5,
            wall_clock=time.time,
            tracing=tracing,
        )
        return await sender.attempt("evt-1", b'{"type":"liveness.ping"}')
    finally:
        await transport.aclose()


async def test_the_receiver_gets_the_traceparent_of_the_attempts_client_span(traced: Traced) -> None:
    with WebhookReceiver() as receiver:
        receiver.script.append(503)
        with traced.tracing.span("webhook delivery", context=new_root()):
            refused = await attempt(receiver.url + "?token=s3cret", receiver.secret, traced.tracing)
            delivered = await attempt(receiver.url, receiver.secret, traced.tracing)
        first, second = receiver.wait_for(2, accepted=False)
        port = int(receiver.url.split(":")[2].split("/")[0])
    assert (refused.status, delivered.status) == (503, 200)
    posts = [span for span in traced.spans() if span.name == "POST"]
    delivery = traced.named("webhook delivery")
    assert len(posts) == 2
    for received, span in zip((first, second), posts, strict=True):
        assert span.kind is SpanKind.CLIENT
        assert span.context is not None
        assert span.parent is not None
        assert span.parent.span_id == delivery.get_span_context().span_id  # type: ignore[union-attr]
        assert ids_of(received.headers.get("traceparent")) == (span.context.trace_id, span.context.span_id)
        assert "tracestate" not in received.headers
        attributes = dict(span.attributes or {})
        status = attributes.pop("http.response.status_code")
        assert status == received.answered
        failed = status >= 400
        assert attributes.pop("error.type", None) == ("503" if failed else None)
        assert span.status.status_code is (StatusCode.ERROR if failed else StatusCode.UNSET)
        # The receiver's host, port and scheme; never the path or query (a token may be in them).
        assert attributes == {
            "http.request.method": "POST",
            "server.address": "127.0.0.1",
            "server.port": port,
            "url.scheme": "http",
        }
    values = [str(value) for span in posts for value in (span.attributes or {}).values()]
    assert not [value for value in values if "s3cret" in value or "/hooks" in value]


async def test_an_attempt_without_an_answer_names_the_error_class(traced: Traced) -> None:
    with traced.tracing.span("webhook delivery", context=new_root()):
        outcome = await attempt("http://127.0.0.1:9/hooks", new_webhook_secret(), traced.tracing)
    assert outcome.status is None
    span = traced.named("POST")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == outcome.error.removeprefix("no answer: ")
    assert "http.response.status_code" not in (span.attributes or {})


async def test_with_tracing_off_no_traceparent_is_sent() -> None:
    with WebhookReceiver() as receiver:
        outcome = await attempt(receiver.url, receiver.secret, None)
        [received] = receiver.wait_for(1)
    assert outcome.status == 200
    assert not {"traceparent", "tracestate"} & set(received.headers)
