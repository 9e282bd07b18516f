"""S6 start-up: from spawning the process to its first 200 (our /readyz on a migrated SQLite database
with a warm token endpoint; the naive proxy's result read), polled every 10 ms.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx
from common import RESULT_PATH, BenchError, progress
from proxies import Bench, Proxy, issue_api_key
from stats import Outcome, fmt_met, goal, ratio, spread


def time_to_first_ok(bench: Bench, start: Callable[[], Proxy], path: str) -> float:
    """Seconds from spawning the process to the first 200 on `path`, polled every 10 ms."""
    started = time.perf_counter()
    proxy = start()
    try:
        with httpx.Client(timeout=5) as client:
            while True:
                if proxy.process.poll() is not None:
                    raise BenchError(f"{proxy.name} exited: {bench.children.log_tail(proxy.process)}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(proxy.url + path, headers=proxy.headers()).status_code == 200:
                        return round(time.perf_counter() - started, 3)
                if time.perf_counter() - started > 60:
                    raise BenchError(f"{proxy.name}: no 200 on {path} within 60 s")
                time.sleep(0.01)
    finally:
        bench.children.stop(proxy.process)


def scenario_s6(bench: Bench) -> Outcome:
    plan = bench.plan
    progress("S6 start-up: spawn to first 200 (our /readyz; the naive proxy's result read)")
    env = bench.our_env(
        "S6",
        database_url=bench.sqlite_url("s6"),
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
    )
    key = issue_api_key(env, bench.workdir)  # migrates the database once, before any timing
    path = RESULT_PATH.format(session_id="startup")
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for rep in range(plan.reps):
        times["ours"].append(
            time_to_first_ok(bench, lambda: bench.start_ours("ours-startup", env, key=key), "/readyz")
        )
        times["naive"].append(
            time_to_first_ok(bench, lambda: bench.start_naive("naive-startup", bench.stubs.stub), path)
        )
        progress(
            f"  rep {rep + 1}/{plan.reps}: ours {times['ours'][-1]:.3f} s, naive {times['naive'][-1]:.3f} s"
        )
    measured: dict[str, Any] = {
        name: {"reps_seconds": values, "seconds": spread(values)} for name, values in times.items()
    }
    ours = float(measured["ours"]["seconds"]["median"])
    naive = float(measured["naive"]["seconds"]["median"])
    ratios = {"ours_to_naive": ratio(ours, naive)}
    targets = [goal("ours start-up seconds (median)", ours, "<= 1.5", ours <= 1.5)]
    rows = [
        (
            "S6 start-up to ready",
            f"{ours:.2f} s ({float(measured['ours']['seconds']['min']):.2f}-"
            f"{float(measured['ours']['seconds']['max']):.2f})",
            f"naive {naive:.2f} s",
            f"{ratios['ours_to_naive']:.1f}x naive",
            "≤ 1.5 s",
            fmt_met(targets[0]["met"]),
        )
    ]
    data = {
        "title": "start-up: spawn to first 200 (migrated SQLite database, warm token endpoint), 10 ms polls",
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
