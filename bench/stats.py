"""Statistics and goals: min/median/max over repetitions, ratios, targets met, the interleaved
repetitions every throughput scenario runs, and the cells of the summary table. (Not `statistics.py`:
that name would shadow the standard library's module, which this one uses, for the whole harness.)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common import progress
from plan import Plan
from wrk import WrkReading


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(readings: Sequence[WrkReading]) -> dict[str, Any]:
    return {
        "reps": [dataclasses.asdict(reading) for reading in readings],
        "requests_per_second": spread([r.requests_per_second for r in readings]),
        "p50_ms": spread([r.p50_ms for r in readings]),
        "p99_ms": spread([r.p99_ms for r in readings]),
        "non_2xx": spread([r.non_2xx for r in readings]),
        "socket_errors": spread([r.socket_errors for r in readings]),
    }


def summarize_all(
    readings: Mapping[str, Sequence[WrkReading]], warmups: Mapping[str, WrkReading]
) -> dict[str, Any]:
    measured = {name: summarize(values) for name, values in readings.items()}
    for name, warmup in warmups.items():
        measured[name]["warmup"] = dataclasses.asdict(warmup)
    return measured


def median_of(measured: Mapping[str, Any], system: str, figure: str = "requests_per_second") -> float:
    return float(measured[system][figure]["median"])


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4) if denominator else math.inf


def goal(metric: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "target": target, "met": met}


def interleaved(
    plan: Plan, seconds: int, measurements: Mapping[str, Callable[[int], WrkReading]]
) -> tuple[dict[str, list[WrkReading]], dict[str, WrkReading]]:
    """A warm-up of each system (not counted), then repetitions that measure every system once,
    in turn, so slow drift (another load on the machine, thermal state) is shared instead of
    landing on whichever system ran last. `measurements` take the seconds to run."""
    warmups: dict[str, WrkReading] = {}
    if plan.warmup_seconds > 0:
        for name, measure in measurements.items():
            warmups[name] = measure(plan.warmup_seconds)
            progress(f"  warm-up {name}: {warmups[name].requests_per_second:,.0f} req/s (not counted)")
    readings: dict[str, list[WrkReading]] = {name: [] for name in measurements}
    for rep in range(plan.reps):
        for name, measure in measurements.items():
            reading = measure(seconds)
            progress(
                f"  rep {rep + 1}/{plan.reps} {name}: {reading.requests_per_second:,.0f} req/s, "
                f"p99 {reading.p99_ms:.1f} ms, non-2xx {reading.non_2xx}, "
                f"socket errors {reading.socket_errors}"
            )
            readings[name].append(reading)
    return readings, warmups


# One line of the summary table: scenario, ours, reference(s), ratio, target, met?
Row = tuple[str, str, str, str, str, str]


@dataclass(slots=True)
class Outcome:
    """One scenario's JSON section and its rows of the summary table."""

    data: dict[str, Any]
    rows: list[Row]


def fmt_rate(figures: Mapping[str, float]) -> str:
    return f"{figures['median']:,.0f} req/s ({figures['min']:,.0f}-{figures['max']:,.0f})"


def fmt_rate_and_p99(measured: Mapping[str, Any], system: str) -> str:
    p99 = median_of(measured, system, "p99_ms")
    return f"{fmt_rate(measured[system]['requests_per_second'])}, p99 {p99:.1f} ms"


def fmt_p99(milliseconds: float) -> str:
    # wrk reports no latency when (nearly) every request failed.
    return f"{milliseconds:.0f} ms" if milliseconds > 0 else "n/a (requests failed)"


def fmt_met(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")
