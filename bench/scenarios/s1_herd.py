"""S1-herd: every connection (64) polls the same pending session, through our proxy as shipped and
through nginx, interleaved repetitions. Since issue 21 our proxy shares one Cynopsis call among
concurrent reads of a session and reuses a pending answer for LIVENESS_PROXY_RESULT_REUSE_SECONDS
(0.3 s as shipped): the goal is at most one call per reuse window, counted at the stub, whose log
has a line for each of our proxy's reads of the herd session (bench/stub-nginx.conf). A window of
W seconds may then hold ceil(W / 0.3) + 1 calls (a call in flight when it starts). nginx proxies
every read; its rate and p99 are the reference.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

from common import RESULT_PATH, progress
from proxies import Bench, sample_failure
from result_paths import HERD, SHIPPED_REUSE_SECONDS, describe_sources, sample_sources
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
    spread,
    summarize_all,
)
from stubs import token_request_times
from wrk import WrkReading, run_wrk

from .main_proxies import MainTargets
from .s1_result_read import SOURCE_SAMPLE

SYSTEMS = ("ours", "nginx")


class HerdCalls:
    """Our proxy's Cynopsis calls for the herd session within each of its windows (wall clock, wrk's
    start and end included), from the stub's log."""

    def __init__(self, bench: Bench) -> None:
        self._log = bench.stubs.herd_log
        self.windows: list[dict[str, float]] = []

    def around(self, measure: Callable[[int], WrkReading]) -> Callable[[int], WrkReading]:
        def measured(seconds: int) -> WrkReading:
            started = time.time()
            reading = measure(seconds)
            ended = time.time()
            calls = sum(1 for at in token_request_times(self._log) if started <= at <= ended)
            wall = ended - started
            reuse_windows = wall / SHIPPED_REUSE_SECONDS
            self.windows.append(
                {
                    "seconds": round(wall, 3),
                    "calls": calls,
                    "calls_allowed": math.ceil(reuse_windows) + 1,
                    "calls_per_reuse_window": round(calls / reuse_windows, 3),
                    "reads": reading.requests,
                }
            )
            return reading

        return measured


def _read(bench: Bench, url: str, headers: dict[str, str], seconds: int) -> WrkReading:
    return run_wrk(url, connections=bench.plan.connections, seconds=seconds, headers=headers)


def scenario_s1_herd(bench: Bench, main: MainTargets) -> Outcome:
    plan = bench.plan
    progress(
        f"S1-herd: wrk -t1 -c{plan.connections} -d{plan.seconds}s, every connection on one pending session"
    )
    session_id = main.pool(bench, HERD).session_id(0)
    path = RESULT_PATH.format(session_id=session_id)
    headers = main.ours.headers()
    herd = HerdCalls(bench)
    measurements: dict[str, Callable[[int], WrkReading]] = {
        "ours": herd.around(functools.partial(_read, bench, main.ours.url + path, headers)),
        "nginx": functools.partial(
            _read, bench, f"{bench.stubs.nginx_proxy}/liveness_result/{session_id}", headers
        ),
    }
    readings, warmups = interleaved(plan, plan.seconds, measurements)
    measured = summarize_all(readings, warmups)
    ours = measured["ours"]
    windows = herd.windows[-plan.reps :]  # the warm-up's window dropped
    ours["stub_calls"] = windows
    ours["stub_calls_per_reuse_window"] = spread([window["calls_per_reuse_window"] for window in windows])
    ours["result_sources_sampled"] = sample_sources(main.ours, [session_id] * SOURCE_SAMPLE)
    if ours["non_2xx"]["max"] > 0:
        ours["sample_failure"] = sample_failure(main.ours, "GET", path)
    worst = max(windows, key=lambda window: window["calls"] - window["calls_allowed"])
    ratios = {
        "ours_to_nginx": ratio(median_of(measured, "ours"), median_of(measured, "nginx")),
        "calls_per_reuse_window_worst": max(window["calls_per_reuse_window"] for window in windows),
    }
    met = all(window["calls"] <= window["calls_allowed"] for window in windows)
    targets = [
        goal(
            "ours Cynopsis calls per window (worst rep) <= ceil(seconds / 0.3) + 1",
            float(worst["calls"]),
            f"<= {worst['calls_allowed']:.0f}",
            met,
        )
    ]
    data = {
        "title": "64 connections polling one pending session, our proxy vs nginx; our Cynopsis calls counted",
        "wrk": {"threads": 1, "connections": plan.connections, "seconds": plan.seconds},
        "reuse_window_seconds": SHIPPED_REUSE_SECONDS,
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, _rows(measured, ratios, targets, worst))


def _rows(
    measured: dict[str, Any], ratios: dict[str, float], targets: list[dict[str, Any]], worst: dict[str, float]
) -> list[Row]:
    ours = measured["ours"]
    return [
        (
            "S1-herd one pending session, c64, vs nginx",
            fmt_rate_and_p99(measured, "ours"),
            f"nginx {fmt_rate(measured['nginx']['requests_per_second'])}, "
            f"p99 {median_of(measured, 'nginx', 'p99_ms'):.1f} ms",
            f"{ratios['ours_to_nginx']:.1%}",
            "—",
            "—",
        ),
        (
            "S1-herd Cynopsis calls",
            f"{worst['calls']:,.0f} calls in {worst['seconds']:.1f} s (worst rep); "
            f"{ours['stub_calls_per_reuse_window']['median']:.2f} per 0.3 s window",
            f"{describe_sources(ours['result_sources_sampled'])}",
            "—",
            "≤ 1 per 0.3 s window",
            fmt_met(targets[0]["met"]),
        ),
    ]
