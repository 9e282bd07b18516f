"""The main proxies for S0-S2: ours and the naive one in front of the static stub, started once per
run and shared by S0, S1, S1-final, S1-herd, S2, S5 (the naive proxy's RSS, for context) and the
py-spy runs; and the pools of sessions of our caller they read (bench/result_paths.py), each created
once, when a scenario first needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common import BENCH_DIR, RESULT_PATH, SESSIONS_PATH, STUB_RESULT_PATH, progress
from proxies import PLAIN_CREATE_SETTINGS, Bench, Proxy
from result_paths import HERD, PENDING, ROTATION_SCRIPT, SessionPool, bind_pool, our_rotation_args, read_each
from wrk import WrkReading, run_wrk


@dataclass(slots=True)
class MainTargets:
    """Our proxy and the naive one in front of the static stub, and pools of sessions of our caller."""

    ours: Proxy
    naive: Proxy
    # Our proxy's database, where the pools are bound.
    database_url: str
    pools: dict[str, SessionPool] = field(default_factory=dict)

    def pool(self, bench: Bench, kind: str) -> SessionPool:
        """The pool of `kind`, bound on first use and, but for the herd (one session, read only by
        S1-herd), read once (result_paths.read_each)."""
        if kind not in self.pools:
            if kind == HERD:
                self.pools[kind] = bind_pool(self.database_url, bench.pepper, kind, 1)
            else:
                pool = bind_pool(self.database_url, bench.pepper, kind, bench.plan.rotation_sessions)
                read_each(self.ours, pool, bench.plan.connections)
                self.pools[kind] = pool
        return self.pools[kind]


def start_main_targets(bench: Bench) -> MainTargets:
    progress("starting our proxy and the naive proxy in front of the static stub")
    database_url = bench.sqlite_url("main")
    env = bench.our_env(
        "main",
        database_url=database_url,
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
        **PLAIN_CREATE_SETTINGS,
    )
    ours = bench.start_ours("ours", env)
    naive = bench.start_naive("naive", bench.stubs.stub)
    bench.wait_ok(ours, "/readyz")
    # The naive proxy checks no ownership: any session the stub knows will do.
    bench.wait_ok(naive, RESULT_PATH.format(session_id=f"{PENDING}-0"))
    return MainTargets(ours=ours, naive=naive, database_url=database_url)


def rotation_target(bench: Bench, main: MainTargets, system: str, pool: SessionPool) -> tuple[str, list[str]]:
    """wrk's URL (the server) and result_rotation.lua's arguments for `system`: the same sessions,
    in the same order, in each system's URL shape."""
    stub_before, stub_after = STUB_RESULT_PATH.split("{session_id}")
    if system == "ours":
        return main.ours.url + "/", our_rotation_args(pool)
    if system == "naive":
        return main.naive.url + "/", our_rotation_args(pool)
    if system == "nginx":
        return bench.stubs.nginx_proxy + "/", pool.rotation_args("/liveness_result/", "")
    return bench.stubs.stub + "/", pool.rotation_args(stub_before, stub_after)  # stub_direct


def measure_rotation(
    bench: Bench, main: MainTargets, kind: str, system: str, seconds: int, *, connections: int | None = None
) -> WrkReading:
    """GET of the results of the `kind` pool, in rotation, through `system` (ours, nginx, naive or
    stub_direct); the same request bytes to every system (Authorization included: only ours reads it)."""
    url, script_args = rotation_target(bench, main, system, main.pool(bench, kind))
    reading = run_wrk(
        url,
        connections=connections or bench.plan.connections,
        seconds=seconds,
        headers=main.ours.headers(),
        script=ROTATION_SCRIPT,
        script_args=script_args,
    )
    if system == "naive":
        bench.naive_requests_served += reading.requests
    return reading


def measure_result_read(bench: Bench, main: MainTargets, system: str, seconds: int) -> WrkReading:
    """S1's read: pending sessions in rotation, the uncached path."""
    return measure_rotation(bench, main, PENDING, system, seconds)


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
