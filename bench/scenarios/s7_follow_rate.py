"""S7, part two: how many sessions per second one process follows to a verdict, and how many
webhooks per second it delivers.

For each background budget of the plan (finalizer concurrency, webhook concurrency), one of our
proxies runs with the finalizer on and a webhook endpoint (nginx answering 204): the shipped budget
on S7's "on" proxy (idle at that point), every other one on a proxy of its own with a fresh SQLite
database. `follow_sessions` sessions are bound in its database at once, each with its first
follow-up due at once (as if that many sessions had just been created), and the run waits until
every session has a verdict and every verdict's webhook is delivered. The stub answers every result
read SUCCEEDED, so each session costs one upstream read, one verdict transaction (verdict,
`verdict.record` chain event, webhook event and its delivery job) and one signed delivery.

The rates are taken between the first and the last verdict (delivery) the database recorded, so
the worker's timer tick before it notices the new work does not count; the CPU time is the proxy
process's from the first verdict on. Nothing else runs against the proxy meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from common import BenchError, progress
from followups import FollowProgress, ProxyDatabase
from processes import cpu_seconds
from proxies import Bench, Proxy

from liveness_proxy.settings import Settings

# Compressed from the default 3,6,12,...: the stub's result is terminal, so only the first offset is
# ever used, and 1 s puts S2's follow-ups inside its measured window (see s7_finalizer.py).
FINALIZER_SCHEDULE = "1,2,4,8"
WEBHOOK_PATH = "/webhooks/liveness"  # bench/stub-nginx.conf answers it 204


@dataclass(frozen=True, slots=True)
class FollowBudget:
    finalizer: int
    webhooks: int

    @property
    def label(self) -> str:
        return f"finalizer {self.finalizer}, webhooks {self.webhooks}"


SHIPPED_BUDGET = FollowBudget(
    int(Settings.model_fields["liveness_proxy_finalizer_concurrency"].default),
    int(Settings.model_fields["liveness_proxy_webhook_concurrency"].default),
)


@dataclass(frozen=True, slots=True)
class FollowTarget:
    """A running proxy with the finalizer on and webhooks, and its database."""

    proxy: Proxy
    database: ProxyDatabase


def verdict_delivery_settings(bench: Bench, webhook_secret: str) -> dict[str, str]:
    """Our proxy's settings with the finalizer on and webhooks delivered to the stub receiver."""
    return {
        "LIVENESS_PROXY_FINALIZER": "on",
        "LIVENESS_PROXY_FINALIZER_SCHEDULE": FINALIZER_SCHEDULE,
        "LIVENESS_PROXY_WEBHOOK_URL": bench.stubs.stub + WEBHOOK_PATH,
        "LIVENESS_PROXY_WEBHOOK_SECRET": webhook_secret,
    }


def _wait_until_all_delivered(
    bench: Bench, target: FollowTarget, prefix: str, count: int
) -> tuple[float, int]:
    """Polls until all `count` sessions have a verdict and a delivered webhook; returns the CPU
    seconds the proxy used from the first verdict seen on, and the verdicts seen then."""
    process = target.proxy.process
    # Generous: a loaded 2-core machine followed ~40 sessions/s; this gives up below 5/s.
    deadline = time.monotonic() + 60 + count / 5
    cpu_at_first: float | None = None
    verdicts_at_first = 0
    seen = FollowProgress(0, 0)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{target.proxy.name} exited: {bench.children.log_tail(process)}")
        cpu_now = cpu_seconds(process.pid)
        seen = target.database.progress(prefix)
        if cpu_at_first is None and seen.verdicts > 0:
            cpu_at_first, verdicts_at_first = cpu_now, seen.verdicts
        if seen.verdicts >= count and seen.deliveries >= count:
            return cpu_seconds(process.pid) - (cpu_at_first or 0.0), verdicts_at_first
        time.sleep(0.1)
    raise BenchError(
        f"S7: {target.proxy.name} followed {seen.verdicts} and delivered {seen.deliveries} of {count} "
        f"sessions in time: {bench.children.log_tail(process)}"
    )


def _per_second(items: int, first: float | None, last: float | None) -> float | None:
    if first is None or last is None or last <= first or items < 2:
        return None
    return round((items - 1) / (last - first), 1)


def _span(first: float | None, last: float | None) -> float | None:
    return None if first is None or last is None else round(last - first, 3)


def follow_on(bench: Bench, target: FollowTarget, prefix: str) -> dict[str, Any]:
    """Binds `follow_sessions` sessions due at once and waits for all their verdicts and webhooks."""
    count = bench.plan.follow_sessions
    target.database.bind_sessions(prefix, count)
    cpu_used, verdicts_at_first = _wait_until_all_delivered(bench, target, prefix, count)
    timeline = target.database.timeline(prefix)
    if timeline.verdicts_by_finalizer != count:
        raise BenchError(f"S7: {timeline.verdicts_by_finalizer} of {count} verdicts came from the finalizer")
    followed = _per_second(count, timeline.first_verdict_at, timeline.last_verdict_at)
    delivered = _per_second(count, timeline.first_delivery_at, timeline.last_delivery_at)
    if followed is None or delivered is None:
        raise BenchError(f"S7: no rate measured over {count} sessions (fewer than 2?)")
    # CPU from the first verdict seen on covers the remaining sessions' reads and verdicts and
    # (nearly) every delivery: an approximate cost per session followed and announced.
    sessions_in_cpu = max(1, count - verdicts_at_first)
    return {
        "sessions": count,
        "followed_per_second": followed,
        "delivered_per_second": delivered,
        "verdicts_first_to_last_seconds": _span(timeline.first_verdict_at, timeline.last_verdict_at),
        "deliveries_first_to_last_seconds": _span(timeline.first_delivery_at, timeline.last_delivery_at),
        "cpu_ms_per_session": round(cpu_used * 1000 / sessions_in_cpu, 2),
    }


def _follow_on_own_proxy(bench: Bench, budget: FollowBudget, webhook_secret: str) -> dict[str, Any]:
    name = f"ours-s7-follow-f{budget.finalizer}-w{budget.webhooks}"
    database_url = bench.sqlite_url(name)
    env = bench.our_env(
        f"S7 follow ({budget.label})",
        database_url=database_url,
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
        **verdict_delivery_settings(bench, webhook_secret),
        LIVENESS_PROXY_FINALIZER_CONCURRENCY=str(budget.finalizer),
        LIVENESS_PROXY_WEBHOOK_CONCURRENCY=str(budget.webhooks),
    )
    proxy = bench.start_ours(name, env)
    try:
        bench.wait_ok(proxy, "/readyz")
        with ProxyDatabase(database_url, pepper=bench.pepper) as database:
            return follow_on(bench, FollowTarget(proxy, database), "follow")
    finally:
        bench.children.stop(proxy.process)


def follow_rates(bench: Bench, webhook_secret: str, shipped: FollowTarget) -> list[dict[str, Any]]:
    """Every budget of the plan, once (`shipped` runs the shipped budget): each run is already an
    average over `follow_sessions` sessions, and `--reps` would multiply S7's longest part."""
    plan = bench.plan
    budgets = [FollowBudget(finalizer, webhooks) for finalizer, webhooks in plan.follow_budgets]
    progress(
        f"S7 sessions followed per second: {plan.follow_sessions} bound sessions due at once, "
        f"budgets {'; '.join(budget.label for budget in budgets)}"
    )
    summary = []
    for budget in budgets:
        if budget == SHIPPED_BUDGET:
            run = follow_on(bench, shipped, "follow")
        else:
            run = _follow_on_own_proxy(bench, budget, webhook_secret)
        progress(
            f"  {budget.label}: {run['followed_per_second']:,.1f} followed/s, "
            f"{run['delivered_per_second']:,.1f} delivered/s, {run['cpu_ms_per_session']} ms CPU/session"
        )
        summary.append(
            {"finalizer_concurrency": budget.finalizer, "webhook_concurrency": budget.webhooks, **run}
        )
    return summary
