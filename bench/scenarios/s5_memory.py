"""S5 memory: the RSS of one fresh proxy process after many result reads (two checkpoints), and its
growth between them; the naive proxy's RSS for context.
"""

from __future__ import annotations

import math
from typing import Any

from common import RESULT_PATH, progress
from processes import rss_megabytes
from proxies import Bench, create_session, sample_failure
from stats import Outcome, fmt_met, goal
from wrk import WrkReading, run_wrk

from .main_proxies import MainTargets


def scenario_s5(bench: Bench, main: MainTargets | None) -> Outcome:
    plan = bench.plan
    first, last = plan.memory_checkpoints
    progress(f"S5 memory: RSS of a fresh proxy after {first:,} and {last:,} result reads")
    env = bench.our_env(
        "S5",
        database_url=bench.sqlite_url("s5"),
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
    )
    ours = bench.start_ours("ours-memory", env)
    checkpoints: list[dict[str, float]] = []
    readings: list[WrkReading] = []
    try:
        bench.wait_ok(ours, "/readyz")
        path = RESULT_PATH.format(session_id=create_session(ours))
        url = ours.url + path
        rss_idle = rss_megabytes(ours.process.pid)
        total = 0
        rate: float | None = None
        for checkpoint in (first, last):
            # wrk has no request count: chunks sized from the last rate land near the checkpoint
            # (the exact count reached is what is reported), and each checkpoint gets at least one
            # chunk of its own, so two readings never come from the same moment.
            while True:
                remaining = checkpoint - total
                seconds = 1 if not rate else max(1, min(10, math.ceil(remaining / rate)))
                reading = run_wrk(url, connections=plan.connections, seconds=seconds, headers=ours.headers())
                readings.append(reading)
                total += reading.requests
                rate = reading.requests_per_second
                if total >= checkpoint:
                    break
            checkpoints.append({"requests": total, "rss_mb": rss_megabytes(ours.process.pid)})
            progress(f"  {total:,} requests: RSS {checkpoints[-1]['rss_mb']} MB")
        non_2xx = sum(r.non_2xx for r in readings)
        sample = sample_failure(ours, "GET", path) if non_2xx else None
    finally:
        bench.children.stop(ours.process)
    at_first, at_last = checkpoints[0]["rss_mb"], checkpoints[1]["rss_mb"]
    growth = round((at_last - at_first) / at_first * 100, 2)
    measured: dict[str, Any] = {
        "ours": {
            "rss_idle_mb": rss_idle,
            "checkpoints": checkpoints,
            "rss_at_first_mb": at_first,
            "rss_at_last_mb": at_last,
            "growth_percent": growth,
            "non_2xx": non_2xx,
            "socket_errors": sum(r.socket_errors for r in readings),
            "wrk_chunks": len(readings),
        }
    }
    if sample:
        measured["ours"]["sample_failure"] = sample
    if main is not None and main.naive.process.poll() is None:
        # Context only: the naive proxy is ~100x slower, so driving it to the same count is not cheap;
        # this is its RSS after the S1/S2 requests it has served in this run.
        measured["naive_context"] = {
            "requests_served": bench.naive_requests_served,
            "rss_mb": rss_megabytes(main.naive.process.pid),
        }
    ratios = {"rss_at_last_to_limit": round(at_last / 150, 4), "growth_percent": growth}
    targets = [
        goal(f"RSS MB after {checkpoints[1]['requests']:,.0f} requests", at_last, "<= 150", at_last <= 150),
        goal(f"RSS growth % from {first:,} to {last:,} requests", growth, "<= 5", growth <= 5),
    ]
    naive_text = (
        f"naive {measured['naive_context']['rss_mb']} MB after {bench.naive_requests_served:,} requests"
        if "naive_context" in measured
        else "—"
    )
    rows = [
        (
            f"S5 RSS after {checkpoints[1]['requests']:,.0f} requests",
            f"{at_last} MB (idle {rss_idle} MB)",
            naive_text,
            f"{ratios['rss_at_last_to_limit']:.0%} of limit",
            "≤ 150 MB",
            fmt_met(targets[0]["met"]),
        ),
        (
            f"S5 RSS growth {checkpoints[0]['requests']:,.0f} → {checkpoints[1]['requests']:,.0f}",
            f"{growth:+.1f}% ({at_first} → {at_last} MB)",
            "—",
            "—",
            "≤ 5%",
            fmt_met(targets[1]["met"]),
        ),
    ]
    data = {
        "title": "memory: RSS of one fresh proxy process after many result reads",
        "wrk": {"threads": 1, "connections": plan.connections, "chunked": True},
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
