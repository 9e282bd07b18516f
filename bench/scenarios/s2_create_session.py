"""S2 create session: wrk POST of a ~2 KiB JSON body (bench/post_session.lua) through our proxy, nginx
and the naive proxy; ours against its own S1 figure, nginx and the naive proxy.
"""

from __future__ import annotations

import functools

from common import SESSIONS_PATH, progress
from proxies import Bench, sample_failure
from stats import (
    Outcome,
    fmt_met,
    fmt_rate,
    fmt_rate_and_p99,
    goal,
    interleaved,
    median_of,
    ratio,
    summarize_all,
)

from .main_proxies import MainTargets, measure_create_session

# The shape of bench/post_session.lua's body, for a sample request when wrk saw failures.
SAMPLE_POST_BODY = b'{"session_token":"st-bench-session-token","metadata":{"padding":"' + b"x" * 1990 + b'"}}'


def scenario_s2(bench: Bench, main: MainTargets, s1: Outcome | None) -> Outcome:
    progress(f"S2 create session (POST ~2 KiB): wrk -t1 -c{bench.plan.connections} -d{bench.plan.seconds}s")
    readings, warmups = interleaved(
        bench.plan,
        bench.plan.seconds,
        {
            name: functools.partial(measure_create_session, bench, main, name)
            for name in ("ours", "nginx", "naive")
        },
    )
    measured = summarize_all(readings, warmups)
    if measured["ours"]["non_2xx"]["max"] > 0:
        measured["ours"]["sample_failure"] = sample_failure(
            main.ours, "POST", SESSIONS_PATH, SAMPLE_POST_BODY
        )
    ours = median_of(measured, "ours")
    s1_ours = median_of(s1.data["measured"], "ours") if s1 is not None else None
    ratios: dict[str, float | None] = {
        "ours_to_ours_s1": ratio(ours, s1_ours) if s1_ours else None,
        "ours_to_nginx": ratio(ours, median_of(measured, "nginx")),
        "ours_to_naive": ratio(ours, median_of(measured, "naive")),
    }
    to_s1 = ratios["ours_to_ours_s1"]
    targets = [
        goal("ours S2 / ours S1 req/s", to_s1, ">= 0.40", None if to_s1 is None else to_s1 >= 0.40),
    ]
    ours_cell = fmt_rate_and_p99(measured, "ours")
    rows = [
        (
            "S2 create session vs ours S1",
            ours_cell,
            f"ours S1 {s1_ours:,.0f} req/s" if s1_ours else "S1 not run",
            "—" if to_s1 is None else f"{to_s1:.1%}",
            "≥ 40% of ours S1",
            fmt_met(targets[0]["met"]),
        ),
        (
            "S2 create session vs nginx, naive",
            ours_cell,
            f"nginx {fmt_rate(measured['nginx']['requests_per_second'])}; "
            f"naive {fmt_rate(measured['naive']['requests_per_second'])}",
            f"{ratios['ours_to_nginx']:.1%} of nginx; {ratios['ours_to_naive']:.1f}x naive",
            "—",
            "—",
        ),
    ]
    data = {
        "title": "create session (POST, ~2 KiB JSON body), our proxy vs nginx proxy vs naive proxy",
        "wrk": {
            "threads": 1,
            "connections": bench.plan.connections,
            "seconds": bench.plan.seconds,
            "script": "bench/post_session.lua",
        },
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
