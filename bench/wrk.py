"""wrk, the load generator: one run of it, and its `--latency` output parsed into a WrkReading."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import BenchError


@dataclass(frozen=True, slots=True)
class WrkReading:
    requests_per_second: float
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    non_2xx: int
    socket_errors: int
    seconds: float
    connections: int
    # What a wrk script counted itself (its `done` writes `counted <name> <n>` lines), e.g. S2b's
    # creates that succeeded: wrk's own totals mix the two requests of a pair.
    counted: dict[str, int] | None = None
    # wrk's own output, kept only for a reading with errors or without any request, to show why.
    output: str | None = None


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"wrk: unreadable time {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk(output: str, connections: int) -> WrkReading:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    mean = re.search(r"^\s+Latency\s+(\S+)", output, re.MULTILINE)
    if rate is None or total is None or p50 is None or p99 is None or mean is None:
        raise BenchError(f"wrk: unexpected output:\n{output[-1500:]}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    counted = {name: int(value) for name, value in re.findall(r"^counted (\w+) (\d+)$", output, re.MULTILINE)}
    anomalous = non_2xx is not None or socket_errors is not None or int(total.group(1)) == 0
    return WrkReading(
        requests_per_second=float(rate.group(1)),
        requests=int(total.group(1)),
        p50_ms=round(_milliseconds(p50.group(1)), 3),
        p99_ms=round(_milliseconds(p99.group(1)), 3),
        mean_ms=round(_milliseconds(mean.group(1)), 3),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(value) for value in socket_errors.groups()) if socket_errors else 0,
        seconds=_milliseconds(total.group(2) + total.group(3)) / 1000,
        connections=connections,
        counted=counted or None,
        output=output.strip()[-1500:] if anomalous else None,
    )


def wrk_command(
    url: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 1,
    headers: Mapping[str, str] | None = None,
    script: Path | None = None,
    script_args: Sequence[str] = (),
) -> list[str]:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", str(script)]
    command.append(url)
    if script_args:
        command += ["--", *script_args]  # the script's init(args)
    return command


def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 1,
    headers: Mapping[str, str] | None = None,
    script: Path | None = None,
    script_args: Sequence[str] = (),
) -> WrkReading:
    command = wrk_command(
        url,
        connections=connections,
        seconds=seconds,
        threads=threads,
        headers=headers,
        script=script,
        script_args=script_args,
    )
    answer = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if answer.returncode != 0:
        raise BenchError(f"wrk failed on {url}: {(answer.stdout + answer.stderr).strip()[-1500:]}")
    return parse_wrk(answer.stdout, connections)
