"""S8 auth flood: authenticated traffic (S1's result read, wrk -t1 -c64) alone, and beside a flood
of requests with random bad credentials (bench/auth_flood.lua), once from one address and once from
many addresses posing as clients behind a trusted proxy (a random 10.0.0.0/8 X-Forwarded-For per
request, which the server honours from 127.0.0.1, uvicorn's default `--forwarded-allow-ips`).
On a proxy of its own (its own SQLite database, the unauthenticated limit and the answer delay of
failed authentications as shipped), so that the main proxies never see a flood.

- A flood is a fixed number of answers (50,000; smoke 300), sent by one wrk thread on
  FLOOD_CONNECTIONS connections, each sending its next request once it has the last answer. Each
  flood runs once, whole (the proxy holds a failed authentication's answer back, so a flood takes
  minutes, and one per repetition would make S8 take most of an hour); the authenticated traffic is
  measured in consecutive windows of the plan's seconds throughout it, and alone in a window
  before, between and after the floods. Goal: authenticated req/s with the flood at least 80% of
  without, for both shapes, as ratios of medians measured in one run.
- The flood's answers are counted by status (401, 429, other); what each refusal cost the proxy is
  estimated from its CPU time over the flood less what its authenticated requests cost alone.
- The database's rows (scenarios/s8_flood_records.py) are counted before the first window and after
  the proxy has stopped: the floods' own rows must stay within windows x (100 + 1).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH_DIR, RESULT_PATH, BenchError, progress
from processes import cpu_seconds, rss_megabytes
from proxies import Bench, Proxy, create_session
from stats import (
    Outcome,
    Row,
    fmt_met,
    fmt_rate_and_p99,
    goal,
    median_of,
    ratio,
    spread,
    summarize,
)
from wrk import WrkReading, parse_wrk, run_wrk, wrk_command

from .s8_flood_records import AGGREGATE_MAX_ADDRESSES, records_section, table_rows

ALONE = "alone"
# name in the report -> the script's shape argument
FLOODS = {"flood_one_address": "one", "flood_many_addresses": "many"}
LABELS = {"flood_one_address": "one address", "flood_many_addresses": "many addresses"}
FLOOD_REQUESTS = {"full": 50_000, "smoke": 300}
# Four times the authenticated traffic's 64 connections, one wrk thread, each connection sending its
# next request as soon as it has the last answer. The proxy holds a failed authentication's answer
# back LIVENESS_PROXY_FAILED_AUTH_DELAY_SECONDS (1 s as shipped), so such a flood sends about one
# request a second per connection: 256 of them make ~250 req/s, and 50,000 requests take ~200 s.
# An attacker's rate grows with its connections (up to LIVENESS_PROXY_MAX_CONNECTIONS per process);
# the proxy's CPU per refusal, also reported, says what each costs (docs/performance.md, S8).
FLOOD_CONNECTIONS = 256
# A flood ends when it has its answers, or at this bound with fewer (the JSON then says so).
FLOOD_MAX_SECONDS = {"full": 300, "smoke": 30}
TARGET_RATIO = 0.80


@dataclass(frozen=True, slots=True)
class FloodTarget:
    """S8's own proxy, the result its authenticated traffic reads, and its database file."""

    proxy: Proxy
    result_url: str
    database: Path


@dataclass(frozen=True, slots=True)
class FloodRun:
    """One flood: its wrk reading and what it cost the proxy and the machine."""

    reading: WrkReading
    started_at: float  # wall clock: the aggregation windows it touched
    ended_at: float
    outlasted_the_window: bool  # the authenticated window was over before the flood
    finished: bool  # it had all its answers before FLOOD_MAX_SECONDS
    generator_cpu_seconds: float
    proxy_cpu_seconds: float
    proxy_rss_before_mb: float
    proxy_rss_after_mb: float


def start_flood_target(bench: Bench) -> FloodTarget:
    progress("S8: starting our proxy for the floods (own SQLite database, unauthenticated limit as shipped)")
    env = bench.our_env(
        "S8",
        database_url=bench.sqlite_url("s8"),
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
        # uvicorn's default, set so that no FORWARDED_ALLOW_IPS of the caller's changes who is trusted.
        FORWARDED_ALLOW_IPS="127.0.0.1",
    )
    proxy = bench.start_ours("ours-s8", env)
    bench.wait_ok(proxy, "/readyz")
    session_id = create_session(proxy)
    return FloodTarget(
        proxy=proxy,
        result_url=proxy.url + RESULT_PATH.format(session_id=session_id),
        database=bench.workdir / "s8.db",
    )


def _interrupted(bench: Bench, process: subprocess.Popen[bytes], connections: int) -> WrkReading:
    """The reading of a wrk started in the background, ended first with SIGINT if it still runs (wrk
    then prints its summary as usual)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bench.children.stop(process)
            raise BenchError(f"wrk did not stop on SIGINT: {bench.children.log_tail(process)}") from None
    bench.children.stop(process)  # ended: only forgotten
    if process.returncode != 0:
        raise BenchError(f"wrk failed: {bench.children.log_tail(process)}")
    return parse_wrk(bench.children.log_tail(process, 20_000), connections)


class FloodWindows:
    """The measurements S8 interleaves: the authenticated traffic alone, and beside each flood."""

    def __init__(self, bench: Bench, target: FloodTarget) -> None:
        self._bench = bench
        self._target = target
        self.floods: dict[str, list[FloodRun]] = {name: [] for name in FLOODS}
        self.honest_during: dict[str, list[WrkReading]] = {}
        self.alone_cpu_seconds: list[float] = []

    def alone(self, seconds: int) -> WrkReading:
        pid = self._target.proxy.process.pid
        before = cpu_seconds(pid)
        reading = run_wrk(
            self._target.result_url,
            connections=self._bench.plan.connections,
            seconds=seconds,
            headers=self._target.proxy.headers(),
        )
        self.alone_cpu_seconds.append(cpu_seconds(pid) - before)
        return reading

    def during_flood(self, name: str, seconds: int) -> list[WrkReading]:
        """The authenticated traffic in consecutive windows of `seconds` while one whole flood runs
        (at least one window, even when the flood is over first: a smoke run's tiny flood)."""
        bench, target = self._bench, self._target
        marker = bench.workdir / f"s8-{name}-{secrets.token_hex(4)}.done"
        flood_command = wrk_command(
            target.proxy.url,
            connections=FLOOD_CONNECTIONS,
            seconds=FLOOD_MAX_SECONDS[bench.plan.mode] + 60,  # ended by the harness, not by wrk
            script=BENCH_DIR / "auth_flood.lua",
            script_args=[
                str(FLOOD_REQUESTS[bench.plan.mode]), FLOODS[name], str(secrets.randbits(31)), str(marker),
            ],
        )  # fmt: skip
        pid = target.proxy.process.pid
        cpu_before, rss_before = cpu_seconds(pid), rss_megabytes(pid)
        started_at = time.time()
        deadline = time.monotonic() + FLOOD_MAX_SECONDS[bench.plan.mode]
        flood = bench.children.start(f"wrk-s8-{name}", flood_command)
        honest: list[WrkReading] = []
        try:
            while True:
                reading = run_wrk(
                    target.result_url,
                    connections=bench.plan.connections,
                    seconds=seconds,
                    headers=target.proxy.headers(),
                )
                done = self._flood_over(flood, marker)
                if honest and done:
                    break  # this window ended after the flood: not one beside it
                honest.append(reading)
                progress(
                    f"    window {len(honest)} beside {name}: {reading.requests_per_second:,.0f} req/s, "
                    f"p99 {reading.p99_ms:.1f} ms, non-2xx {reading.non_2xx}"
                )
                if done or time.monotonic() > deadline:
                    break
            outlasted = marker.exists()
            finished = self._wait_for(flood, marker, deadline)
            generator_cpu = cpu_seconds(flood.pid)
            flood_reading = _interrupted(bench, flood, FLOOD_CONNECTIONS)
            ended_at = time.time()
        finally:
            bench.children.stop(flood)
        run = FloodRun(
            # Its non-2xx answers are the point: wrk's output is not kept as an anomaly's would be.
            reading=dataclasses.replace(flood_reading, output=None),
            started_at=started_at,
            ended_at=ended_at,
            outlasted_the_window=outlasted,
            finished=finished,
            generator_cpu_seconds=round(generator_cpu, 3),
            proxy_cpu_seconds=round(cpu_seconds(pid) - cpu_before, 3),
            proxy_rss_before_mb=rss_before,
            proxy_rss_after_mb=rss_megabytes(pid),
        )
        self.floods[name].append(run)
        counted = flood_reading.counted or {}
        progress(
            f"    {name}: {counted.get('answered', 0):,} answers in {flood_reading.seconds:.1f} s "
            f"(401 {counted.get('unauthorized', 0):,}, 429 {counted.get('too_many', 0):,}, "
            f"other {counted.get('other', 0):,}), generator CPU {generator_cpu:.1f} s"
            + ("" if finished else f", stopped at {FLOOD_MAX_SECONDS[bench.plan.mode]} s")
        )
        self.honest_during[name] = honest
        return honest

    def _flood_over(self, flood: subprocess.Popen[bytes], marker: Path) -> bool:
        proxy = self._target.proxy
        if proxy.process.poll() is not None:
            raise BenchError(f"{proxy.name} exited: {self._bench.children.log_tail(proxy.process)}")
        if marker.exists():
            return True
        if flood.poll() is not None:
            raise BenchError(f"the flood ended before its answers: {self._bench.children.log_tail(flood)}")
        return False

    def _wait_for(self, flood: subprocess.Popen[bytes], marker: Path, deadline: float) -> bool:
        """Until the flood has its answers (its script creates `marker`: True) or its time is up."""
        proxy = self._target.proxy
        while not marker.exists():
            if flood.poll() is not None:
                raise BenchError(
                    f"the flood ended before its answers: {self._bench.children.log_tail(flood)}"
                )
            if proxy.process.poll() is not None:
                raise BenchError(f"{proxy.name} exited: {self._bench.children.log_tail(proxy.process)}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _flood_section(
    runs: Sequence[FloodRun], honest: Sequence[WrkReading], cpu_us_per_honest_request: float
) -> dict[str, Any]:
    reps = []
    # One flood per shape, with every authenticated window measured during it.
    honest_requests = sum(reading.requests for reading in honest)
    for run in runs:
        counted = run.reading.counted or {}
        answered = counted.get("answered", 0)
        # The proxy's CPU over the flood less what its authenticated requests cost alone.
        refusals_cpu = run.proxy_cpu_seconds - honest_requests * cpu_us_per_honest_request / 1e6
        reps.append(
            {
                **dataclasses.asdict(run),
                "answers": {
                    "401": counted.get("unauthorized", 0),
                    "429": counted.get("too_many", 0),
                    "other": counted.get("other", 0),
                },
                "generator_cpu_share_of_a_core": (
                    round(run.generator_cpu_seconds / run.reading.seconds, 3) if run.reading.seconds else 0.0
                ),
                "proxy_cpu_us_per_refusal_estimate": round(refusals_cpu * 1e6 / answered, 1)
                if answered
                else 0.0,
            }
        )
    return {
        "reps": reps,
        "requests_per_second": spread([run.reading.requests_per_second for run in runs]),
        **{
            f"answered_{status}": spread([rep["answers"][status] for rep in reps])
            for status in ("401", "429", "other")
        },
        **{
            figure: spread([rep[figure] for rep in reps])
            for figure in ("generator_cpu_share_of_a_core", "proxy_cpu_us_per_refusal_estimate")
        },
        "outlasted_every_window": all(run.outlasted_the_window for run in runs),
        "finished_every_flood": all(run.finished for run in runs),
    }


def scenario_s8(bench: Bench) -> Outcome:
    plan = bench.plan
    requests = FLOOD_REQUESTS[plan.mode]
    progress(
        f"S8 auth flood: authenticated wrk -t1 -c{plan.connections} -d{plan.seconds}s alone and from the "
        f"start of floods of {requests:,} bad credentials (wrk -t1 -c{FLOOD_CONNECTIONS}; one address, many)"
    )
    target = start_flood_target(bench)
    windows = FloodWindows(bench, target)
    warmup: WrkReading | None = None
    try:
        before = table_rows(target.database)
        if plan.warmup_seconds > 0:
            warmup = run_wrk(
                target.result_url,
                connections=plan.connections,
                seconds=plan.warmup_seconds,
                headers=target.proxy.headers(),
            )
            progress(f"  warm-up {ALONE}: {warmup.requests_per_second:,.0f} req/s (not counted)")
        # Only the authenticated traffic warms up (above): a flood's warm-up would be a flood. Each
        # flood runs once, whole, with the authenticated traffic measured in windows throughout it;
        # the windows alone come before, between and after the floods, so drift hits both alike.
        readings: dict[str, list[WrkReading]] = {ALONE: [windows.alone(plan.seconds)]}
        for name in FLOODS:
            readings[name] = windows.during_flood(name, plan.seconds)
            readings[ALONE].append(windows.alone(plan.seconds))
        for reading in readings[ALONE]:
            progress(f"  {ALONE}: {reading.requests_per_second:,.0f} req/s, p99 {reading.p99_ms:.1f} ms")
    finally:
        # Stopped before the rows are counted: its shutdown writes the aggregate window in progress.
        bench.children.stop(target.proxy.process)
    after = table_rows(target.database)

    measured: dict[str, Any] = {name: summarize(values) for name, values in readings.items()}
    if warmup is not None:
        measured[ALONE]["warmup"] = dataclasses.asdict(warmup)
    measured[ALONE]["proxy_cpu_us_per_request"] = spread(
        [
            cpu * 1e6 / reading.requests if reading.requests else 0.0
            for cpu, reading in zip(windows.alone_cpu_seconds, readings[ALONE], strict=True)
        ]
    )
    honest_cpu_us = float(measured[ALONE]["proxy_cpu_us_per_request"]["median"])
    for name in FLOODS:
        measured[name]["flood"] = _flood_section(windows.floods[name], readings[name], honest_cpu_us)
    runs = [run for name in FLOODS for run in windows.floods[name]]
    counted = [run.reading.counted or {} for run in runs]
    database = records_section(
        before,
        after,
        flood_spans=[(run.started_at, run.ended_at) for run in runs],
        flood_sent=sum(entry.get("sent", 0) for entry in counted),
        flood_answered=sum(entry.get("answered", 0) for entry in counted),
        proxy_exit_code=target.proxy.process.returncode,
    )
    ratios: dict[str, float] = {
        f"{name}_to_alone": ratio(median_of(measured, name), median_of(measured, ALONE)) for name in FLOODS
    }
    ratios["flood_rows_to_bound"] = ratio(database["flood_rows"], database["bound"])
    targets = _targets(ratios, database)
    data = {
        "title": (
            "authenticated result reads alone and beside a flood of random bad credentials, from one "
            "address and from many (X-Forwarded-For through a trusted proxy), one process"
        ),
        "wrk": {
            "authenticated": {"threads": 1, "connections": plan.connections, "seconds": plan.seconds},
            "flood": {
                "threads": 1,
                "connections": FLOOD_CONNECTIONS,
                "requests": requests,
                "script": "bench/auth_flood.lua",
                "fairness": (
                    f"one wrk thread on {FLOOD_CONNECTIONS} connections against the authenticated "
                    f"traffic's {plan.connections}, sending as fast as the proxy answers; its CPU is "
                    "generator_cpu_share_of_a_core, so the machine's second core stays with nginx and "
                    "the authenticated wrk; what the flood takes of the proxy is measured "
                    "(proxy_cpu_us_per_refusal_estimate), not assumed from the connection count"
                ),
            },
        },
        "settings": {
            "LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED": "as shipped (60/minute)",
            "FORWARDED_ALLOW_IPS": "127.0.0.1 (uvicorn's default)",
        },
        "measured": measured,
        "database": database,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, _rows(measured, database, ratios, targets))


def _targets(ratios: dict[str, float], database: dict[str, Any]) -> list[dict[str, Any]]:
    answered, sent = database["flood_requests_answered"], database["flood_requests_sent"]
    recorded = database["failures_recorded"]
    return [
        *(
            goal(
                f"{name}: authenticated req/s with the flood / without",
                ratios[f"{name}_to_alone"],
                f">= {TARGET_RATIO:.2f}",
                ratios[f"{name}_to_alone"] >= TARGET_RATIO,
            )
            for name in FLOODS
        ),
        goal(
            "database rows written for the floods",
            database["flood_rows"],
            f"<= {database['bound']} ({database['bound_rule']})",
            database["flood_rows"] <= database["bound"],
        ),
        # Every failure is still counted: the requests the proxy answered (wrk stops with some sent
        # but not answered, which the proxy may still have handled) are all in the records.
        goal(
            "failures counted in the floods' records",
            recorded,
            f"from {answered} (answered) to {sent} (sent)",
            answered <= recorded <= sent,
        ),
    ]


def _rows(
    measured: dict[str, Any],
    database: dict[str, Any],
    ratios: dict[str, float],
    targets: list[dict[str, Any]],
) -> list[Row]:
    rows: list[Row] = [
        (
            f"S8 auth flood, {LABELS[name]}: authenticated reads",
            fmt_rate_and_p99(measured, name),
            f"alone {fmt_rate_and_p99(measured, ALONE)}",
            f"{ratios[f'{name}_to_alone']:.1%}",
            f"≥ {TARGET_RATIO:.0%} of alone",
            fmt_met(target["met"]),
        )
        for name, target in zip(FLOODS, targets, strict=False)
    ]

    def answers(name: str) -> str:
        flood = measured[name]["flood"]
        return (
            f"{LABELS[name]}: 401 {flood['answered_401']['median']:,.0f}, "
            f"429 {flood['answered_429']['median']:,.0f}, other {flood['answered_other']['max']:,.0f}"
            + ("" if flood["finished_every_flood"] else " (not every flood finished: see the JSON)")
        )

    def costs(name: str) -> str:
        flood = measured[name]["flood"]
        return (
            f"{LABELS[name]} {flood['requests_per_second']['median']:,.0f} req/s, "
            f"~{flood['proxy_cpu_us_per_refusal_estimate']['median']:,.0f} µs CPU per refusal"
        )

    honest_cpu_us = measured[ALONE]["proxy_cpu_us_per_request"]["median"]
    rows.append(
        (
            "S8 flood answers (median per flood)",
            "; ".join(answers(name) for name in FLOODS),
            f"flood wrk -t1 -c{FLOOD_CONNECTIONS} beside -c64; "
            + "; ".join(costs(name) for name in FLOODS)
            + f"; an authenticated read ~{honest_cpu_us:,.0f} µs",
            "—",
            "—",
            "—",
        )
    )
    gained = database["audit_actions_gained"]
    rows.append(
        (
            "S8 database rows for the floods",
            f"{database['flood_rows']:,} ({gained.get('auth.failed', 0):,} auth.failed, "
            f"{gained.get('auth.failed.overflow', 0):,} overflow), counting "
            f"{database['failures_recorded']:,} failures of {database['flood_requests_sent']:,} sent",
            f"bound {database['windows_touched']} windows x ({AGGREGATE_MAX_ADDRESSES} + 1) = "
            f"{database['bound']:,}; authenticated reads: {database['authenticated_traffic_rows']:,} rows",
            f"{ratios['flood_rows_to_bound']:.0%} of bound",
            "≤ windows x 101",
            fmt_met(targets[len(FLOODS)]["met"]),
        )
    )
    return rows
