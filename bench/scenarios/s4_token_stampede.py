"""S4 token stampede: a burst of concurrent result reads just past the upstream token's refresh point,
counting the token requests it causes; one process on SQLite, and a fleet on PostgreSQL + Redis.

The fleet variant imports tests/services.py (only its public names): the tests' helpers that check
the scratch PostgreSQL and Redis servers are reachable and that create, and afterwards remove, a
scratch database and Redis key prefix. The benchmark uses that one implementation rather than a copy
of it, so both find the servers the same way (LIVENESS_PROXY_TEST_POSTGRES_URL /
LIVENESS_PROXY_TEST_REDIS_URL) and clean up after themselves the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import aiohttp
from common import REPO_DIR, RESULT_PATH, BenchError, progress
from plan import effective_refresh_margin
from proxies import Bench, create_session, issue_api_key
from stats import Outcome, fmt_met, goal, spread
from stubs import token_request_times


def _test_services() -> None:
    """Makes tests/services.py importable: the fleet variant uses the same scratch PostgreSQL
    database and Redis key prefix the tests use, from the one implementation that creates and
    removes them."""
    tests_dir = str(REPO_DIR / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)


def shared_backend_problem() -> str | None:
    """Why PostgreSQL or Redis cannot be used for the fleet variant, or None."""
    _test_services()
    # `mypy bench` alone does not see tests/ (`make typecheck` does: pyproject's mypy files list it).
    import services  # type: ignore[import-not-found, unused-ignore]

    if (problem := services.postgres_problem()) is not None:
        return f"PostgreSQL at {services.POSTGRES_ADMIN_URL}: {problem}"
    if (problem := services.redis_problem()) is not None:
        return f"Redis at {services.REDIS_URL}: {problem}"
    return None


@contextlib.contextmanager
def scratch_shared_backend() -> Iterator[dict[str, str]]:
    """A new PostgreSQL database and Redis key prefix, removed afterwards whatever happened (call
    shared_backend_problem() first: this assumes both servers are reachable)."""
    _test_services()
    import services  # type: ignore[import-not-found, unused-ignore]

    with services.shared_backend() as settings:
        yield settings


async def _burst(urls: Sequence[str], headers: Mapping[str, str], count: int) -> dict[str, int]:
    """`count` result reads at once (one connection each), spread round-robin over `urls`. aiohttp,
    not httpx: httpx's pool takes seconds to hand out 500 fresh connections, which would spread
    the burst over time instead of landing it at once."""
    outcomes: collections.Counter[str] = collections.Counter()
    connector = aiohttp.TCPConnector(limit=count, limit_per_host=count)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=dict(headers)) as client:

        async def one(url: str) -> None:
            try:
                async with client.get(url) as answer:
                    await answer.read()
                    outcomes[str(answer.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one(urls[index % len(urls)]) for index in range(count)))
    return dict(outcomes)


def token_burst(bench: Bench, label: str, env: Mapping[str, str], replicas: int) -> dict[str, Any]:
    """Starts `replicas` processes on one database, waits for their first token, sleeps to just
    past the refresh point, fires the burst, and counts the token requests it caused."""
    plan = bench.plan
    key = issue_api_key(env, bench.workdir)  # also migrates, so the replicas never race on it
    initially = len(token_request_times(bench.stubs.token_log))
    proxies = [bench.start_ours(f"ours-{label}", env, key=key) for _ in range(replicas)]
    try:
        # All listening first, then each one's readiness in a row: every replica asks for (or
        # adopts) its first token within moments, so they share one refresh point.
        for proxy in proxies:
            bench.wait_ok(proxy, "/healthz")
        for proxy in proxies:
            bench.wait_ok(proxy, "/readyz")
        session_id = create_session(proxies[0])
        before = token_request_times(bench.stubs.token_log)
        if not before:
            raise BenchError(f"S4 {label}: the token stub saw no token request")
        margin = effective_refresh_margin(plan.token_margin_seconds, plan.token_lifetime_seconds)
        # From the last token request (nginx logs it when answered, a moment after our proxy
        # started its clock): a quarter second past the refresh point, well before expiry.
        refresh_at = before[-1] + plan.token_lifetime_seconds - margin
        fire_at = refresh_at + 0.25
        late = time.time() > fire_at
        time.sleep(max(0.0, fire_at - time.time()))
        progress(f"  {label}: {plan.burst_requests} concurrent result reads at the refresh point")
        urls = [proxy.url + RESULT_PATH.format(session_id=session_id) for proxy in proxies]
        headers = proxies[0].headers()
        fired_at = time.time()
        started = time.perf_counter()
        outcomes = asyncio.run(_burst(urls, headers, plan.burst_requests))
        burst_seconds = time.perf_counter() - started
        # The refresh runs in the background; a fleet's other replicas look again 1 s later
        # (SharedTokenPolicy.recheck_seconds) and must adopt the new token, not fetch their own.
        time.sleep(1.5)
        after = token_request_times(bench.stubs.token_log)
    finally:
        for proxy in proxies:
            bench.children.stop(proxy.process)
    caused = len(after) - len(before)
    progress(f"  {label}: {caused} token request(s) during the burst; answers {outcomes}")
    return {
        "replicas": replicas,
        # A fleet's replicas share their first token too: 1 expected here as well.
        "token_requests_at_start_up": len(before) - initially,
        "token_requests_in_burst": caused,
        "answers": outcomes,
        "burst_seconds": round(burst_seconds, 3),
        "fired_after_refresh_point_seconds": round(fired_at - refresh_at, 3),
        # Start-up and session creation outlasted the refresh point: the token was already due.
        "fired_late": late,
    }


def scenario_s4(bench: Bench) -> Outcome:
    plan = bench.plan
    margin = effective_refresh_margin(plan.token_margin_seconds, plan.token_lifetime_seconds)
    progress(
        f"S4 token stampede: {plan.token_lifetime_seconds} s tokens, refresh {margin:.0f} s before "
        f"expiry, {plan.burst_requests} requests at once"
    )
    token_settings = {"CYNOPSIS_TOKEN_REFRESH_MARGIN_SECONDS": str(plan.token_margin_seconds)}
    token_url = f"{bench.stubs.token_stub}/oauth/token"
    fleet_problem: str | None = None
    if plan.fleet == "skip":
        fleet_problem = "skipped (--fleet skip)"
    else:
        fleet_problem = shared_backend_problem()
        if fleet_problem is not None and plan.fleet == "require":
            raise BenchError(f"S4 fleet needs PostgreSQL and Redis (--fleet require): {fleet_problem}")
    per_process: list[dict[str, Any]] = []
    fleet: list[dict[str, Any]] = []
    for rep in range(plan.reps):
        progress(f"  rep {rep + 1}/{plan.reps}")
        env = bench.our_env(
            "S4 per-process",
            database_url=bench.sqlite_url(f"s4-process-{rep}"),
            api_base=bench.stubs.stub,
            token_url=token_url,
            **token_settings,
        )
        per_process.append(token_burst(bench, "per-process", env, replicas=1))
        if fleet_problem is None:
            with scratch_shared_backend() as shared:
                env = bench.our_env(
                    "S4 fleet",
                    database_url=shared["LIVENESS_PROXY_DATABASE_URL"],
                    api_base=bench.stubs.stub,
                    token_url=token_url,
                    **token_settings,
                    LIVENESS_PROXY_REDIS_URL=shared["LIVENESS_PROXY_REDIS_URL"],
                    LIVENESS_PROXY_REDIS_KEY_PREFIX=shared["LIVENESS_PROXY_REDIS_KEY_PREFIX"],
                )
                fleet.append(token_burst(bench, "fleet", env, replicas=plan.fleet_size))

    def section(reps: list[dict[str, Any]]) -> dict[str, Any]:
        return {"reps": reps, "token_requests_in_burst": spread([r["token_requests_in_burst"] for r in reps])}

    measured: dict[str, Any] = {"per_process": section(per_process)}
    measured["fleet"] = section(fleet) if fleet else {"skipped": fleet_problem}
    worst_process = float(measured["per_process"]["token_requests_in_burst"]["max"])
    ratios: dict[str, float | None] = {"per_process_count_to_expected": worst_process / 1}
    targets = [
        goal("per-process token requests in burst (worst rep)", worst_process, "== 1", worst_process == 1)
    ]
    rows = [
        (
            "S4 token stampede, one process",
            f"{worst_process:.0f} token request(s) (worst of {plan.reps})",
            "expected 1",
            f"{worst_process / 1:.0f}x expected",
            "exactly 1",
            fmt_met(targets[0]["met"]),
        )
    ]
    if fleet:
        worst_fleet = float(measured["fleet"]["token_requests_in_burst"]["max"])
        ratios["fleet_count_to_expected"] = worst_fleet / 1
        targets.append(
            goal("fleet token requests in burst (worst rep)", worst_fleet, "== 1", worst_fleet == 1)
        )
        fleet_row = (
            f"S4 token stampede, fleet of {plan.fleet_size}",
            f"{worst_fleet:.0f} token request(s) (worst of {plan.reps})",
            "expected 1",
            f"{worst_fleet / 1:.0f}x expected",
            "exactly 1",
            fmt_met(targets[1]["met"]),
        )
    else:
        ratios["fleet_count_to_expected"] = None
        fleet_row = (
            f"S4 token stampede, fleet of {plan.fleet_size}",
            "not run",
            str(fleet_problem),
            "—",
            "exactly 1",
            "—",
        )
    rows.append(fleet_row)
    data = {
        "title": "token stampede at the refresh point: one process (SQLite), a fleet (PostgreSQL + Redis)",
        "token_lifetime_seconds": plan.token_lifetime_seconds,
        "refresh_margin_setting_seconds": plan.token_margin_seconds,
        "refresh_margin_effective_seconds": margin,
        "burst_requests": plan.burst_requests,
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
