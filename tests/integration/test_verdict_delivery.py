"""Verdict delivery end to end: the proxy follows sessions nobody reads to their verdict, records it
in the audit chain and delivers it to a real receiver that verifies every signature with the
official `standardwebhooks` package; retries, 410, dead letters and Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import orjson

from liveness_proxy.sandbox import Fault
from liveness_proxy.store import AuditLog, JobQueue, WebhookOutbox
from metric_samples import value
from support import TEST_AUDIT_KEYS, ProxyHarness, find_leaks, wait_until
from webhook_receiver import WebhookReceiver

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

# Seconds instead of minutes: the same code, on a schedule a test can wait for.
FAST = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.8",
    "LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS": 2,
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
    "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2",
}


def run(proxy: ProxyHarness, work: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        async with proxy.database() as engine:
            return await work(engine)

    return asyncio.run(go())


def test_a_verdict_nobody_reads_reaches_the_backend_signed(make_proxy: MakeProxy) -> None:
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=97.5)
        [delivery] = receiver.wait_for(1)
        reads_at_delivery = proxy.result_reads(session_id)
        time.sleep(1.0)  # past every remaining offset: a final session is not read again
        reads_later = proxy.result_reads(session_id)
        chain = [row for row in proxy.audit_rows() if row["action"] == "verdict.record"]
        verdict = run(proxy, lambda engine: AuditLog(engine, TEST_AUDIT_KEYS).verify())
        metrics = proxy.runtime.metrics
        # The backlog gauges are sampled every few passes: wait for a sample taken after the delivery.
        wait_until(
            lambda: (
                value(metrics, "liveness_proxy_jobs", kind="deliver", state="queued")
                + value(metrics, "liveness_proxy_jobs", kind="finalize", state="queued")
                == 0
            )
        )
        observed = {
            "terminal": value(metrics, "liveness_proxy_finalizer_polls_total", outcome="terminal"),
            "final": value(metrics, "liveness_proxy_finalizer_outcomes_total", outcome="final"),
            "delivered": value(metrics, "liveness_proxy_webhook_attempts_total", result="delivered"),
            "following": value(metrics, "liveness_proxy_jobs", kind="finalize", state="queued"),
        }
    assert observed == {"terminal": 1, "final": 1, "delivered": 1, "following": 0}
    assert delivery.verified, "standardwebhooks rejected our signature"
    assert delivery.webhook_id.startswith("msg_")
    assert abs(delivery.timestamp - time.time()) < 30
    body = delivery.body
    assert body["type"] == "liveness.session.completed"
    assert body["data"]["session_id"] == session_id
    assert body["data"]["subject"] == "alice"
    assert body["data"]["status"] == "SUCCEEDED"
    assert body["data"]["confidence"] == 97.5
    assert body["data"]["passed"] is None  # no pass threshold configured
    assert set(body["data"]) == {
        "session_id",
        "subject",
        "reference",
        "status",
        "confidence",
        "passed",
        "created_at",
        "completed_at",
    }
    assert reads_at_delivery >= 1
    assert reads_later == reads_at_delivery
    [event] = chain
    detail = orjson.loads(event["detail"])
    assert detail["read_by"] == "finalizer"
    assert detail["status"] == "SUCCEEDED"
    assert detail["event_id"] == delivery.webhook_id
    assert verdict.problem is None


def test_a_callers_terminal_read_ends_the_follow_up_at_once(make_proxy: MakeProxy) -> None:
    slow = {**FAST, "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.6,1.2"}
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**slow, **receiver.settings()}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
            proxy.sandbox.complete_session(session_id, live=False, confidence=4.0)
            answer = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
        [delivery] = receiver.wait_for(1)
        time.sleep(1.5)  # past both offsets
        reads = proxy.result_reads(session_id)
        chain = [row for row in proxy.audit_rows() if row["action"] == "verdict.record"]
    assert answer.json()["status"] == "FAILED"
    assert reads == 1, "the finalizer read a session a caller had already finalized"
    assert delivery.body["data"]["status"] == "FAILED"
    assert orjson.loads(chain[0]["detail"])["read_by"] == "request"
    assert chain[0]["request_id"] == answer.headers["x-request-id"]


def test_an_expired_session_gives_the_expired_event(make_proxy: MakeProxy) -> None:
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.expire_session(session_id)
        [delivery] = receiver.wait_for(1)
    assert delivery.body["type"] == "liveness.session.expired"
    assert delivery.body["data"]["status"] == "EXPIRED"


def test_past_the_deadline_the_session_is_unresolved_and_a_later_verdict_follows(
    make_proxy: MakeProxy,
) -> None:
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
            [unresolved] = receiver.wait_for(1, timeout=10)
            proxy.sandbox.complete_session(session_id, live=True, confidence=99.0)
            client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
        deliveries = receiver.wait_for(2)
    assert unresolved.body["type"] == "liveness.session.unresolved"
    assert unresolved.body["data"]["status"] is None
    assert deliveries[1].body["type"] == "liveness.session.completed"
    assert deliveries[1].webhook_id != unresolved.webhook_id


def test_a_failing_receiver_gets_retries_under_the_same_webhook_id(make_proxy: MakeProxy) -> None:
    with (
        WebhookReceiver(script=deque([500, 502])) as receiver,
        make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy,
    ):
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)
        receiver.wait_for(1)
        attempts = list(receiver.deliveries)
    assert [attempt.answered for attempt in attempts] == [500, 502, 200]
    assert len({attempt.webhook_id for attempt in attempts}) == 1
    assert all(attempt.verified for attempt in attempts), "every attempt is signed afresh and valid"
    assert attempts[0].body == attempts[2].body


def test_retry_after_is_honoured(make_proxy: MakeProxy) -> None:
    script: deque[int | tuple[int, dict[str, str]]] = deque([(503, {"Retry-After": "2"})])
    with (
        WebhookReceiver(script=script) as receiver,
        make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy,
    ):
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)
        receiver.wait_for(1)
        first, second = receiver.deliveries
    assert second.received_at - first.received_at >= 1.9


def test_a_dead_letter_is_delivered_by_resend_and_410_waits_for_enable(make_proxy: MakeProxy) -> None:
    with (
        WebhookReceiver(always=500) as receiver,
        make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy,
    ):
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)
        receiver.wait_for(3, accepted=False)

        def dead() -> list[Any]:
            events = run(proxy, lambda engine: WebhookOutbox(engine).events(failed_only=True))
            return [event for event in events if event.state == "dead"]

        [letter] = wait_until(dead)
        assert letter.attempts == 3
        assert letter.last_error == "HTTP 500"
        # The receiver is back, but answers 410 once: the endpoint is disabled, nothing is lost.
        receiver.always = None
        receiver.script.append(410)
        assert run(
            proxy, lambda engine: JobQueue(engine).requeue("deliver", letter.event_id, now=time.time())
        )
        wait_until(lambda: run(proxy, lambda engine: WebhookOutbox(engine).endpoint_disabled_at()))
        time.sleep(0.5)
        assert receiver.accepted() == []
        [queued] = run(proxy, lambda engine: WebhookOutbox(engine).events())
        assert queued.state == "queued"
        assert run(proxy, lambda engine: WebhookOutbox(engine).enable_endpoint())
        [delivery] = receiver.wait_for(1)
        # The delivery is recorded once its 200 is read, just after the receiver answered it.
        wait_until(lambda: "webhook.delivered" in [row["action"] for row in proxy.audit_rows()])
        actions = [row["action"] for row in proxy.audit_rows()]
    assert delivery.webhook_id == letter.event_id
    assert delivery.verified
    assert [attempt.answered for attempt in receiver.deliveries] == [500, 500, 500, 410, 200]
    assert actions.count("webhook.dead_letter") == 1
    assert actions.count("webhook.disabled") == 1
    assert actions.count("webhook.delivered") == 1


def test_with_the_finalizer_off_nothing_is_followed(make_proxy: MakeProxy) -> None:
    with (
        WebhookReceiver() as receiver,
        make_proxy(
            proxy_overrides={**FAST, **receiver.settings(), "LIVENESS_PROXY_FINALIZER": "off"}
        ) as proxy,
    ):
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)
        time.sleep(1.0)
        assert proxy.result_reads(session_id) == 0
        assert receiver.deliveries == []
        # A caller's read still records the verdict, and the webhook still goes out.
        with proxy.client() as client:
            client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
        [delivery] = receiver.wait_for(1)
    assert delivery.body["data"]["session_id"] == session_id


def test_webhooks_and_what_they_leave_behind_carry_no_secret_token_or_image(make_proxy: MakeProxy) -> None:
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=97.5)
        [delivery] = receiver.wait_for(1)
        stored = run(proxy, lambda engine: WebhookOutbox(engine).events())
        audit = proxy.audit_rows()
        access_tokens = {
            record.headers["authorization"].removeprefix("Bearer ")
            for record in proxy.sandbox.request_log
            if "authorization" in record.headers
        }
    # The upstream result the finalizer read did carry images: the filter is not vacuous.
    assert proxy.sandbox.face_images(session_id)
    written = {
        "webhook": orjson.dumps(delivery.body).decode() + delivery.signature,
        "outbox": "\n".join(event.body.decode() for event in stored),
        "audit": "\n".join(str(row) for row in audit),
        "logs": proxy.log_text(),
    }
    for where, text in written.items():
        assert find_leaks(text) == [], f"{where}: {find_leaks(text)}"
        assert receiver.secret not in text, f"the webhook secret leaked into {where}"
        assert receiver.secret.removeprefix("whsec_") not in text
        for token in access_tokens:
            assert token not in text, f"an access token leaked into {where}"
        for image in proxy.sandbox.face_images(session_id):
            assert image[:40] not in text, f"a face image leaked into {where}"


def test_a_finalizer_backlog_never_takes_the_callers_upstream_slots(make_proxy: MakeProxy) -> None:
    """Callers get one upstream slot and no queueing; the finalizer is saturated with slow reads of
    many sessions. The caller's read still gets its slot: the finalizer has a budget of its own,
    and never exceeds it."""
    settings = {
        **FAST,
        "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.1,5",
        "LIVENESS_PROXY_FINALIZER_CONCURRENCY": 4,
        "LIVENESS_PROXY_UPSTREAM_CONCURRENCY": 1,
        "LIVENESS_PROXY_UPSTREAM_QUEUE_TIMEOUT_SECONDS": 0,
        "CYNOPSIS_TIMEOUT_SECONDS": 5,
    }
    with make_proxy(proxy_overrides=settings) as proxy, proxy.client() as client:
        proxy.sandbox.inject_fault(
            Fault(target="liveness_result", kind="latency", delay_seconds=0.8, count=13)
        )
        sessions = [proxy.create_session(client) for _ in range(12)]
        background = proxy.runtime.background
        wait_until(lambda: background.running_jobs == 4)
        answer = client.get(f"/v1/liveness/sessions/{sessions[0]}/result", headers=proxy.auth())
        busy = []
        for _ in range(50):
            busy.append(background.running_jobs)
            time.sleep(0.01)
    assert answer.status_code == 200, answer.text
    assert max(busy) <= 4


def test_a_redirect_is_a_failed_attempt_never_followed(make_proxy: MakeProxy) -> None:
    with WebhookReceiver() as receiver, make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy:
        # Pointing back at the receiver itself: had the proxy followed it, a third POST would arrive.
        receiver.script.append((307, {"Location": receiver.url + "?redirected=1"}))
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)
        [delivery] = receiver.wait_for(1)
        time.sleep(0.3)
        answers = [attempt.answered for attempt in receiver.deliveries]
        [event] = run(proxy, lambda engine: WebhookOutbox(engine).events())
    assert answers == [307, 200]
    assert (event.state, event.attempts, event.last_status) == ("done", 2, 200)
    assert delivery.verified
