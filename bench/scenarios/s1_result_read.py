"""S1 result read: wrk GET of a session's result through our proxy, nginx and the naive proxy (and
the stub directly, for context), interleaved repetitions; ours against nginx (the ceiling) and the
naive proxy (the floor). Measured in one set of repetitions with S1t, what tracing costs the same
read (s1_tracing.py, which runs both).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from common import RESULT_PATH, progress
from proxies import Bench, sample_failure
from stats import Outcome, fmt_met, fmt_rate, fmt_rate_and_p99, goal, median_of, ratio
from wrk import WrkReading

from .main_proxies import MainTargets, measure_result_read

SYSTEMS = ("ours", "nginx", "naive")


def s1_measurements(bench: Bench, main: MainTargets) -> dict[str, Callable[[int], WrkReading]]:
    """S1's three systems, for the interleaved repetitions S1 and S1t share (s1_tracing.py)."""
    return {name: functools.partial(measure_result_read, bench, main, name) for name in SYSTEMS}


def measure_stub_direct(bench: Bench, main: MainTargets) -> WrkReading:
    """The stub without a proxy, once after the repetitions, for context."""
    progress("  stub direct (once, for context)")
    return measure_result_read(bench, main, "stub_direct", bench.plan.seconds)


def s1_outcome(bench: Bench, main: MainTargets, measured: dict[str, Any]) -> Outcome:
    measured = {name: measured[name] for name in (*SYSTEMS, "stub_direct")}
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
