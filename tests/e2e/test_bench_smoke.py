"""The benchmark harness end to end, tiny: `bench/run.py --smoke` runs every scenario (S0-S8, S1t,
S1s, S1-final and S1-herd beside S1, and S2i and S2b beside S2) against nginx stubs, the naive proxy
and our proxy, and writes its JSON, Markdown and chart. Nothing here judges a timing or a target:
the smoke run is too short for either to mean anything. What it proves is that every scenario runs,
reports numbers and ratios, and that our proxy answered 2xx throughout.

Needs wrk, nginx and nginx's echo module (Debian: wrk, nginx-light, libnginx-mod-http-echo; .ci/run
and bench/install-tools install them). Without them the test is skipped, unless
LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1 (CI), where the harness installs them itself. S4's fleet
variant needs PostgreSQL and Redis, with the same rule as tests/services.py: required in CI,
otherwise skipped (only that variant) when they are not there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services import REQUIRE_SERVICES, postgres_problem, redis_problem

RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"
SCENARIOS = (
    "S0", "S1", "S1-final", "S1-herd", "S1s", "S1t", "S2", "S2b", "S2i", "S3", "S4", "S5", "S6", "S7", "S8",
)  # fmt: skip
# X-Liveness-Result-Source (issue 21), or "absent" on a build before it.
RESULT_SOURCES = {"upstream", "shared", "stored", "absent"}
ECHO_MODULE = Path("/usr/share/nginx/modules/ngx_http_echo_module.so")


def _missing_tools() -> list[str]:
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        missing.append("nginx-light")
    if not ECHO_MODULE.exists():
        missing.append("libnginx-mod-http-echo")
    return missing


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _assert_spread(section: dict[str, Any], figure: str, where: str) -> None:
    values = section[figure]
    for name in ("min", "median", "max"):
        assert _is_number(values[name]), f"{where}: {figure}.{name} is {values[name]!r}"


def _run_smoke(out: Path, fleet: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(RUN), "--smoke", "--out", str(out), "--fleet", fleet]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the harness then stops nginx and every proxy it started.
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"bench/run.py --smoke did not finish in 240 s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.timeout(300)
def test_bench_smoke_runs_every_scenario(tmp_path: Path) -> None:
    missing = _missing_tools()
    if missing and not REQUIRE_SERVICES:
        pytest.skip(
            f"benchmark tools missing ({', '.join(missing)}): run bench/install-tools as root, "
            "or set LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1 to have the harness install them"
        )
    services_problem = postgres_problem() or redis_problem()
    fleet = "require" if REQUIRE_SERVICES or services_problem is None else "skip"

    answer = _run_smoke(tmp_path, fleet)

    assert answer.returncode == 0, f"bench/run.py --smoke failed:\n{answer.stderr[-4000:]}"
    reports = list(tmp_path.glob("*.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["mode"] == "smoke"
    assert sorted(report["scenarios"]) == list(SCENARIOS)
    for suffix in ("md", "png"):
        written = reports[0].with_suffix(f".{suffix}")
        assert written.exists(), written
        assert written.stat().st_size > 0, written
    assert reports[0].with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "| scenario |" in answer.stdout  # the summary table

    scenarios = report["scenarios"]
    for name in SCENARIOS:
        assert {"measured", "ratios", "targets"} <= set(scenarios[name]), name
        for target in scenarios[name]["targets"]:
            assert target["met"] in (True, False, None), (name, target)

    # S1-S3: every system measured, with numbers; our proxy answered nothing but 2xx.
    throughput = {"S1": ("ours", "nginx", "naive", "stub_direct"), "S2": ("ours", "nginx", "naive")}
    for name, systems in throughput.items():
        measured = scenarios[name]["measured"]
        for system in systems:
            for figure in ("requests_per_second", "p50_ms", "p99_ms", "non_2xx", "socket_errors"):
                _assert_spread(measured[system], figure, f"{name}/{system}")
        assert measured["ours"]["requests_per_second"]["min"] > 0, name
        assert measured["ours"]["non_2xx"]["max"] == 0, (name, measured["ours"].get("sample_failure"))
    for ratio in ("ours_to_nginx", "ours_to_naive"):
        assert _is_number(scenarios["S1"]["ratios"][ratio]), ratio
    for ratio in ("ours_to_ours_s1", "ours_to_nginx", "ours_to_naive"):
        assert _is_number(scenarios["S2"]["ratios"][ratio]), ratio
    # S1 read pending sessions in rotation: our proxy called Cynopsis for its reads (how many per
    # read is for the benchmark to judge: the smoke run's rotation is short) and said, or did not
    # say, where its sampled answers came from.
    s1_path = scenarios["S1"]["uncached_path"]
    assert s1_path["sessions_in_rotation"] == report["plan"]["rotation_sessions"]
    _assert_spread(s1_path, "stub_calls_per_read", "S1/uncached_path")
    assert s1_path["stub_calls_per_read"]["max"] > 0, s1_path
    assert set(s1_path["result_sources_sampled"]) <= RESULT_SOURCES, s1_path
    assert sum(s1_path["result_sources_sampled"].values()) > 0, s1_path
    # S0: one connection through ours, nginx and the stub direct; the latency each proxy adds.
    s0 = scenarios["S0"]
    for system in ("ours", "nginx", "stub_direct"):
        for figure in ("requests_per_second", "p50_ms", "p99_ms", "non_2xx"):
            _assert_spread(s0["measured"][system], figure, f"S0/{system}")
        assert s0["measured"][system]["non_2xx"]["max"] == 0, system
    for ratio in ("ours_added_p50_us", "ours_added_p99_us", "nginx_added_p50_us", "nginx_added_p99_us"):
        assert _is_number(s0["ratios"][ratio]), ratio
    # S1-final and S1-herd: ours and nginx, every read 2xx; our proxy's Cynopsis calls counted (the
    # herd's per window, from the stub's log: at least the first read's call, whatever the build).
    for name in ("S1-final", "S1-herd"):
        measured = scenarios[name]["measured"]
        for system in ("ours", "nginx"):
            for figure in ("requests_per_second", "p50_ms", "p99_ms", "non_2xx"):
                _assert_spread(measured[system], figure, f"{name}/{system}")
            assert measured[system]["non_2xx"]["max"] == 0, (
                name,
                system,
                measured[system].get("sample_failure"),
            )
        assert _is_number(scenarios[name]["ratios"]["ours_to_nginx"]), name
        assert set(measured["ours"]["result_sources_sampled"]) <= RESULT_SOURCES, name
    _assert_spread(scenarios["S1-final"]["measured"]["ours"], "stub_calls_per_read", "S1-final/ours")
    herd = scenarios["S1-herd"]["measured"]["ours"]
    assert [window["calls"] > 0 for window in herd["stub_calls"]] == [True] * report["plan"]["reps"], herd
    _assert_spread(herd, "stub_calls_per_reuse_window", "S1-herd/ours")
    # S1t: S1's read with tracing on at sampling 0% and 100%, in S1's repetitions beside its "ours"
    # (off); the sink counted the exports: none at 0% (nothing sampled), spans at 100%.
    s1t = scenarios["S1t"]
    for system in ("ours", "ours_trace0", "ours_trace100"):
        section = s1t["measured"][system]
        for figure in ("requests_per_second", "p99_ms", "non_2xx", "cpu_us_per_read"):
            _assert_spread(section, figure, f"S1t/{system}")
        assert section["requests_per_second"]["min"] > 0, system
        assert section["non_2xx"]["max"] == 0, (system, section.get("sample_failure"))
    for variant in ("trace0", "trace100"):
        for figure in ("to_off_requests_per_second", "to_off_p99", "cpu_microseconds_added_per_read"):
            assert _is_number(s1t["ratios"][f"{variant}_{figure}"]), (variant, figure)
    exports = s1t["exports"]
    assert exports["ours_trace0"]["requests"] == exports["ours_trace0"]["spans"] == 0, exports
    assert exports["ours_trace100"]["undecodable"] == 0, exports
    # Until the proxy's tracing (src/liveness_proxy/tracing/) is in the build, "on" is "off".
    if importlib.util.find_spec("liveness_proxy.tracing") is not None:
        # Only "some": a batch processor whose queue is full drops spans, which is for the
        # benchmark to report, not for this test to judge.
        assert exports["ours_trace100"]["spans"] > 0, exports
    # S1s: S1 beside slow readers answered 2xx throughout (no slot lost to them), and the attack ran.
    s1s = scenarios["S1s"]["measured"]
    for system in ("quiet", "attacked"):
        for figure in ("requests_per_second", "p99_ms", "errors"):
            _assert_spread(s1s[system], figure, f"S1s/{system}")
        assert s1s[system]["errors"]["max"] == 0, (system, s1s[system].get("sample_failure"))
    assert [attack["opened"] > 0 for attack in s1s["attacked"]["slow_readers"]] == [True]
    assert _is_number(scenarios["S1s"]["ratios"]["attacked_to_quiet"])
    # S2i and S2b: what an Idempotency-Key and token binding cost a create; every keyed create and
    # every pair answered 2xx (a 422 would mean S2's settings or the bound flow's script broke).
    s2i = scenarios["S2i"]
    for system in ("ours", "ours_idempotent"):
        for figure in ("requests_per_second", "p99_ms", "non_2xx", "cpu_us_per_create"):
            _assert_spread(s2i["measured"][system], figure, f"S2i/{system}")
        assert s2i["measured"][system]["requests_per_second"]["min"] > 0, system
        assert s2i["measured"][system]["non_2xx"]["max"] == 0, (
            system,
            s2i["measured"][system].get("sample_failure"),
        )
    for ratio in ("idempotent_to_plain_requests_per_second", "idempotent_to_plain_p99"):
        assert _is_number(s2i["ratios"][ratio]), ratio
    s2b = scenarios["S2b"]
    for system in ("pair_unbound", "pair_bound"):
        section = s2b["measured"][system]
        for figure in ("requests_per_second", "pairs_per_second", "p99_ms", "non_2xx", "cpu_us_per_pair"):
            _assert_spread(section, figure, f"S2b/{system}")
        assert section["pairs_per_second"]["min"] > 0, system
        assert section["non_2xx"]["max"] == 0, (system, section.get("sample_failure"))
        for rep in section["reps"]:
            # Every token fetched is used once; the creates still in flight when wrk stopped (at
            # most one per connection) are the only ones not counted as created.
            counted = rep["counted"]
            assert counted["creates_sent"] - counted["created"] <= rep["connections"], counted
    for ratio in ("bound_to_unbound_pairs_per_second", "bound_to_unbound_p99"):
        assert _is_number(s2b["ratios"][ratio]), ratio
    for system in ("ours", "nginx", "naive"):
        for figure in ("requests_per_second", "p99_ms", "errors"):
            _assert_spread(scenarios["S3"]["measured"][system], figure, f"S3/{system}")
    for ratio in ("ours_to_ideal", "ours_to_nginx", "ours_p99_to_nginx_p99"):
        assert _is_number(scenarios["S3"]["ratios"][ratio]), ratio
    _assert_spread(scenarios["S3"]["measured"]["ours"], "stub_calls_per_read", "S3/ours")

    # S4: token requests counted (no judgement of the count: that is the benchmark's to report).
    s4 = scenarios["S4"]
    _assert_spread(s4["measured"]["per_process"], "token_requests_in_burst", "S4/per_process")
    assert _is_number(s4["ratios"]["per_process_count_to_expected"])
    if fleet == "require":
        _assert_spread(s4["measured"]["fleet"], "token_requests_in_burst", "S4/fleet")
        assert _is_number(s4["ratios"]["fleet_count_to_expected"])
    else:
        assert s4["measured"]["fleet"]["skipped"]
    for variant in ("per_process", *(("fleet",) if fleet == "require" else ())):
        for rep in s4["measured"][variant]["reps"]:
            assert sum(rep["answers"].values()) == report["plan"]["burst_requests"], rep

    # S5 and S6: memory and start-up figures.
    s5 = scenarios["S5"]["measured"]["ours"]
    for figure in ("rss_idle_mb", "rss_at_first_mb", "rss_at_last_mb", "growth_percent"):
        assert _is_number(s5[figure]), figure
    assert s5["checkpoints"][1]["requests"] > s5["checkpoints"][0]["requests"] > 0
    for ratio in ("rss_at_last_to_limit", "growth_percent"):
        assert _is_number(scenarios["S5"]["ratios"][ratio]), ratio
    for system in ("ours", "naive"):
        _assert_spread(scenarios["S6"]["measured"][system], "seconds", f"S6/{system}")
    assert _is_number(scenarios["S6"]["ratios"]["ours_to_naive"])

    # S7: S1 and S2 with the finalizer off, on with nothing due, and on and busy (+ webhook), every
    # reading 2xx; what the background did in each "on" window; the sessions one process followed.
    s7 = scenarios["S7"]
    hot_path = s7["measured"]["hot_path"]
    modes = ("off", "on_quiet", "on_busy")
    for system in (f"{scenario}_{mode}" for scenario in ("s1", "s2") for mode in modes):
        for figure in ("requests_per_second", "p50_ms", "p99_ms", "non_2xx", "socket_errors"):
            _assert_spread(hot_path[system], figure, f"S7/{system}")
        assert hot_path[system]["requests_per_second"]["min"] > 0, system
        assert hot_path[system]["non_2xx"]["max"] == 0, (system, hot_path[system].get("sample_failure"))
        if system.endswith("_off"):
            continue
        windows = hot_path[system]["background"]
        assert len(windows) == report["plan"]["reps"], system
        for window in windows:
            for figure in ("sessions_followed_to_verdict", "webhooks_delivered", "jobs_discarded_after"):
                assert isinstance(window[figure], int), (system, figure, window)
                assert window[figure] >= 0, (system, figure, window)
    # Nothing came due on the quiet proxy; the busy one read S1 with a backlog in front of it.
    for system in ("s1_on_quiet", "s2_on_quiet"):
        assert hot_path[system]["background"][0]["sessions_followed_to_verdict"] == 0, system
    assert hot_path["s2_on_quiet"]["background"][0]["jobs_discarded_after"] > 0  # rows written
    assert hot_path["s1_on_busy"]["background"][0]["backlog_bound"] >= report["plan"]["busy_backlog_floor"]
    assert hot_path["s2_on_busy"]["background"][0]["sessions_created"] > 0
    for scenario in ("s1", "s2"):
        for mode in ("on_quiet", "on_busy"):
            for figure in ("requests_per_second", "p99"):
                assert _is_number(s7["ratios"][f"{scenario}_{mode}_to_off_{figure}"]), (scenario, mode)
    follow = s7["measured"]["follow"]
    budgets = [[entry["finalizer_concurrency"], entry["webhook_concurrency"]] for entry in follow]
    assert budgets == report["plan"]["follow_budgets"]
    for entry in follow:
        assert entry["sessions"] == report["plan"]["follow_sessions"]
        for figure in ("followed_per_second", "delivered_per_second", "cpu_ms_per_session"):
            assert _is_number(entry[figure]), (figure, entry)
            assert entry[figure] > 0, (figure, entry)

    # S8: authenticated reads alone and beside two tiny floods of bad credentials, on a proxy of its
    # own. The reads are never refused (the flood's addresses are not theirs); every flood answer is
    # a 401 or a 429 (the one address goes over its limit, the many never); the floods' rows stay
    # within their bound and count every failure the proxy answered.
    s8 = scenarios["S8"]
    floods = ("flood_one_address", "flood_many_addresses")
    for system in ("alone", *floods):
        section = s8["measured"][system]
        for figure in ("requests_per_second", "p99_ms", "non_2xx", "socket_errors"):
            _assert_spread(section, figure, f"S8/{system}")
        assert section["requests_per_second"]["min"] > 0, system
        assert section["non_2xx"]["max"] == 0, system
    _assert_spread(s8["measured"]["alone"], "proxy_cpu_us_per_request", "S8/alone")
    for system in floods:
        flood = s8["measured"][system]["flood"]
        assert flood["finished_every_flood"], system
        for rep in flood["reps"]:
            answers, counted = rep["answers"], rep["reading"]["counted"]
            assert answers["other"] == 0, (system, answers)
            assert answers["401"] + answers["429"] == counted["answered"] >= 300, (system, counted)
        _assert_spread(flood, "proxy_cpu_us_per_refusal_estimate", f"S8/{system}")
        assert _is_number(s8["ratios"][f"{system}_to_alone"]), system
    assert s8["measured"]["flood_one_address"]["flood"]["answered_429"]["min"] > 0
    assert s8["measured"]["flood_many_addresses"]["flood"]["answered_429"]["max"] == 0
    database = s8["database"]
    assert database["proxy_exit_code"] == 0
    assert 0 < database["flood_rows"] <= database["bound"], database
    assert (
        database["flood_requests_answered"]
        <= database["failures_recorded"]
        <= database["flood_requests_sent"]
    )
