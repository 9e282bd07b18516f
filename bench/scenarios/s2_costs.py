"""What request integrity (issue 17) costs a create, measured next to S2 in one run:

- S2i, idempotency: S2's create with an `Idempotency-Key` new on every request
  (bench/post_session_idempotent.lua) against S2's plain create, on the same process (the main
  proxy). Every keyed create claims its key in one transaction before the Cynopsis call and stores
  the answer in another after it; none is a replay.
- S2b, token binding: the pair a caller actually sends, POST /v1/liveness/session-token then a
  create with the token it got (bench/session_pair.lua, ~2 KiB create body as in S2), on two of our
  proxies started side by side on their own SQLite databases, binding on (as shipped: the token is
  remembered for the caller when handed out, and taken, once, by the create) and binding off. The
  stub hands out a new token on every call (`st-$request_id`, bench/stub-nginx.conf): with a fixed
  one, bound tokens would collide (remembered once, taken once).

S2, S2i and S2b run in one set of interleaved repetitions (whichever of them were chosen), so that
drift on a shared machine hits each alike; only the ratios within the run mean anything. No targets:
the figures are ratios and the time each costs per create (or pair) at saturation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from common import BENCH_DIR, SESSION_TOKEN_PATH, SESSIONS_PATH, progress
from processes import cpu_seconds
from proxies import PLAIN_CREATE_SETTINGS, Bench, Proxy, issue_api_key, sample_failure
from stats import Outcome, Row, fmt_rate_and_p99, interleaved, median_of, ratio, spread, summarize_all
from wrk import WrkReading, run_wrk

from .main_proxies import MainTargets
from .s2_create_session import SAMPLE_POST_BODY, s2_measurements, s2_outcome

S2_FAMILY = ("S2", "S2i", "S2b")
IDEMPOTENT = "ours_idempotent"
# S2b's two proxies: binding off and on; otherwise the same settings (S2's, for its body).
PAIRS = {
    "pair_unbound": {**PLAIN_CREATE_SETTINGS},
    "pair_bound": {**PLAIN_CREATE_SETTINGS, "LIVENESS_PROXY_SESSION_TOKEN_BINDING": "true"},
}


def _time_added_us(slower_rate: float, faster_rate: float) -> float | None:
    """Microseconds more per request (or pair) at saturation: with one worker saturated, 1/rate is
    the time the process spends on each; the difference is what the slower variant adds."""
    if slower_rate <= 0 or faster_rate <= 0:
        return None
    return round(1e6 / slower_rate - 1e6 / faster_rate, 1)


class ProxyCpu:
    """The CPU time our proxy used during each of its measurements (warm-up first, when there is
    one): CPU per create is the cost itself, less blurred by what else runs on a shared machine
    than a rate, and it tells work apart from waiting (a lock, a sleep)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def around(
        self, name: str, pid: int, measure: Callable[[int], WrkReading]
    ) -> Callable[[int], WrkReading]:
        def measured(seconds: int) -> WrkReading:
            before = cpu_seconds(pid)
            reading = measure(seconds)
            self.seconds.setdefault(name, []).append(cpu_seconds(pid) - before)
            return reading

        return measured

    def attach(self, section: dict[str, Any], name: str, per: str, counts: Sequence[int]) -> None:
        """Per repetition: CPU seconds and microseconds per unit (`per`: create or pair), given the
        units each repetition completed."""
        used = self.seconds.get(name, [])[-len(counts) :] if counts else []
        section["proxy_cpu_seconds"] = [round(value, 3) for value in used]
        section[f"cpu_us_per_{per}"] = spread(
            [value * 1e6 / count if count else 0.0 for value, count in zip(used, counts, strict=True)]
        )


def measure_idempotent_create(bench: Bench, main: MainTargets, seconds: int) -> WrkReading:
    return run_wrk(
        main.ours.url + SESSIONS_PATH,
        connections=bench.plan.connections,
        seconds=seconds,
        headers=main.ours.headers(),
        script=BENCH_DIR / "post_session_idempotent.lua",
        # New keys for every run: a key the caller used before would be a replay.
        script_args=[secrets.token_hex(8)],
    )


def measure_pair(bench: Bench, proxy: Proxy, seconds: int) -> WrkReading:
    return run_wrk(
        proxy.url + SESSION_TOKEN_PATH,  # the script sets each request's path
        connections=bench.plan.connections,
        seconds=seconds,
        headers=proxy.headers(),
        script=BENCH_DIR / "session_pair.lua",
    )


@contextlib.contextmanager
def pair_proxies(bench: Bench) -> Iterator[dict[str, Proxy]]:
    """S2b's two proxies, binding off and on, started together and stopped afterwards."""
    progress("S2b: starting our proxy with session-token binding off and on")
    envs = {
        name: bench.our_env(
            f"S2b {name.replace('_', ' ')}",
            database_url=bench.sqlite_url(f"s2b-{name}"),
            api_base=bench.stubs.stub,
            token_url=f"{bench.stubs.stub}/oauth/token",
            **settings,
        )
        for name, settings in PAIRS.items()
    }
    # Issuing a key also migrates its database: a second or so each, so both at once.
    with concurrent.futures.ThreadPoolExecutor(len(PAIRS)) as pool:
        issued = {name: pool.submit(issue_api_key, envs[name], bench.workdir) for name in PAIRS}
        keys = {name: future.result() for name, future in issued.items()}
    proxies: dict[str, Proxy] = {}
    try:
        for name in PAIRS:
            proxies[name] = bench.start_ours(f"ours-s2b-{name}", envs[name], key=keys[name])
        for proxy in proxies.values():
            bench.wait_ok(proxy, "/readyz")
        yield proxies
    finally:
        for proxy in proxies.values():
            bench.children.stop(proxy.process)


def _sample_pair_failure(proxy: Proxy) -> str:
    """One pair like the benchmark's, for the report when wrk counted non-2xx answers."""
    try:
        with httpx.Client(base_url=proxy.url, headers=proxy.headers(), timeout=10) as client:
            token = client.post(SESSION_TOKEN_PATH, json={})
            if token.status_code != 200:
                return f"session-token HTTP {token.status_code}: {token.text[:500]}"
            body = SAMPLE_POST_BODY.replace(b"st-bench-session-token", token.json()["session_token"].encode())
            created = client.post(SESSIONS_PATH, content=body, headers={"Content-Type": "application/json"})
    except httpx.TransportError as exc:
        return f"transport error {type(exc).__name__}"
    return f"create HTTP {created.status_code}: {created.text[:500]}"


def _pairs_per_second(section: dict[str, Any]) -> None:
    """Pairs per second of each repetition: the creates answered 201 (session_pair.lua counts them)
    over the window; wrk's own request rate counts both requests of a pair."""
    rates = [
        (rep["counted"] or {}).get("created", 0) / rep["seconds"] if rep["seconds"] else 0.0
        for rep in section["reps"]
    ]
    section["pairs_per_second"] = spread(rates)
    if "warmup" in section:
        warmup = section["warmup"]
        section["warmup"]["pairs_per_second"] = (
            (warmup["counted"] or {}).get("created", 0) / warmup["seconds"] if warmup["seconds"] else 0.0
        )


def s2i_outcome(bench: Bench, main: MainTargets, measured: dict[str, Any], cpu: ProxyCpu) -> Outcome:
    measured = {name: measured[name] for name in ("ours", IDEMPOTENT)}
    for name in measured:
        cpu.attach(measured[name], name, "create", [rep["requests"] for rep in measured[name]["reps"]])
    if measured[IDEMPOTENT]["non_2xx"]["max"] > 0:
        measured[IDEMPOTENT]["sample_failure"] = (
            sample_failure(main.ours, "POST", SESSIONS_PATH, SAMPLE_POST_BODY)
            + " (sample sent without an Idempotency-Key)"
        )
    plain, keyed = median_of(measured, "ours"), median_of(measured, IDEMPOTENT)
    p99_plain, p99_keyed = median_of(measured, "ours", "p99_ms"), median_of(measured, IDEMPOTENT, "p99_ms")
    ratios = {
        "idempotent_to_plain_requests_per_second": ratio(keyed, plain),
        "idempotent_to_plain_p99": ratio(p99_keyed, p99_plain),
        "microseconds_added_per_create": _time_added_us(keyed, plain),
        "cpu_microseconds_added_per_create": round(
            median_of(measured, IDEMPOTENT, "cpu_us_per_create")
            - median_of(measured, "ours", "cpu_us_per_create"),
            1,
        ),
    }
    added = ratios["microseconds_added_per_create"]
    rows: list[Row] = [
        (
            "S2i create session with Idempotency-Key vs without",
            fmt_rate_and_p99(measured, IDEMPOTENT),
            f"without {fmt_rate_and_p99(measured, 'ours')}",
            _cost_cell(
                ratios["idempotent_to_plain_requests_per_second"],
                "req/s",
                ratios["idempotent_to_plain_p99"],
                added,
                ratios["cpu_microseconds_added_per_create"],
                "create",
            ),
            "—",
            "—",
        )
    ]
    data = {
        "title": "create session with a new Idempotency-Key per request vs S2's plain create, one process",
        "wrk": {
            "threads": 1,
            "connections": bench.plan.connections,
            "seconds": bench.plan.seconds,
            "script": "bench/post_session_idempotent.lua",
            "plain_script": "bench/post_session.lua",
        },
        "our_proxy": "the main proxy (S2's): binding off, `metadata` an extra body member",
        "measured": measured,
        "ratios": ratios,
        "targets": [],
    }
    return Outcome(data, rows)


def _cost_cell(
    rate_ratio: float | None,
    rate_unit: str,
    p99_ratio: float | None,
    added_us: float | None,
    cpu_added_us: float | None,
    per: str,
) -> str:
    """The ratio cell of a cost row: the rate and p99 against the baseline, and the time and CPU
    that the protection adds per create (or pair); a figure that could not be computed is left out."""
    parts = []
    if rate_ratio is not None:
        parts.append(f"{rate_ratio:.1%} {rate_unit}")
    if p99_ratio is not None:
        parts.append(f"p99 {p99_ratio:.2f}x")
    cell = ", ".join(parts)
    if added_us is not None:
        cell += f"; +{added_us:,.0f} µs per {per}"
    if cpu_added_us is not None:
        cell += f" (CPU +{cpu_added_us:,.0f} µs)"
    return cell


def _fmt_pairs(measured: dict[str, Any], name: str) -> str:
    pairs = measured[name]["pairs_per_second"]
    return (
        f"{pairs['median']:,.0f} pairs/s ({pairs['min']:,.0f}-{pairs['max']:,.0f}), "
        f"p99 {median_of(measured, name, 'p99_ms'):.1f} ms"
    )


def s2b_outcome(bench: Bench, proxies: dict[str, Proxy], measured: dict[str, Any], cpu: ProxyCpu) -> Outcome:
    measured = {name: measured[name] for name in PAIRS}
    for name, proxy in proxies.items():
        _pairs_per_second(measured[name])
        created = [(rep["counted"] or {}).get("created", 0) for rep in measured[name]["reps"]]
        cpu.attach(measured[name], name, "pair", created)
        if measured[name]["non_2xx"]["max"] > 0:
            measured[name]["sample_failure"] = _sample_pair_failure(proxy)
    bound = median_of(measured, "pair_bound", "pairs_per_second")
    unbound = median_of(measured, "pair_unbound", "pairs_per_second")
    ratios = {
        "bound_to_unbound_pairs_per_second": ratio(bound, unbound),
        "bound_to_unbound_p99": ratio(
            median_of(measured, "pair_bound", "p99_ms"), median_of(measured, "pair_unbound", "p99_ms")
        ),
        "microseconds_added_per_pair": _time_added_us(bound, unbound),
        "cpu_microseconds_added_per_pair": round(
            median_of(measured, "pair_bound", "cpu_us_per_pair")
            - median_of(measured, "pair_unbound", "cpu_us_per_pair"),
            1,
        ),
    }
    added = ratios["microseconds_added_per_pair"]
    rows: list[Row] = [
        (
            "S2b session token + create, binding on vs off",
            _fmt_pairs(measured, "pair_bound"),
            f"off {_fmt_pairs(measured, 'pair_unbound')}",
            _cost_cell(
                ratios["bound_to_unbound_pairs_per_second"],
                "pairs/s",
                ratios["bound_to_unbound_p99"],
                added,
                ratios["cpu_microseconds_added_per_pair"],
                "pair",
            ),
            "—",
            "—",
        )
    ]
    data = {
        "title": "session token then create (the bound flow), token binding on vs off, two processes",
        "wrk": {
            "threads": 1,
            "connections": bench.plan.connections,
            "seconds": bench.plan.seconds,
            "script": "bench/session_pair.lua",
        },
        "note": (
            "a pair is a session-token request and a create with its token; pairs_per_second counts "
            "the creates answered 201; requests_per_second and the latencies are wrk's, over both requests"
        ),
        "measured": measured,
        "ratios": ratios,
        "targets": [],
    }
    return Outcome(data, rows)


def scenario_s2_family(
    bench: Bench, main: MainTargets | None, s1: Outcome | None, chosen: Sequence[str]
) -> dict[str, Outcome]:
    """S2, S2i and S2b, those of them in `chosen`, in one set of interleaved repetitions."""
    wanted = [name for name in S2_FAMILY if name in chosen]
    progress(
        f"{'/'.join(wanted)} create session (POST ~2 KiB): wrk -t1 -c{bench.plan.connections} "
        f"-d{bench.plan.seconds}s"
    )
    cpu = ProxyCpu()
    with contextlib.ExitStack() as stack:
        measurements: dict[str, Callable[[int], WrkReading]] = {}
        if main is not None and {"S2", "S2i"} & set(wanted):
            plain = s2_measurements(bench, main)
            if "S2" not in wanted:  # S2i alone: its baseline only
                plain = {"ours": plain["ours"]}
            plain["ours"] = cpu.around("ours", main.ours.process.pid, plain["ours"])
            measurements |= plain
        if main is not None and "S2i" in wanted:
            measurements[IDEMPOTENT] = cpu.around(
                IDEMPOTENT, main.ours.process.pid, functools.partial(measure_idempotent_create, bench, main)
            )
        proxies: dict[str, Proxy] = {}
        if "S2b" in wanted:
            proxies = stack.enter_context(pair_proxies(bench))
            for name, proxy in proxies.items():
                measurements[name] = cpu.around(
                    name, proxy.process.pid, functools.partial(measure_pair, bench, proxy)
                )
        readings, warmups = interleaved(bench.plan, bench.plan.seconds, measurements)
        measured = summarize_all(readings, warmups)
        # Inside: a failure's sample request needs the proxies still running.
        outcomes: dict[str, Outcome] = {}
        if main is not None and "S2" in wanted:
            outcomes["S2"] = s2_outcome(bench, main, measured, s1)
        if main is not None and "S2i" in wanted:
            outcomes["S2i"] = s2i_outcome(bench, main, measured, cpu)
        if "S2b" in wanted:
            outcomes["S2b"] = s2b_outcome(bench, proxies, measured, cpu)
    return outcomes
