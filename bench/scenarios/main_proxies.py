"""The main proxies for S1/S2: ours and the naive one in front of the static stub, started once per run
and shared by S1, S2, S5 (the naive proxy's RSS, for context) and the py-spy runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from common import BENCH_DIR, RESULT_PATH, SESSIONS_PATH, STUB_RESULT_PATH, progress
from proxies import PLAIN_CREATE_SETTINGS, Bench, Proxy, create_session
from wrk import WrkReading, run_wrk


@dataclass(frozen=True, slots=True)
class MainTargets:
    """Our proxy and the naive one in front of the static stub, and a session of our caller."""

    ours: Proxy
    naive: Proxy
    session_id: str


def start_main_targets(bench: Bench) -> MainTargets:
    progress("starting our proxy and the naive proxy in front of the static stub")
    env = bench.our_env(
        "main",
        database_url=bench.sqlite_url("main"),
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
        **PLAIN_CREATE_SETTINGS,
    )
    ours = bench.start_ours("ours", env)
    naive = bench.start_naive("naive", bench.stubs.stub)
    bench.wait_ok(ours, "/readyz")
    session_id = create_session(ours)
    bench.wait_ok(naive, RESULT_PATH.format(session_id=session_id))
    return MainTargets(ours=ours, naive=naive, session_id=session_id)


def measure_result_read(bench: Bench, main: MainTargets, system: str, seconds: int) -> WrkReading:
    sid = main.session_id
    # The same request bytes to every system (the Authorization header included; only ours reads it).
    headers = main.ours.headers()
    url = {
        "ours": main.ours.url + RESULT_PATH.format(session_id=sid),
        "nginx": f"{bench.stubs.nginx_proxy}/liveness_result/{sid}",
        "naive": main.naive.url + RESULT_PATH.format(session_id=sid),
        "stub_direct": bench.stubs.stub + STUB_RESULT_PATH.format(session_id=sid),
    }[system]
    reading = run_wrk(url, connections=bench.plan.connections, seconds=seconds, headers=headers)
    if system == "naive":
        bench.naive_requests_served += reading.requests
    return reading


def measure_create_session(bench: Bench, main: MainTargets, system: str, seconds: int) -> WrkReading:
    url = {
        "ours": main.ours.url + SESSIONS_PATH,
        "nginx": f"{bench.stubs.nginx_proxy}/liveness_session",
        "naive": main.naive.url + SESSIONS_PATH,
    }[system]
    reading = run_wrk(
        url,
        connections=bench.plan.connections,
        seconds=seconds,
        headers=main.ours.headers(),
        script=BENCH_DIR / "post_session.lua",
    )
    if system == "naive":
        bench.naive_requests_served += reading.requests
    return reading
