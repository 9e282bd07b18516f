"""S7 finalizer: what following every session to its verdict, and announcing it by webhook, costs the
hot path, and how many sessions per second one process can follow.

Two of our proxies run side by side: the finalizer off (and no webhook), and on, as shipped
(finalizer concurrency 4, webhooks 8), with a webhook endpoint (nginx, 204), so that every verdict
also writes its outbox row and is delivered. First part two (s7_follow_rate.py) measures the rate
at which one process follows sessions, then the hot path is measured.

The hot path, in one run: S1 (result read) and S2 (create session), wrk -t1 -c64, against both
proxies, interleaved repetitions as in S1/S2. The on/off ratios of req/s and p99 are the cost.
What keeps the finalizer working while the hot path is measured:

- S2 on: its own sessions. Each create schedules a follow-up in the binding's transaction; the
  schedule is compressed to 1,2,4,8 s (default 3,6,12,…) so that the sessions created in the window
  are read back within it. The stub answers SUCCEEDED, so each is read once and gets its verdict,
  chain event and webhook. At c64 sessions are created far faster than 4 follow-ups at a time
  finish: after its first second the finalizer works at its full budget.
- S1 on: a single session read over and over is nothing to follow, so a backlog of sessions is
  bound directly in the database (followups.py), due at once and large enough to outlast the window
  (sized from part two's rate): S1 is read with the finalizer at its full budget, the worst case for
  its concurrency (real traffic keeps it busy only as far as sessions are being created).

After each "on" measurement, the follow-ups and deliveries still queued are discarded (marked
done) so that they do not run into the next measurement; the JSON keeps what the background did
within the window and what was left.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import BENCH_DIR, RESULT_PATH, SESSIONS_PATH, BenchError, progress
from followups import ProxyDatabase
from proxies import Bench, Proxy, create_session, sample_failure
from stats import Outcome, Row, fmt_rate_and_p99, interleaved, median_of, ratio, summarize_all
from wrk import WrkReading, run_wrk

from liveness_proxy.webhook_signing import new_webhook_secret

from .s2_create_session import SAMPLE_POST_BODY
from .s7_follow_rate import (
    FINALIZER_SCHEDULE,
    SHIPPED_BUDGET,
    FollowTarget,
    follow_rates,
    verdict_delivery_settings,
)

# Sessions per second no single process follows, for sizing the busy backlog when part two did not
# measure the shipped budget.
FOLLOW_RATE_CEILING = 2_000.0


@dataclass(slots=True)
class HotPath:
    """The two proxies of the hot-path measurements, a session of each, and the "on" database."""

    off: Proxy
    on: Proxy
    off_session: str
    on_session: str
    on_database: ProxyDatabase
    # Sessions bound in front of the finalizer before each S1 "on" measurement (sized after part two).
    busy_backlog: int
    # What the background did during each "on" measurement (warm-up first, when there is one).
    background: dict[str, list[dict[str, Any]]]


def _result_read(bench: Bench, proxy: Proxy, session_id: str, seconds: int) -> WrkReading:
    url = proxy.url + RESULT_PATH.format(session_id=session_id)
    return run_wrk(url, connections=bench.plan.connections, seconds=seconds, headers=proxy.headers())


def _create(bench: Bench, proxy: Proxy, seconds: int) -> WrkReading:
    return run_wrk(
        proxy.url + SESSIONS_PATH,
        connections=bench.plan.connections,
        seconds=seconds,
        headers=proxy.headers(),
        script=BENCH_DIR / "post_session.lua",
    )


def _with_background(
    hot: HotPath, name: str, measure: Callable[[], WrkReading], extra: dict[str, Any]
) -> WrkReading:
    """Runs `measure` on the "on" proxy, records what its background did meanwhile, then discards
    the work still queued (twice: a follow-up running at the first pass may queue a delivery)."""
    started = time.time()
    reading = measure()
    ended = time.time()
    activity = hot.on_database.window_activity(started, ended)
    discarded = hot.on_database.discard_background_work()
    time.sleep(0.3)
    discarded += hot.on_database.discard_background_work()
    hot.background[name].append(
        {**extra, "window_seconds": round(ended - started, 3), **activity, "jobs_discarded_after": discarded}
    )
    return reading


def _result_read_busy(bench: Bench, hot: HotPath, seconds: int) -> WrkReading:
    prefix = f"busy{len(hot.background['s1_on'])}"
    hot.on_database.bind_sessions(prefix, hot.busy_backlog)
    deadline = time.monotonic() + 15
    while hot.on_database.progress(prefix).verdicts == 0:  # the worker's timer has picked them up
        if time.monotonic() > deadline:
            raise BenchError("S7: the finalizer did not start on the backlog within 15 s")
        time.sleep(0.05)
    return _with_background(
        hot,
        "s1_on",
        lambda: _result_read(bench, hot.on, hot.on_session, seconds),
        {"backlog_bound": hot.busy_backlog},
    )


def _busy_backlog(bench: Bench, follow: list[dict[str, Any]]) -> int:
    """Enough due follow-ups to keep the finalizer busy through a window (and the wait before it)
    at the rate it reached with nothing else running; under load it is slower still."""
    shipped = [
        entry
        for entry in follow
        if (entry["finalizer_concurrency"], entry["webhook_concurrency"])
        == (SHIPPED_BUDGET.finalizer, SHIPPED_BUDGET.webhooks)
    ]
    rate = float(shipped[0]["followed_per_second"]) if shipped else FOLLOW_RATE_CEILING
    seconds = max(bench.plan.seconds, bench.plan.warmup_seconds)
    return max(bench.plan.busy_backlog_floor, math.ceil(rate * (seconds + 2) * 1.5))


def start_hot_path(bench: Bench, webhook_secret: str) -> HotPath:
    progress("S7: starting our proxy with the finalizer off, and one with it on (+ webhook)")
    stub = bench.stubs.stub
    off_env = bench.our_env(
        "S7 finalizer off",
        database_url=bench.sqlite_url("s7-off"),
        api_base=stub,
        token_url=f"{stub}/oauth/token",
        LIVENESS_PROXY_FINALIZER="off",
    )
    on_url = bench.sqlite_url("s7-on")
    on_env = bench.our_env(
        "S7 finalizer on",
        database_url=on_url,
        api_base=stub,
        token_url=f"{stub}/oauth/token",
        **verdict_delivery_settings(bench, webhook_secret),
    )
    off, on = bench.start_ours("ours-s7-off", off_env), bench.start_ours("ours-s7-on", on_env)
    for proxy in (off, on):
        bench.wait_ok(proxy, "/readyz")
    return HotPath(
        off=off,
        on=on,
        off_session=create_session(off),
        on_session=create_session(on),
        on_database=ProxyDatabase(on_url),
        busy_backlog=bench.plan.busy_backlog_floor,
        background={"s1_on": [], "s2_on": []},
    )


def _measure_hot_path(bench: Bench, hot: HotPath) -> dict[str, Any]:
    measurements: dict[str, Callable[[int], WrkReading]] = {
        "s1_off": functools.partial(_result_read, bench, hot.off, hot.off_session),
        "s1_on": functools.partial(_result_read_busy, bench, hot),
        "s2_off": functools.partial(_create, bench, hot.off),
        "s2_on": lambda seconds: _with_background(hot, "s2_on", lambda: _create(bench, hot.on, seconds), {}),
    }
    readings, warmups = interleaved(bench.plan, bench.plan.seconds, measurements)
    measured = summarize_all(readings, warmups)
    for name, windows in hot.background.items():
        if warmups:
            measured[name]["warmup_background"] = windows[0]
        measured[name]["background"] = windows[1:] if warmups else windows
    for name, proxy, method, path, body in (
        ("s1_off", hot.off, "GET", RESULT_PATH.format(session_id=hot.off_session), None),
        ("s1_on", hot.on, "GET", RESULT_PATH.format(session_id=hot.on_session), None),
        ("s2_off", hot.off, "POST", SESSIONS_PATH, SAMPLE_POST_BODY),
        ("s2_on", hot.on, "POST", SESSIONS_PATH, SAMPLE_POST_BODY),
    ):
        if measured[name]["non_2xx"]["max"] > 0:
            measured[name]["sample_failure"] = sample_failure(proxy, method, path, body)
    return measured


def _median_background(measured: dict[str, Any], name: str, figure: str) -> float:
    values = sorted(window[figure] for window in measured[name]["background"])
    return float(values[len(values) // 2])


def _rows(measured: dict[str, Any], ratios: dict[str, float], follow: list[dict[str, Any]]) -> list[Row]:
    def hot_row(scenario: str, title: str, background: str) -> Row:
        return (
            f"S7 finalizer on vs off: {title}",
            fmt_rate_and_p99(measured, f"{scenario}_on"),
            f"off {fmt_rate_and_p99(measured, f'{scenario}_off')}; {background}",
            f"{ratios[f'{scenario}_on_to_off_requests_per_second']:.1%} req/s, "
            f"p99 {ratios[f'{scenario}_on_to_off_p99']:.2f}x",
            "—",
            "—",
        )

    followed_s1 = _median_background(measured, "s1_on", "sessions_followed_to_verdict")
    followed_s2 = _median_background(measured, "s2_on", "sessions_followed_to_verdict")
    created_s2 = _median_background(measured, "s2_on", "sessions_created")
    rows = [
        hot_row("s1", "S1 result read", f"finalizer busy: {followed_s1:,.0f} followed in the window"),
        hot_row(
            "s2",
            "S2 create session",
            f"{followed_s2:,.0f} of {created_s2:,.0f} created followed in the window",
        ),
    ]
    for entry in follow:
        rows.append(
            (
                f"S7 sessions followed, one process (finalizer {entry['finalizer_concurrency']}, "
                f"webhooks {entry['webhook_concurrency']})",
                f"{entry['followed_per_second']:,.0f} followed/s, "
                f"{entry['delivered_per_second']:,.0f} delivered/s",
                f"{entry['sessions']:,} bound sessions due at once; result SUCCEEDED; receiver 204",
                f"{entry['cpu_ms_per_session']:.1f} ms CPU per session",
                "—",
                "—",
            )
        )
    return rows


def scenario_s7(bench: Bench) -> Outcome:
    plan = bench.plan
    webhook_secret = new_webhook_secret()
    hot = start_hot_path(bench, webhook_secret)
    try:
        follow = follow_rates(bench, webhook_secret, FollowTarget(hot.on, hot.on_database))
        hot.busy_backlog = _busy_backlog(bench, follow)
        progress(
            f"S7 finalizer on vs off: S1 and S2, wrk -t1 -c{plan.connections} -d{plan.seconds}s "
            f"(S1 on: {hot.busy_backlog:,} sessions due at once in front of the finalizer)"
        )
        measured = _measure_hot_path(bench, hot)
    finally:
        hot.on_database.close()
        for proxy in (hot.off, hot.on):
            bench.children.stop(proxy.process)
    ratios = {
        f"{scenario}_on_to_off_{figure_name}": ratio(
            median_of(measured, f"{scenario}_on", figure), median_of(measured, f"{scenario}_off", figure)
        )
        for scenario in ("s1", "s2")
        for figure, figure_name in (("requests_per_second", "requests_per_second"), ("p99_ms", "p99"))
    }
    data = {
        "title": (
            "finalizer and webhook delivery: S1/S2 with the finalizer on vs off, and sessions one "
            "process follows per second"
        ),
        "wrk": {"threads": 1, "connections": plan.connections, "seconds": plan.seconds},
        "finalizer_schedule": FINALIZER_SCHEDULE,
        "finalizer_schedule_note": (
            "compressed from the default 3,6,12,...: the stub's result is terminal (SUCCEEDED), so "
            "each session is read once, 1 s after it was created; a pending session is read again "
            "at every offset (one upstream read and one job update each, no verdict)"
        ),
        "webhook_receiver": "nginx on loopback, 204 for every delivery",
        "busy_backlog_sessions": hot.busy_backlog,
        "measured": {"hot_path": measured, "follow": follow},
        "ratios": ratios,
        # Nothing to meet yet: the issue asks for the figures, not for a bound on them.
        "targets": [],
    }
    return Outcome(data, _rows(measured, ratios, follow))
