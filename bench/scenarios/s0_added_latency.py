"""S0, the latency our proxy adds at one connection: wrk -t1 -c1 on S1's read (pending sessions in
rotation: the uncached path) through our proxy, nginx and the stub directly, interleaved
repetitions. What each proxy adds is its p50 (p99) less the stub direct's, medians of the
repetitions; our proxy's beside nginx's. No target: the issue asks for the figures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from common import progress
from proxies import Bench
from result_paths import PENDING, StubCalls
from stats import Outcome, Row, interleaved, median_of, ratio, summarize_all
from wrk import WrkReading

from .main_proxies import MainTargets, measure_rotation

SYSTEMS = ("ours", "nginx", "stub_direct")


def scenario_s0(bench: Bench, main: MainTargets) -> Outcome:
    progress(
        f"S0 latency added at one connection: wrk -t1 -c1 -d{bench.plan.seconds}s, "
        "pending sessions in rotation"
    )
    main.pool(bench, PENDING)
    calls = StubCalls(bench.stubs)
    measurements: dict[str, Callable[[int], WrkReading]] = {
        name: functools.partial(measure_rotation, bench, main, PENDING, name, connections=1)
        for name in SYSTEMS
    }
    measurements["ours"] = calls.around("ours", measurements["ours"])
    readings, warmups = interleaved(bench.plan, bench.plan.seconds, measurements)
    measured = summarize_all(readings, warmups)
    calls.attach(measured["ours"], "ours")
    added: dict[str, dict[str, float]] = {}
    for system in ("ours", "nginx"):
        added[system] = {
            f"{figure}_us": round(
                (
                    median_of(measured, system, f"{figure}_ms")
                    - median_of(measured, "stub_direct", f"{figure}_ms")
                )
                * 1000,
                1,
            )
            for figure in ("p50", "p99")
        }
    ratios = {
        "ours_added_p50_us": added["ours"]["p50_us"],
        "ours_added_p99_us": added["ours"]["p99_us"],
        "nginx_added_p50_us": added["nginx"]["p50_us"],
        "nginx_added_p99_us": added["nginx"]["p99_us"],
        "ours_to_nginx_added_p50": ratio(added["ours"]["p50_us"], added["nginx"]["p50_us"]),
    }
    data = {
        "title": "latency added at one connection (wrk -t1 -c1): p50 and p99 less the stub direct's",
        "wrk": {
            "threads": 1,
            "connections": 1,
            "seconds": bench.plan.seconds,
            "script": "result_rotation.lua",
        },
        "measured": measured,
        "added_latency_us": added,
        "ratios": ratios,
        # Nothing to meet: the issue asks for the figures, ours next to nginx's.
        "targets": [],
    }
    return Outcome(data, _rows(measured, added))


def _rows(measured: dict[str, Any], added: dict[str, dict[str, float]]) -> list[Row]:
    def latency(system: str) -> str:
        return (
            f"p50 {median_of(measured, system, 'p50_ms') * 1000:,.0f} µs, "
            f"p99 {median_of(measured, system, 'p99_ms') * 1000:,.0f} µs"
        )

    ours, nginx = added["ours"], added["nginx"]
    return [
        (
            "S0 latency added at one connection (ours minus stub direct)",
            f"{ours['p50_us']:+,.0f} µs p50, {ours['p99_us']:+,.0f} µs p99",
            f"nginx {nginx['p50_us']:+,.0f} µs p50, {nginx['p99_us']:+,.0f} µs p99; "
            f"stub direct {latency('stub_direct')}",
            f"{ours['p50_us'] / nginx['p50_us']:.1f}x nginx's p50" if nginx["p50_us"] > 0 else "—",
            "reported next to nginx",
            "—",
        )
    ]
