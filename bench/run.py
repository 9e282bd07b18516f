"""The benchmark harness: our proxy side by side with nginx (the ceiling) and a naive FastAPI + httpx
proxy (the floor), all in front of one static nginx stub of the Cynopsis API, on loopback.

    .venv/bin/python bench/run.py [--reps 3] [--duration 8] [--scenarios S1,S2,...] [--smoke]
                                  [--out bench/results] [--profile | --profile-only] [--update-docs]
                                  [--fleet auto|require|skip]

Scenarios (see bench/README.md): S0 the latency added at one connection, S1 result read (pending
sessions in rotation: the uncached path), S1-final the same of terminal sessions, S1-herd 64
connections polling one pending session (Cynopsis calls counted), S1t S1 with tracing off, on at
sampling 0% and on at 100% (in S1's repetitions), S1s the same beside slow readers, S2 create
session, S2i and S2b what an Idempotency-Key and session-token binding cost a create, S3 slow
upstream (500 ms), S4 token stampede (one process, and a fleet on PostgreSQL + Redis), S5 memory
over many requests, S6 start-up time, S7 the finalizer's cost to S1/S2 (on vs off) and the
sessions per second one process follows to a verdict and announces by webhook, S8 authenticated
reads beside a flood of bad credentials (from one address and from many) and the rows it writes.
Every throughput
figure is min/median/max over the repetitions, which run interleaved across the systems so that
drift on a shared machine hits all of them alike; only ratios measured in one run mean anything.

Writes <out>/<YYYY-MM-DD>.json, .md and .png; progress goes to stderr, the summary table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The harness's parts, one module per section (bench/README.md): imported by plain name, as this
# script's directory, bench/, is first on sys.path.
from common import BENCH_DIR, BenchError, progress
from plan import plan_from
from processes import Children, ensure_tools, raise_open_file_limit
from profiling import profile_scenario
from proxies import PROXY_LOG_LEVEL, Bench
from report import machine_info, markdown_table, render_chart, update_docs
from scenarios.main_proxies import MainTargets, start_main_targets
from scenarios.s0_added_latency import scenario_s0
from scenarios.s1_final import scenario_s1_final
from scenarios.s1_herd import scenario_s1_herd
from scenarios.s1_slow_readers import scenario_s1_slow_readers
from scenarios.s1_tracing import S1_FAMILY, scenario_s1_family
from scenarios.s2_costs import S2_FAMILY, scenario_s2_family
from scenarios.s3_slow_upstream import scenario_s3
from scenarios.s4_token_stampede import scenario_s4
from scenarios.s5_memory import scenario_s5
from scenarios.s6_startup import scenario_s6
from scenarios.s7_finalizer import scenario_s7
from scenarios.s8_auth_flood import scenario_s8
from stats import Outcome, Row
from stubs import start_nginx

ALL_SCENARIOS = (
    "S0", "S1", "S1-final", "S1-herd", "S1t", "S1s", "S2", "S2i", "S2b", "S3", "S4", "S5", "S6", "S7", "S8",
)  # fmt: skip
# --scenarios ignores case and hyphens: s1final, S1-FINAL and S1-final are one scenario.
_SCENARIO_NAMES = {name.upper().replace("-", ""): name for name in ALL_SCENARIOS}
# Those that read through the main proxies (scenarios/main_proxies.py).
_ON_MAIN_PROXIES = {"S0", "S1", "S1-final", "S1-herd", "S1t", "S2", "S2i", "S5"}


def run_scenarios(bench: Bench, out: Path, date: str, profile: bool) -> tuple[dict[str, Any], list[Row]]:
    chosen = bench.plan.scenarios
    outcomes: dict[str, Outcome] = {}
    main: MainTargets | None = None
    if _ON_MAIN_PROXIES & set(chosen) or profile:
        main = start_main_targets(bench)
    if set(S1_FAMILY) & set(chosen) and main is not None:
        outcomes |= scenario_s1_family(bench, main, chosen)
    if "S0" in chosen and main is not None:
        outcomes["S0"] = scenario_s0(bench, main)
    if "S1-final" in chosen and main is not None:
        outcomes["S1-final"] = scenario_s1_final(bench, main)
    if "S1-herd" in chosen and main is not None:
        outcomes["S1-herd"] = scenario_s1_herd(bench, main)
    if "S1s" in chosen:
        outcomes["S1s"] = scenario_s1_slow_readers(bench)
    if set(S2_FAMILY) & set(chosen):
        outcomes |= scenario_s2_family(bench, main, outcomes.get("S1"), chosen)
    if profile and main is not None:
        for scenario in ("S1", "S2"):
            print(profile_scenario(bench, main, scenario, out, date))
    if "S3" in chosen:
        outcomes["S3"] = scenario_s3(bench)
    if "S4" in chosen:
        outcomes["S4"] = scenario_s4(bench)
    if "S5" in chosen:
        outcomes["S5"] = scenario_s5(bench, main)
    if "S6" in chosen:
        outcomes["S6"] = scenario_s6(bench)
    if "S7" in chosen:
        outcomes["S7"] = scenario_s7(bench)
    if "S8" in chosen:
        outcomes["S8"] = scenario_s8(bench)
    # In the order of ALL_SCENARIOS (S0 first), whatever order they ran in.
    ordered = [name for name in ALL_SCENARIOS if name in outcomes]
    rows = [row for name in ordered for row in outcomes[name].rows]
    return {name: outcomes[name].data for name in ordered}, rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="wrk seconds per repetition (default 8)")
    parser.add_argument(
        "--scenarios",
        # Case-insensitive (s2i, S2I and S2i are one scenario); unknown names are kept to be refused.
        type=lambda text: tuple(
            _SCENARIO_NAMES.get(part.strip().upper().replace("-", ""), part.strip())
            for part in text.split(",")
            if part.strip()
        ),
        default=ALL_SCENARIOS,
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default all)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run proving every scenario works (~1 min)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results folder")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one S1 and one S2 run with py-spy"
    )
    parser.add_argument("--profile-only", action="store_true", help="only the py-spy runs of S1 and S2")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="table and chart into docs/performance.* and README.md's performance section",
    )
    parser.add_argument(
        "--fleet",
        choices=("auto", "require", "skip"),
        default="auto",
        help="S4's fleet on PostgreSQL + Redis: run when reachable (auto), fail without them, or skip",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in ALL_SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: choose from {','.join(ALL_SCENARIOS)}")
    if args.reps < 1 or args.duration < 1:
        parser.error("--reps and --duration must be at least 1")
    return args


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    # Turned into an exception so that the `finally` below stops every child and removes the
    # scratch directories (the default action would leave nginx and the proxies running).
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_from(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        ensure_tools()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    open_files = raise_open_file_limit()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    workdir = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    # nginx's worker runs as `nobody` when started as root: its prefix must be enterable by it.
    nginx_prefix = Path(tempfile.mkdtemp(prefix="lp-bench-nginx-"))
    nginx_prefix.chmod(0o755)
    children = Children(workdir / "logs")
    started = time.monotonic()
    try:
        progress(
            f"{plan.mode} run: scenarios {','.join(plan.scenarios)}, {plan.reps} rep(s) of {plan.seconds} s"
        )
        stubs = start_nginx(children, nginx_prefix, plan, open_files)
        bench = Bench(
            plan=plan,
            workdir=workdir,
            children=children,
            stubs=stubs,
            pepper=secrets.token_urlsafe(48),
            settings_used={},
        )
        if args.profile_only:
            main_targets = start_main_targets(bench)
            for scenario in ("S1", "S2"):
                print(profile_scenario(bench, main_targets, scenario, out, date))
            return 0
        machine = machine_info()
        scenarios, rows = run_scenarios(bench, out, date, args.profile)
        machine["load_average_at_end"] = list(os.getloadavg())
        report = {
            "date": date,
            "mode": plan.mode,
            "plan": dataclasses.asdict(plan),
            "elapsed_seconds": round(time.monotonic() - started, 1),
            "machine": machine,
            "settings": {
                "our_proxy": bench.settings_used,
                "log_level": PROXY_LOG_LEVEL,
                "log_level_note": (
                    "as shipped: our per-request access line (info) is written to a log file; uvicorn's "
                    "own access log is off in `serve`; the naive proxy runs with --no-access-log and "
                    "nginx with access_log off"
                ),
                "workers": 1,
                "audit": "on (always)",
                "nginx": "one process, worker_processes 1, serves the stubs and the nginx proxy",
            },
            "scenarios": scenarios,
        }
        table = markdown_table(rows)
        json_path, md_path, png_path = (out / f"{date}.{suffix}" for suffix in ("json", "md", "png"))
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        md_path.write_text(
            f"# Benchmark {date} ({plan.mode}, {plan.reps} rep(s) x {plan.seconds} s, "
            f"{machine['nproc']} cores)\n\n{table}"
        )
        render_chart(scenarios, png_path)
        if args.update_docs:
            update_docs(table, png_path)
        progress(f"wrote {json_path}, {md_path}, {png_path} in {time.monotonic() - started:.0f} s")
        print(table, end="")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    else:
        return 0
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(nginx_prefix, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
