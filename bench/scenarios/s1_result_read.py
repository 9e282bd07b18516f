"""S1 result read: wrk GET of a session's result through our proxy, nginx and the naive proxy (and
the stub directly, for context), interleaved repetitions; ours against nginx (the ceiling) and the
naive proxy (the floor).
"""

from __future__ import annotations

import functools

from common import RESULT_PATH, progress
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

from .main_proxies import MainTargets, measure_result_read


def scenario_s1(bench: Bench, main: MainTargets) -> Outcome:
    progress(f"S1 result read: wrk -t1 -c{bench.plan.connections} -d{bench.plan.seconds}s")
    readings, warmups = interleaved(
        bench.plan,
        bench.plan.seconds,
        {
            name: functools.partial(measure_result_read, bench, main, name)
            for name in ("ours", "nginx", "naive")
        },
    )
    progress("  stub direct (once, for context)")
    readings["stub_direct"] = [measure_result_read(bench, main, "stub_direct", bench.plan.seconds)]
    measured = summarize_all(readings, warmups)
    if measured["ours"]["non_2xx"]["max"] > 0:
        measured["ours"]["sample_failure"] = sample_failure(
            main.ours, "GET", RESULT_PATH.format(session_id=main.session_id)
        )
    ours = median_of(measured, "ours")
    ratios = {
        "ours_to_nginx": ratio(ours, median_of(measured, "nginx")),
        "ours_to_naive": ratio(ours, median_of(measured, "naive")),
        "ours_to_stub_direct": ratio(ours, median_of(measured, "stub_direct")),
    }
    targets = [
        goal("ours/nginx req/s", ratios["ours_to_nginx"], ">= 0.10", ratios["ours_to_nginx"] >= 0.10),
        goal("ours/naive req/s", ratios["ours_to_naive"], ">= 10", ratios["ours_to_naive"] >= 10),
    ]
    ours_cell = fmt_rate_and_p99(measured, "ours")
    rows = [
        (
            "S1 result read vs nginx",
            ours_cell,
            f"nginx {fmt_rate(measured['nginx']['requests_per_second'])}, "
            f"p99 {median_of(measured, 'nginx', 'p99_ms'):.1f} ms; "
            f"stub direct {median_of(measured, 'stub_direct'):,.0f} req/s",
            f"{ratios['ours_to_nginx']:.1%}",
            "≥ 10% of nginx",
            fmt_met(targets[0]["met"]),
        ),
        (
            "S1 result read vs naive",
            ours_cell,
            f"naive {fmt_rate(measured['naive']['requests_per_second'])}, "
            f"p99 {median_of(measured, 'naive', 'p99_ms'):.1f} ms",
            f"{ratios['ours_to_naive']:.1f}x",
            "≥ 10x naive",
            fmt_met(targets[1]["met"]),
        ),
    ]
    data = {
        "title": "result read (GET), our proxy vs nginx proxy vs naive proxy, static upstream",
        "wrk": {"threads": 1, "connections": bench.plan.connections, "seconds": bench.plan.seconds},
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
