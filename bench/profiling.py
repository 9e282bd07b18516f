"""Profiling: one extra S1 or S2 run with py-spy sampling our proxy, reduced to its top functions by
self and inclusive samples. (Not `profile.py`: that would shadow the standard library's module,
which cProfile imports, for the whole harness.)
"""

from __future__ import annotations

import collections
import contextlib
import re
import subprocess
import time
from pathlib import Path

from common import PY_SPY, BenchError, progress
from processes import cpu_seconds
from profile_breakdown import breakdown, render
from proxies import Bench
from result_paths import PENDING
from scenarios.main_proxies import MainTargets, measure_create_session, measure_result_read

PROFILE_RATE_HZ = 250
PROFILE_TOP = 25


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")


def function_of(frame: str) -> str:
    """`func (path/to/file.py:12)` → `func (to/file.py)`: line numbers merged, paths shortened."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/src/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('function')} ({path})"


def top_functions(
    collapsed: str, limit: int = PROFILE_TOP
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) stacks: total samples, the top functions by self samples and
    by inclusive samples (a function counted once per stack even when it recurses)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [function_of(frame) for frame in stack.split(";") if frame.strip()]
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own.most_common(limit), inclusive.most_common(limit)


def render_top(title: str, total: int, own: list[tuple[str, int]], inclusive: list[tuple[str, int]]) -> str:
    lines = [
        f"{title}: {total} samples (the thread holding the GIL; shares are of all samples)",
        "",
        f"top {len(own)} by self samples:",
    ]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in own] if total else []
    lines += ["", f"top {len(inclusive)} by inclusive samples:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in inclusive] if total else []
    return "\n".join(lines) + "\n"


def profile_scenario(bench: Bench, main: MainTargets, scenario: str, out: Path, date: str) -> str:
    """One extra S1 or S2 run with py-spy sampling our proxy; returns the top-functions text."""
    seconds = bench.plan.seconds
    output = out / f"profile-{scenario}-{date}.txt"
    if scenario == "S1":
        # Bound and read once before the sampler attaches (a pool is made on first use): the profile
        # is of the steady state, not of the first reads that fetch each binding from the database.
        main.pool(bench, PENDING)
    progress(f"profiling {scenario}: py-spy record --rate {PROFILE_RATE_HZ} for {seconds} s")
    spy = bench.children.start(
        f"py-spy-{scenario}",
        [
            PY_SPY, "record", "--pid", str(main.ours.process.pid), "--duration", str(seconds),
            "--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--nonblocking", "--gil",
            "--output", str(output),
        ],
    )  # fmt: skip
    # --gil: only samples of the thread holding the GIL, i.e. Python actually running. Without it
    # the database driver's worker thread, waiting on its queue, shows up as a third of the time.
    time.sleep(0.5)  # attached before the load starts, so the samples cover all of it
    measure = measure_result_read if scenario == "S1" else measure_create_session
    cpu_before = cpu_seconds(main.ours.process.pid)
    reading = measure(bench, main, "ours", seconds)
    # The CPU of the whole process (its threads too) over the window, sampler included: py-spy
    # reads from outside, so this is what turns each component's share into microseconds.
    cpu_us_per_request = (cpu_seconds(main.ours.process.pid) - cpu_before) / max(reading.requests, 1) * 1e6
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(timeout=seconds + 60)
    log = bench.children.log_tail(spy)
    bench.children.stop(spy)
    if not output.exists():
        raise BenchError(f"py-spy wrote no profile: {log}")
    total, own, inclusive = top_functions(output.read_text())
    title = (
        f"{scenario} profile of our proxy (pid {main.ours.process.pid}) during "
        f"{reading.requests_per_second:,.0f} req/s (py-spy --gil at {PROFILE_RATE_HZ} Hz, under load)"
    )
    text = render_top(title, total, own, inclusive)
    components = render(breakdown(output.read_text()), round(cpu_us_per_request))
    text += (
        f"\nby component ({cpu_us_per_request:,.0f} µs of CPU per request in this window):\n\n{components}\n"
    )
    (out / f"profile-{scenario}-{date}.top.txt").write_text(text)
    return text
