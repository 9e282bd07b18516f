"""Webhook deliveries: one signed attempt per claim, retried on a schedule with jitter.

The schedule lists delays in seconds after the previous attempt; its first entry is the wait after
the event was written, which the verdict ledger applies when it queues the event. After as many
failed attempts as the schedule has entries, the event is a dead letter (`liveness-proxy webhooks
list --failed`, `webhooks resend`). `Retry-After` on 429/503 is honoured: the next attempt is no
sooner than it says. `410 Gone` disables the endpoint: no delivery is claimed until
`liveness-proxy webhooks enable`, and the events wait queued, not dead-lettered.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from liveness_proxy.delivery import WebhookSender
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.store import ClaimedJob, DeliveryRecorder, WebhookOutbox
from liveness_proxy.store.jobs import JobKind

_JITTER = 0.2  # each delay is drawn from ±20% around its value, so retries of many events spread out


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    delays: tuple[float, ...]

    def after_attempt(
        self, attempts: int, *, retry_after: float | None, draw: Callable[[], float]
    ) -> float | None:
        """Seconds until the next attempt after `attempts` failed ones (so `delays[attempts]`; the
        first entry was the wait before the first attempt), or None: dead letter."""
        if attempts >= len(self.delays):
            return None
        delay = self.delays[attempts] * (1 + _JITTER * (2 * draw() - 1))
        return max(delay, retry_after or 0.0)


class WebhookDeliveries:
    kind: JobKind = "deliver"

    def __init__(
        self,
        *,
        outbox: WebhookOutbox,
        recorder: DeliveryRecorder,
        sender: WebhookSender,
        schedule: RetrySchedule,
        concurrency: int,
        wall_clock: Callable[[], float],
        metrics: ProxyMetrics,
        logger: structlog.typing.FilteringBoundLogger,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._outbox = outbox
        self._recorder = recorder
        self._sender = sender
        self._schedule = schedule
        self.concurrency = concurrency
        self._wall_clock = wall_clock
        self._metrics = metrics
        self._logger = logger
        self._draw = draw

    async def ready(self) -> bool:
        return await self._outbox.endpoint_disabled_at() is None

    async def run(self, job: ClaimedJob, *, lease_owner: str) -> None:
        event = await self._outbox.event(job.ref)
        now = self._wall_clock()
        if event is None:  # nothing to send: the job has no purpose left
            await self._recorder.abandon(job, owner=lease_owner, now=now)
            return
        if event.body is None:  # erased (store/erasure.py), and queued again since: cancelled again
            await self._recorder.abandon(job, owner=lease_owner, now=now, state="cancelled", error="erased")
            return
        outcome = await self._sender.attempt(event.event_id, event.body)
        now = self._wall_clock()
        retry_at = None
        result = outcome.verdict
        if result == "failed":
            delay = self._schedule.after_attempt(
                job.attempts, retry_after=outcome.retry_after, draw=self._draw
            )
            retry_at = None if delay is None else now + delay
        settled = await self._recorder.settle_attempt(
            job,
            owner=lease_owner,
            now=now,
            result=result,
            status=outcome.status,
            error=outcome.error,
            retry_at=retry_at,
            session_id=event.session_id,
        )
        metric = "dead_letter" if result == "failed" and retry_at is None else result
        self._metrics.webhook_attempted(metric)
        log = self._logger.info if result == "delivered" else self._logger.warning
        log(
            "webhook_attempt",
            event_id=event.event_id,
            event_type=event.type,
            attempt=job.attempts,
            result=metric,
            status=outcome.status,
            error=outcome.error,
            lease_kept=settled,
        )
