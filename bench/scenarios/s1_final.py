"""S1-final: S1's read of terminal sessions (the stub answers SUCCEEDED with a confidence), in
rotation, through our proxy as shipped (LIVENESS_PROXY_FINAL_RESULT_STORE on: since issue 21 a
terminal result is stored on its first read and then served without a Cynopsis call) and through
nginx, which proxies every read; interleaved repetitions. Every session is read once before the
first window (main_proxies.py), so that the windows measure the steady state. Our proxy's Cynopsis
calls per read, counted at the stub, and the X-Liveness-Result-Source of a few reads show which path
was measured (a build before issue 21 calls Cynopsis on every read and sends no such header).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from common import RESULT_PATH, progress
from proxies import Bench, sample_failure
from result_paths import FINAL, StubCalls, describe_sources, sample_sources
from stats import (
    Outcome,
    Row,
    fmt_met,
    fmt_rate,
    fmt_rate_and_p99,
    goal,
    interleaved,
    median_of,
    ratio,
    summarize_all,
)
from wrk import WrkReading

from .main_proxies import MainTargets, measure_rotation
from .s1_result_read import SOURCE_SAMPLE

SYSTEMS = ("ours", "nginx")
TARGET_TO_NGINX = 0.20


def scenario_s1_final(bench: Bench, main: MainTargets) -> Outcome:
    plan = bench.plan
    progress(f"S1-final result read of terminal sessions: wrk -t1 -c{plan.connections} -d{plan.seconds}s")
    pool = main.pool(bench, FINAL)  # bound and read once: stored, on a build with the store
    calls = StubCalls(bench.stubs)
    measurements: dict[str, Callable[[int], WrkReading]] = {
        name: functools.partial(measure_rotation, bench, main, FINAL, name) for name in SYSTEMS
    }
    measurements["ours"] = calls.around("ours", measurements["ours"])
    readings, warmups = interleaved(plan, plan.seconds, measurements)
    measured = summarize_all(readings, warmups)
    ours_section = measured["ours"]
    calls.attach(ours_section, "ours")
    ours_section["result_sources_sampled"] = sample_sources(
        main.ours, [pool.session_id(number) for number in range(SOURCE_SAMPLE)]
    )
    if ours_section["non_2xx"]["max"] > 0:
        ours_section["sample_failure"] = sample_failure(
            main.ours, "GET", RESULT_PATH.format(session_id=pool.session_id(0))
        )
    ratios = {"ours_to_nginx": ratio(median_of(measured, "ours"), median_of(measured, "nginx"))}
    targets = [
        goal(
            "ours/nginx req/s",
            ratios["ours_to_nginx"],
            f">= {TARGET_TO_NGINX:.2f}",
            ratios["ours_to_nginx"] >= TARGET_TO_NGINX,
        )
    ]
    data = {
        "title": "result read (GET) of terminal sessions in rotation, our proxy (store as shipped) vs nginx",
        "wrk": {
            "threads": 1,
            "connections": plan.connections,
            "seconds": plan.seconds,
            "script": "result_rotation.lua",
        },
        "sessions_in_rotation": pool.count,
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, _rows(measured, ratios, targets))


def _rows(measured: dict[str, Any], ratios: dict[str, float], targets: list[dict[str, Any]]) -> list[Row]:
    ours = measured["ours"]
    return [
        (
            "S1-final result read (terminal) vs nginx",
            fmt_rate_and_p99(measured, "ours"),
            f"nginx {fmt_rate(measured['nginx']['requests_per_second'])}, "
            f"p99 {median_of(measured, 'nginx', 'p99_ms'):.1f} ms; ours: "
            f"{ours['stub_calls_per_read']['median']:.2f} Cynopsis calls per read, "
            f"{describe_sources(ours['result_sources_sampled'])}",
            f"{ratios['ours_to_nginx']:.1%}",
            f"≥ {TARGET_TO_NGINX:.0%} of nginx",
            fmt_met(targets[0]["met"]),
        )
    ]
