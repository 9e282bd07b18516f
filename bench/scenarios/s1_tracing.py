"""S1t, what tracing costs a result read, measured in S1's own interleaved repetitions: S1's read
(wrk GET, pending sessions in rotation, c64) against our main proxy with tracing off (S1's "ours")
and against two more of our proxies, each on its own SQLite database (and sessions), with tracing on:

- ours_trace0: OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0. wrk sends
  no traceparent, so every trace is a root the ratio sampler drops: the cost of spans that are
  created (or not) and never exported. No export is expected.
- ours_trace100: OTEL_TRACES_SAMPLER=parentbased_always_on: every span is exported, by the SDK's
  batch processor as shipped (OTEL_BSP_* defaults), to the sink.

The sink (bench/otlp_sink.py) is a process of its own that answers every export 200 and counts
requests, bytes and spans per proxy (each exports to a base URL of its own); its CPU time is
reported, as it shares the machine. The JSON keeps, per variant, the exports seen during each
window and in all (read after the tracing proxies stopped, so that what their shutdown flushed is
in), spans per read served, and the proxy's CPU time per read; ratios are of medians, on/off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from common import BENCH_DIR, RESULT_PATH, BenchError, progress
from processes import cpu_seconds, free_port
from proxies import PLAIN_CREATE_SETTINGS, Bench, Proxy, issue_api_key, sample_failure
from result_paths import (
    PENDING,
    ROTATION_SCRIPT,
    SessionPool,
    StubCalls,
    bind_pool,
    our_rotation_args,
    read_each,
)
from stats import Outcome, Row, fmt_rate_and_p99, interleaved, median_of, ratio, summarize_all
from wrk import WrkReading, run_wrk

from .main_proxies import MainTargets
from .s1_result_read import measure_stub_direct, s1_measurements, s1_outcome
from .s2_costs import ProxyCpu

S1_FAMILY = ("S1", "S1t")
# The two traced variants: their sampler settings; the endpoint (the sink) is added at start.
TRACING_VARIANTS = {
    "ours_trace0": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    "ours_trace100": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}
LABELS = {"ours_trace0": "sampling 0%", "ours_trace100": "sampling 100%"}


@dataclass(slots=True)
class Sink:
    """The running sink: its base URL, its process, and the export counts it has seen per window."""

    url: str
    pid: int
    windows: dict[str, list[dict[str, int]]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        answer = httpx.get(f"{self.url}/stats", timeout=10)
        answer.raise_for_status()
        counts: dict[str, dict[str, int]] = answer.json()
        return counts

    def of(self, variant: str) -> dict[str, int]:
        return self.counts().get(variant, {"requests": 0, "bytes": 0, "spans": 0, "undecodable": 0})

    def around(self, variant: str, measure: Callable[[int], WrkReading]) -> Callable[[int], WrkReading]:
        """`measure`, with the exports this variant sent while it ran (batches of spans from an
        earlier window may land in a later one: the batch processor sends late)."""

        def measured(seconds: int) -> WrkReading:
            before = self.of(variant)
            reading = measure(seconds)
            after = self.of(variant)
            self.windows.setdefault(variant, []).append(
                {figure: after[figure] - before[figure] for figure in ("requests", "bytes", "spans")}
            )
            return reading

        return measured


@contextlib.contextmanager
def running_sink(bench: Bench) -> Iterator[Sink]:
    port = free_port()
    process = bench.children.start(
        "otlp-sink", [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--port", str(port)], cwd=bench.workdir
    )
    sink = Sink(url=f"http://127.0.0.1:{port}", pid=process.pid)
    deadline = time.monotonic() + 30
    try:
        while True:
            if process.poll() is not None:
                raise BenchError(f"the OTLP sink exited: {bench.children.log_tail(process)}")
            with contextlib.suppress(httpx.TransportError):
                sink.counts()
                break
            if time.monotonic() > deadline:
                raise BenchError("the OTLP sink did not answer within 30 s")
            time.sleep(0.05)
        yield sink
    finally:
        bench.children.stop(process)


@dataclass(frozen=True, slots=True)
class TracedTarget:
    proxy: Proxy
    # Its own sessions, read in rotation as S1 reads the main proxy's.
    pool: SessionPool


@contextlib.contextmanager
def traced_proxies(bench: Bench, sink: Sink) -> Iterator[dict[str, TracedTarget]]:
    """Our proxy with tracing on, once per sampling, as the main one otherwise (S1's settings)."""
    progress("S1t: starting our proxy with tracing on, sampling 0% and 100%, exporting to the sink")
    envs = {
        name: bench.our_env(
            f"S1t tracing {LABELS[name]}",
            database_url=bench.sqlite_url(f"s1t-{name}"),
            api_base=bench.stubs.stub,
            token_url=f"{bench.stubs.stub}/oauth/token",
            **PLAIN_CREATE_SETTINGS,  # as the main proxy, which is "off"
            OTEL_EXPORTER_OTLP_ENDPOINT=f"{sink.url}/{name}",
            **sampler,
        )
        for name, sampler in TRACING_VARIANTS.items()
    }
    # Issuing a key also migrates its database: a second or so each, so both at once.
    with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
        issued = {name: pool.submit(issue_api_key, env, bench.workdir) for name, env in envs.items()}
        keys = {name: future.result() for name, future in issued.items()}
    proxies: dict[str, Proxy] = {}
    try:
        for name, env in envs.items():
            proxies[name] = bench.start_ours(f"ours-s1t-{name}", env, key=keys[name])
        targets = {}
        for name, proxy in proxies.items():
            bench.wait_ok(proxy, "/readyz")
            # Its own sessions, S1's rotation, in its own database, read once as S1's are.
            sessions = bind_pool(
                bench.sqlite_url(f"s1t-{name}"), bench.pepper, PENDING, bench.plan.rotation_sessions
            )
            read_each(proxy, sessions, bench.plan.connections)
            targets[name] = TracedTarget(proxy, sessions)
        yield targets
    finally:
        # Stopped before the sink's totals are read: a shutdown flushes the spans still queued.
        for proxy in proxies.values():
            bench.children.stop(proxy.process)


def _read(bench: Bench, target: TracedTarget, seconds: int) -> WrkReading:
    return run_wrk(
        target.proxy.url + "/",
        connections=bench.plan.connections,
        seconds=seconds,
        headers=target.proxy.headers(),
        script=ROTATION_SCRIPT,
        script_args=our_rotation_args(target.pool),
    )


def _reads_served(section: dict[str, Any]) -> int:
    counted = [int(rep["requests"]) for rep in section["reps"]]
    return sum(counted) + int(section.get("warmup", {}).get("requests", 0))


def s1t_outcome(
    bench: Bench,
    measured: dict[str, Any],
    cpu: ProxyCpu,
    sink: Sink,
    totals: dict[str, dict[str, int]],
    sink_cpu_seconds: float,
) -> Outcome:
    # "ours" is S1's own section: copied, so that what S1t adds to it stays out of S1's.
    measured = {"ours": copy.deepcopy(measured["ours"])} | {name: measured[name] for name in TRACING_VARIANTS}
    for name, section in measured.items():
        cpu.attach(section, name, "read", [rep["requests"] for rep in section["reps"]])
    exports: dict[str, Any] = {}
    for name in TRACING_VARIANTS:
        total = totals.get(name, {"requests": 0, "bytes": 0, "spans": 0, "undecodable": 0})
        served = _reads_served(measured[name])
        windows = sink.windows.get(name, [])
        exports[name] = {
            **total,
            "reads_served": served,
            "spans_per_read": round(total["spans"] / served, 3) if served else None,
            # The warm-up's window first, when there was one.
            "per_window": windows,
        }
    off_rate, off_p99 = median_of(measured, "ours"), median_of(measured, "ours", "p99_ms")
    off_cpu = median_of(measured, "ours", "cpu_us_per_read")
    ratios: dict[str, float | None] = {}
    for name in TRACING_VARIANTS:
        short = name.removeprefix("ours_")
        ratios[f"{short}_to_off_requests_per_second"] = ratio(median_of(measured, name), off_rate)
        ratios[f"{short}_to_off_p99"] = ratio(median_of(measured, name, "p99_ms"), off_p99)
        ratios[f"{short}_cpu_microseconds_added_per_read"] = round(
            median_of(measured, name, "cpu_us_per_read") - off_cpu, 1
        )
    if exports["ours_trace100"]["spans"] == 0:
        progress(
            "S1t: no span reached the sink at 100% sampling: tracing is not active in the proxy "
            "measured (the 'on' rows then measure tracing off)"
        )
    data = {
        "title": "result read (GET) with tracing off, on at sampling 0%, on at 100%; S1's repetitions",
        "wrk": {"threads": 1, "connections": bench.plan.connections, "seconds": bench.plan.seconds},
        "variants": {
            "ours": "the main proxy (S1's ours): no OTEL_* variable, tracing off",
            **{name: dict(sampler) for name, sampler in TRACING_VARIANTS.items()},
        },
        "sink": {
            "what": "bench/otlp_sink.py: a process of its own, 200 to every export, spans counted",
            "cpu_seconds": round(sink_cpu_seconds, 3),
        },
        "measured": measured,
        "exports": exports,
        "exports_note": (
            "totals read after the traced proxies stopped (their shutdown flushes the queued spans); "
            "reads_served counts wrk's reads (warm-up included), not the few requests of start-up "
            "(readiness polls, the session created), whose spans, if traced, are in the totals; "
            "per_window: exports that arrived during each window (warm-up first), late batches included"
        ),
        "tracing_active": exports["ours_trace100"]["spans"] > 0,
        "ratios": ratios,
        # Nothing to meet yet: the issue asks for the figures.
        "targets": [],
    }
    return Outcome(data, _rows(measured, ratios, exports))


def _rows(measured: dict[str, Any], ratios: dict[str, float | None], exports: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name in TRACING_VARIANTS:
        short, sent = name.removeprefix("ours_"), exports[name]
        if sent["spans"]:
            what = (
                f"{sent['spans']:,} spans in {sent['requests']:,} exports "
                f"({sent['spans_per_read']:.2f} per read)"
            )
        else:
            what = f"{sent['requests']:,} exports, no span"
        rows.append(
            (
                f"S1t result read, tracing on ({LABELS[name]}) vs off",
                fmt_rate_and_p99(measured, name),
                f"off {fmt_rate_and_p99(measured, 'ours')}; {what}",
                f"{ratios[f'{short}_to_off_requests_per_second']:.2f}x off req/s, "
                f"p99 {ratios[f'{short}_to_off_p99']:.2f}x off; "
                f"CPU {ratios[f'{short}_cpu_microseconds_added_per_read']:+,.0f} µs per read",
                "—",
                "—",
            )
        )
    return rows


def scenario_s1_family(bench: Bench, main: MainTargets, chosen: Sequence[str]) -> dict[str, Outcome]:
    """S1 and S1t, those of them in `chosen`, in one set of interleaved repetitions."""
    wanted = [name for name in S1_FAMILY if name in chosen]
    progress(f"{'/'.join(wanted)} result read: wrk -t1 -c{bench.plan.connections} -d{bench.plan.seconds}s")
    calls = StubCalls(bench.stubs)
    measurements = s1_measurements(bench, main, calls)
    if "S1" not in wanted:  # S1t alone: its baseline only
        measurements = {"ours": measurements["ours"]}
    if "S1t" not in wanted:
        readings, warmups = interleaved(bench.plan, bench.plan.seconds, measurements)
        readings["stub_direct"] = [measure_stub_direct(bench, main)]
        return {"S1": s1_outcome(bench, main, summarize_all(readings, warmups), calls)}
    cpu = ProxyCpu()
    measurements["ours"] = cpu.around("ours", main.ours.process.pid, measurements["ours"])
    outcomes: dict[str, Outcome] = {}
    with running_sink(bench) as sink:
        sink_cpu_before = cpu_seconds(sink.pid)
        with traced_proxies(bench, sink) as targets:
            for name, target in targets.items():
                measurements[name] = cpu.around(
                    name, target.proxy.process.pid, sink.around(name, functools.partial(_read, bench, target))
                )
            readings, warmups = interleaved(bench.plan, bench.plan.seconds, measurements)
            if "S1" in wanted:
                readings["stub_direct"] = [measure_stub_direct(bench, main)]
            measured = summarize_all(readings, warmups)
            # Inside: a failure's sample request needs the proxies still running.
            for name, target in targets.items():
                if measured[name]["non_2xx"]["max"] > 0:
                    measured[name]["sample_failure"] = sample_failure(
                        target.proxy, "GET", RESULT_PATH.format(session_id=target.pool.session_id(0))
                    )
        totals = sink.counts()
        sink_cpu_seconds = cpu_seconds(sink.pid) - sink_cpu_before
    if "S1" in wanted:
        outcomes["S1"] = s1_outcome(bench, main, measured, calls)
    outcomes["S1t"] = s1t_outcome(bench, measured, cpu, sink, totals, sink_cpu_seconds)
    return outcomes
