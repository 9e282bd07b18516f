"""S2 create session: wrk POST of a ~2 KiB JSON body (bench/post_session.lua) through our proxy, nginx
and the naive proxy; ours against its own S1 figure, nginx and the naive proxy.

Every system gets the same bytes: a fixed session token and a `metadata` member (the padding). Our
proxy serves S2 with token binding off and `metadata` declared as an extra body member
(proxies.PLAIN_CREATE_SETTINGS): without them it would refuse both (422), and S2 measures the create
path like for like with nginx and the naive proxy, as before request integrity. What binding and
Idempotency-Key cost is S2b and S2i (s2_costs.py), measured in the same interleaved repetitions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from common import SESSIONS_PATH
from proxies import Bench, sample_failure
from stats import (
    Outcome,
    fmt_met,
    fmt_rate,
    fmt_rate_and_p99,
    goal,
    median_of,
    ratio,
)
from wrk import WrkReading

from .main_proxies import MainTargets, measure_create_session

# The shape of bench/post_session.lua's body, for a sample request when wrk saw failures.
SAMPLE_POST_BODY = b'{"session_token":"st-bench-session-token","metadata":{"padding":"' + b"x" * 1990 + b'"}}'
SYSTEMS = ("ours", "nginx", "naive")


def s2_measurements(bench: Bench, main: MainTargets) -> dict[str, Callable[[int], WrkReading]]:
    """S2's three systems, for the interleaved repetitions S2, S2i and S2b share (s2_costs.py)."""
    return {name: functools.partial(measure_create_session, bench, main, name) for name in SYSTEMS}


def s2_outcome(bench: Bench, main: MainTargets, measured: dict[str, Any], s1: Outcome | None) -> Outcome:
    measured = {name: measured[name] for name in SYSTEMS}
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
        "our_proxy": "token binding off, `metadata` an extra body member: the same request as the others",
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
