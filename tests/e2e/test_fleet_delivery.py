"""Verdict delivery across processes and crashes: `serve` replicas on PostgreSQL (and one process on
SQLite) follow sessions nobody reads to their verdict and deliver each to a real receiver that
verifies every signature with the `standardwebhooks` package. Replicas are SIGKILLed in the middle
of a poll and of a delivery; the work they held is claimed by another process once its lease lapses.

Counted in the receiver's view, deduplicated by `webhook-id` as Standard Webhooks asks of a
receiver: each verdict exactly once. Raw deliveries may repeat only across a crash.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from e2e.test_fleet import Fleet, _create_session, _start_serve, _wait_listening, running_fleet
from liveness_proxy.sandbox import Fault
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.store import AuditLog, create_engine
from liveness_proxy.store.tables import jobs, webhook_events
from support import TEST_AUDIT_KEYS, LogScan
from webhook_receiver import Delivery, WebhookReceiver

# `serve` subprocesses, and leases that must lapse: 3.5-7 s per test on an idle 2-core machine. Not
# in the "heavy" group: their waits are lease- and deadline-bound, not timing-bound (they passed at
# a load average of 8), and the heavy chain is what `make test` waits for.
pytestmark = [pytest.mark.slow]

T = TypeVar("T")

# The production code on a schedule of seconds: first read 0.5 s after creation.
FAST = {
    "LIVENESS_PROXY_FINALIZER": "true",
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.5,1,2,4",
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": "0.2",
    "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,0.5,1,2",
}
# Without crashes no lease ever lapses, so a long one: a job slowed down by a loaded machine is never
# claimed twice, and a duplicate delivery can only mean a bug.
NO_CRASH = {**FAST, "LIVENESS_PROXY_WORKER_LEASE_SECONDS": "30"}
# With crashes the lease is what the survivors wait for: short, yet longer than any call a job makes
# (a lease that lapsed while its holder still waited for an answer would duplicate work uncrashed).
LEASE_SECONDS = 3.0
CRASHING = {
    **FAST,
    "LIVENESS_PROXY_WORKER_LEASE_SECONDS": str(LEASE_SECONDS),
    "CYNOPSIS_TIMEOUT_SECONDS": "2",
    "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": "0.5",
    "LIVENESS_PROXY_WEBHOOK_TIMEOUT_SECONDS": "2",
}
DELIVERY_TIMEOUT = 30.0  # generous: only a failure waits this long


@dataclass(frozen=True)
class Expected:
    event_type: str
    status: str
    confidence: float | None
    subject: str


class FleetDatabase:
    """The fleet's database, read by the test through an engine of its own."""

    def __init__(self, fleet: Fleet) -> None:
        ours = {
            name: value for name, value in fleet.env.items() if name.startswith(("CYNOPSIS_", "LIVENESS_"))
        }
        self.url = settings_from_mapping(ours).database_url

    def _run(self, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        async def go() -> T:
            engine = create_engine(self.url, pool_size=1)
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        return asyncio.run(go())

    def job(self, kind: str, ref: str) -> Row[Any]:
        async def read(engine: AsyncEngine) -> Row[Any]:
            async with engine.connect() as connection:
                query = select(jobs).where(jobs.c.kind == kind, jobs.c.ref == ref)
                return (await connection.execute(query)).one()

        return self._run(read)

    def delivered_at(self, event_id: str) -> float | None:
        async def read(engine: AsyncEngine) -> float | None:
            async with engine.connect() as connection:
                query = select(webhook_events.c.delivered_at).where(webhook_events.c.event_id == event_id)
                value = (await connection.execute(query)).scalar_one()
            return None if value is None else float(value)

        return self._run(read)

    def audit(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether the chain verifies, and its records."""

        async def read(engine: AsyncEngine) -> tuple[bool, list[dict[str, Any]]]:
            log = AuditLog(engine, TEST_AUDIT_KEYS)
            verdict = await log.verify()
            return verdict.ok, [row async for row in log.iterate()]

        return self._run(read)


@dataclass
class HoldingReceiver(WebhookReceiver):
    """A receiver that takes in the first `hold` deliveries (records them as accepted, as a backend
    that committed the event would) but holds its answer until the sender hangs up or `release` is
    set: the sender dies before it learns the delivery succeeded."""

    hold: int = 1
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        super().__exit__(*exc)

    async def _receive(self, request: Request) -> Response:
        with self._lock:
            held = self.hold > 0
            if held:
                self.hold -= 1
        response = await super()._receive(request)
        if held:
            self.holding.set()
            while not self.release.is_set() and not await request.is_disconnected():
                await asyncio.sleep(0.01)
        return response


def wait_until(condition: Callable[[], T], what: str, *, timeout: float = DELIVERY_TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def result_reads(fleet: Fleet, session_id: str) -> int:
    path = fleet.sandbox.config.result_path_prefix + session_id
    return sum(request.path == path for request in fleet.sandbox.request_log)


def replica_of(fleet: Fleet, lease_owner: str) -> int:
    """Which replica holds a lease: the owner names its pid (`host:pid:random`), and every process of
    a replica is in the process group its `serve` leads."""
    pid = int(lease_owner.rsplit(":", 2)[1])
    group = os.getpgid(pid)
    [index] = [index for index, process in enumerate(fleet.processes) if process.pid == group]
    return index


def by_session(deliveries: list[Delivery]) -> dict[str, list[Delivery]]:
    grouped: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.body["data"]["session_id"], []).append(delivery)
    return grouped


def chain_actions(records: list[dict[str, Any]], action: str) -> dict[str, list[dict[str, Any]]]:
    """The details of the chain's `action` records, by session."""
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["action"] == action:
            found.setdefault(str(record["session_id"]), []).append(orjson.loads(record["detail"]))
    return found


def assert_delivered_once(
    receiver: WebhookReceiver, expected: dict[str, Expected], database: FleetDatabase
) -> list[Delivery]:
    """Each session's verdict reached the receiver signed, exactly once after deduplication by
    webhook-id, as the verdict the sandbox gave; the audit chain verifies and holds one
    `verdict.record` per session naming the event delivered. Returns the deduplicated deliveries."""
    accepted = receiver.wait_for(len(expected), timeout=DELIVERY_TIMEOUT)
    sessions = by_session(accepted)
    assert sorted(sessions) == sorted(expected), "a verdict is missing, or one nobody expected arrived"
    for session_id, want in expected.items():
        [delivery] = sessions[session_id]  # one event per session, not two under different ids
        assert delivery.verified, f"standardwebhooks rejected the signature of {session_id}"
        assert delivery.body["type"] == want.event_type, session_id
        data = delivery.body["data"]
        assert (data["status"], data["confidence"], data["subject"]) == (
            want.status,
            want.confidence,
            want.subject,
        ), session_id
    assert all(delivery.verified for delivery in receiver.deliveries)
    chain_ok, records = database.audit()
    assert chain_ok, "the audit chain does not verify"
    verdicts = chain_actions(records, "verdict.record")
    assert sorted(verdicts) == sorted(expected)
    for session_id, [detail] in verdicts.items():
        assert detail["read_by"] == "finalizer", "no caller read a result: the finalizer did"
        assert detail["status"] == expected[session_id].status
        assert detail["event_id"] == sessions[session_id][0].webhook_id
    return accepted


@contextmanager
def fleet_with_receiver(
    tmp_path: Path,
    log_scan: LogScan,
    request: pytest.FixtureRequest,
    receiver: WebhookReceiver,
    settings: dict[str, str],
    *,
    replicas: int,
    shared: bool = True,
) -> Iterator[Fleet]:
    """A fleet that delivers its webhooks to `receiver`, with `settings` on top of the fleet's own."""
    with (
        receiver,
        running_fleet(
            tmp_path,
            log_scan,
            request.node.nodeid,
            replicas=replicas,
            shared=shared,
            **{**receiver.settings(), **settings},
        ) as fleet,
    ):
        yield fleet


@pytest.mark.parametrize(("replicas", "count"), [(1, 12), (3, 30)])
def test_every_unread_verdict_is_delivered_exactly_once(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest, replicas: int, count: int
) -> None:
    receiver = WebhookReceiver()
    with fleet_with_receiver(tmp_path, log_scan, request, receiver, NO_CRASH, replicas=replicas) as fleet:
        database = FleetDatabase(fleet)
        expected: dict[str, Expected] = {}
        callers = ("alice", "bob", "dave")
        for number in range(count):
            who = callers[number % len(callers)]
            created = _create_session(fleet, fleet.next_url(), who)
            assert created.status_code == 201, created.text
            session_id = created.json()["session_id"]
            # Live, spoof and expired, finished upstream at once; no caller ever reads a result.
            if number % 3 == 2:
                fleet.sandbox.expire_session(session_id)
                expected[session_id] = Expected("liveness.session.expired", "EXPIRED", None, who)
            else:
                live = number % 3 == 0
                confidence = 90.0 + number / 10 if live else 5.0 + number / 10
                fleet.sandbox.complete_session(session_id, live=live, confidence=confidence)
                status = "SUCCEEDED" if live else "FAILED"
                expected[session_id] = Expected("liveness.session.completed", status, confidence, who)

        assert_delivered_once(receiver, expected, database)
        # Every delivery settled (the chain records it) before the raw count is final.
        wait_until(
            lambda: len(chain_actions(database.audit()[1], "webhook.delivered")) == count,
            "every delivery to be recorded",
        )
        raw = list(receiver.deliveries)
    assert len(raw) == count, "a delivery was sent twice although no process crashed"
    assert len({delivery.webhook_id for delivery in raw}) == count


def test_a_replica_killed_mid_poll_loses_nothing(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    receiver = WebhookReceiver()
    with fleet_with_receiver(tmp_path, log_scan, request, receiver, CRASHING, replicas=2) as fleet:
        database = FleetDatabase(fleet)
        # The first result read hangs upstream (until its caller hangs up): a replica stays in it.
        fleet.sandbox.inject_fault(Fault(target="liveness_result", kind="latency", delay_seconds=60))
        created = _create_session(fleet, fleet.urls[0], "alice")
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        fleet.sandbox.complete_session(session_id, live=True, confidence=96.5)

        wait_until(lambda: result_reads(fleet, session_id) == 1, "the finalizer's first read")
        held = database.job("finalize", session_id)
        victim = replica_of(fleet, held.lease_owner)
        fleet.kill(victim)
        after_kill = database.job("finalize", session_id)
        # Killed mid-job: its claim is still there, unsettled, and nobody else may take it yet.
        assert (after_kill.state, after_kill.lease_owner) == ("queued", held.lease_owner)
        while time.time() < held.lease_until - 0.2:
            assert result_reads(fleet, session_id) == 1, "the job was claimed again within its lease"
            time.sleep(0.05)

        assert_delivered_once(
            receiver,
            {session_id: Expected("liveness.session.completed", "SUCCEEDED", 96.5, "alice")},
            database,
        )
        finished = wait_until(
            lambda: (job := database.job("finalize", session_id)).state == "done" and job,
            "the follow-up to end",
        )
        reads = result_reads(fleet, session_id)
    assert finished.attempts == 2, "claimed once by the victim, once by the survivor"
    assert reads == 2
    assert len(receiver.deliveries) == 1


def test_a_replica_killed_mid_delivery_is_redelivered_under_the_same_webhook_id(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    receiver = HoldingReceiver()
    with fleet_with_receiver(tmp_path, log_scan, request, receiver, CRASHING, replicas=2) as fleet:
        database = FleetDatabase(fleet)
        created = _create_session(fleet, fleet.urls[1], "bob")
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        fleet.sandbox.complete_session(session_id, live=False, confidence=3.5)

        assert receiver.holding.wait(DELIVERY_TIMEOUT), "the first delivery never arrived"
        [first] = receiver.deliveries
        held = database.job("deliver", first.webhook_id)
        victim = replica_of(fleet, held.lease_owner)
        fleet.kill(victim)  # the receiver took the event in; its answer never reaches the sender
        lease_ends = time.monotonic() + (held.lease_until - time.time())
        after_kill = database.job("deliver", first.webhook_id)
        assert (after_kill.state, after_kill.lease_owner) == ("queued", held.lease_owner)
        assert database.delivered_at(first.webhook_id) is None

        [accepted] = assert_delivered_once(
            receiver,
            {session_id: Expected("liveness.session.completed", "FAILED", 3.5, "bob")},
            database,
        )
        second = wait_until(lambda: receiver.deliveries[1:], "the redelivery")[0]
        wait_until(lambda: database.job("deliver", first.webhook_id).state == "done", "the job to end")
        finished = database.job("deliver", first.webhook_id)
        chain_ok, records = database.audit()
    assert chain_ok
    assert accepted.webhook_id == first.webhook_id
    assert second.webhook_id == first.webhook_id, "a redelivery must keep the webhook-id to be deduplicated"
    assert second.verified
    assert second.body == first.body
    assert second.received_at >= lease_ends - 0.05, "redelivered before the victim's lease lapsed"
    assert len(receiver.deliveries) == 2
    assert finished.attempts == 2
    assert [detail["event_id"] for detail in chain_actions(records, "webhook.delivered")[session_id]] == [
        first.webhook_id
    ]


def test_a_follow_up_due_while_the_only_process_was_down_runs_after_restart(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    # SQLite: one process claims the follow-ups; here it is killed before the first read was due.
    receiver = WebhookReceiver()
    with fleet_with_receiver(
        tmp_path, log_scan, request, receiver, CRASHING, replicas=1, shared=False
    ) as fleet:
        database = FleetDatabase(fleet)
        created = _create_session(fleet, fleet.urls[0], "alice")
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        fleet.kill(0)
        assert result_reads(fleet, session_id) == 0, "killed too late: the first read already ran"

        # While nothing runs, the session finishes upstream and its follow-up falls due.
        fleet.sandbox.complete_session(session_id, live=True, confidence=88.0)
        waiting = database.job("finalize", session_id)
        assert waiting.state == "queued"
        wait_until(lambda: time.time() > waiting.due_at + 0.5, "the follow-up to fall due")
        assert receiver.deliveries == []

        process, url = _start_serve(fleet.env, fleet.log_files[0])
        fleet.processes[0], fleet.urls[0] = process, url  # so the fleet stops it at the end
        _wait_listening(process, url)
        assert_delivered_once(
            receiver,
            {session_id: Expected("liveness.session.completed", "SUCCEEDED", 88.0, "alice")},
            database,
        )
        reads = result_reads(fleet, session_id)
    assert reads == 1
    assert len(receiver.deliveries) == 1
