"""A bounded soak: `serve` under steady load for a minute while the upstream misbehaves at random.

The real command runs as a subprocess (one worker, so its RSS is the proxy's) in front of the
sandbox, which serves from this process; every second a fault drawn from a seeded, shuffled menu is
injected through the sandbox's control API: latency, 500/503, 429, hangs shorter and longer than the
proxy's upstream timeout, malformed JSON, HTML, oversized bodies, a burst of 503s long enough to
open the circuit breaker, failures of the token endpoint (with the access tokens revoked, so that
the proxy has to go there), and plain revocations.

Afterwards: no 500, and every other failure one that an injected fault explains, as problem+json;
no acknowledged answer without its audit record, no 201 without its ownership row, an audit chain
that `audit verify` accepts; the proxy's RSS after the warm-up grown by less than a generous bound;
no secret in its logs; and, the faults cleared, normal answers again.

LIVENESS_PROXY_SOAK_SECONDS sets the length (default 60); LIVENESS_PROXY_SOAK_SEED replays a fault
schedule (every failure message names the seed).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.test_audit_crash import SESSION_TOKEN, SESSIONS
from e2e.test_cli import COMMAND, _wait_ready, free_port, run
from e2e.test_crash_durability import UNLIMITED, by_request_id, read_store
from liveness_proxy.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from support import (
    LogScan,
    ServerThread,
    find_leaks,
    issue_keys,
    proxy_settings,
    subprocess_env,
    upstream_sandbox,
)

# a minute of load by design
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

SOAK_SECONDS = float(os.environ.get("LIVENESS_PROXY_SOAK_SECONDS", "60"))
SEED_VARIABLE = "LIVENESS_PROXY_SOAK_SEED"
CLIENT_THREADS = 8
FAULT_INTERVAL_SECONDS = 1.0
ERROR_PAUSE_SECONDS = 0.05
# RSS is compared between the end of the warm-up (caches, pools and allocator arenas filled) and
# the end of the load. Over the default minute (about 10,000 requests) the bound catches a leak of
# some 3 KiB per request; a longer LIVENESS_PROXY_SOAK_SECONDS catches smaller ones.
WARM_UP_SECONDS = min(10.0, SOAK_SECONDS / 4)
RSS_GROWTH_LIMIT_BYTES = 30 * 1024 * 1024
UPSTREAM_TIMEOUT_SECONDS = 1.0
# Well above any real answer (a result with its images is about 1 KiB). The proxy reads an oversized
# body up to this limit before it gives up: at the default 4 MiB, the buffers of a few at once move
# the RSS by tens of MiB in steps the allocator keeps, which would hide a slow leak in the noise.
MAX_RESPONSE_BYTES = 256 * 1024
# What a fault may turn a request into: the problem types of an upstream that failed or refused us.
# Never 500 (a bug), nor a store problem (nothing is done to the database here), nor one of ours
# like 404 or a rate limit (the limits are off).
EXPLAINED_BY_FAULTS = {
    "upstream-unavailable": 502,
    "upstream-malformed": 502,
    "upstream-timeout": 504,
    "upstream-token-unavailable": 503,
    "upstream-circuit-open": 503,
    "upstream-rate-limited": 429,
}
SUCCESS = {"session-token": 200, "create-session": 201, "result": 200, "earlier-result": 200}
LIVENESS_TARGETS = ("session_token", "liveness_session", "liveness_result", "any")


@dataclass
class Answer:
    step: str
    request_id: str
    status: int
    problem: str | None  # the problem type's suffix, for an error


@dataclass
class Soak:
    """Everything the clients saw. Lists only: append is atomic across threads."""

    seed: int
    answers: list[Answer] = field(default_factory=list)
    created: list[tuple[str, str, str]] = field(default_factory=list)  # session id, subject, request id
    malformed: list[str] = field(default_factory=list)  # answers not shaped as documented
    transport_errors: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # exceptions that ended a thread of the test
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the load, bytes)

    def replay(self) -> str:
        return f"(replay the fault schedule with {SEED_VARIABLE}={self.seed})"


def noting_errors(soak: Soak, target: Callable[..., None]) -> Callable[..., None]:
    """`target`, for a thread: an exception that would end the thread unseen is kept for the test."""

    def run_target(*args: Any) -> None:
        try:
            target(*args)
        except Exception:
            soak.crashed.append(f"{target.__name__}: {traceback.format_exc()}")

    return run_target


def fault_menu(choose: random.Random) -> list[tuple[str, list[dict[str, Any]]]]:
    """One of each kind of trouble, with its details drawn from `choose`: (name, faults to inject).
    A name that starts with "revoke" also revokes the access tokens after injecting."""
    target = choose.choice

    def fault(kind: str, **details: Any) -> dict[str, Any]:
        return {"target": target(LIVENESS_TARGETS), "kind": kind, "count": choose.randint(1, 3), **details}

    return [
        ("latency", [fault("latency", delay_seconds=round(choose.uniform(0.05, 0.5), 3))]),
        ("status", [fault("status", status=target([500, 503]))]),
        ("rate_limit", [fault("rate_limit", retry_after_seconds=1)]),
        # CYNOPSIS_CIRCUIT_FAILURE_THRESHOLD (5) failures in a row open the circuit (successes of
        # other calls in between may reset the count), later ones fail its probes. On the first call
        # of every flow, and not on "any": the token endpoint would take some too.
        ("burst of 503s", [{"target": "session_token", "kind": "status", "status": 503, "count": 8}]),
        # The sandbox gives up first and answers 504 itself, or the proxy's timeout does.
        ("short hang", [fault("timeout", hang_seconds=UPSTREAM_TIMEOUT_SECONDS / 2)]),
        ("long hang", [fault("timeout", hang_seconds=UPSTREAM_TIMEOUT_SECONDS * 3)]),
        ("malformed", [fault("malformed")]),
        ("wrong_content_type", [fault("wrong_content_type")]),
        ("oversized", [fault("oversized", size_bytes=2 * MAX_RESPONSE_BYTES)]),
        (
            "revoke, token endpoint fails",
            [
                {
                    "target": "token",
                    "kind": target(["status", "timeout", "malformed", "wrong_content_type"]),
                    "hang_seconds": UPSTREAM_TIMEOUT_SECONDS * 2,
                }
            ],
        ),
        ("revoke", []),
    ]


def inject_faults(sandbox_url: str, soak: Soak, stop: threading.Event) -> None:
    """Every FAULT_INTERVAL_SECONDS the next entry of a shuffled menu, reshuffled when used up, so
    every kind is injected within the first len(menu) seconds."""
    choose = random.Random(soak.seed)
    with httpx.Client(base_url=f"{sandbox_url}/_sandbox", timeout=10) as control:
        while not stop.is_set():
            menu = fault_menu(choose)
            choose.shuffle(menu)
            for name, faults in menu:
                for body in faults:
                    assert control.post("/faults", json=body).status_code == 201, body
                if name.startswith("revoke"):
                    assert control.post("/tokens/revoke").status_code == 200
                soak.faults.append(f"{name}: {faults}")
                if stop.wait(FAULT_INTERVAL_SECONDS):
                    return


def check_shape(soak: Soak, step: str, request_id: str, response: httpx.Response) -> bool:
    """Notes the answer, and whether it is shaped as documented: the success as a JSON object, or
    problem+json naming the request; True for the success."""
    content_type = response.headers.get("content-type", "")
    try:
        body = response.json()
    except ValueError:
        body = None
    problem = None
    if response.status_code == SUCCESS[step]:
        if content_type != "application/json" or not isinstance(body, dict):
            soak.malformed.append(f"{step} {request_id}: {response.status_code} {content_type}")
            problem = "not-json"
        elif "iVBORw0KGg" in response.text:
            soak.malformed.append(f"{step} {request_id}: a face image reached the caller")
    else:
        if content_type != PROBLEM_CONTENT_TYPE or not isinstance(body, dict):
            body = {}
        problem = str(body.get("type", "")).removeprefix(PROBLEM_TYPE_PREFIX)
        if body.get("status") != response.status_code or body.get("request_id") != request_id:
            soak.malformed.append(f"{step} {request_id}: {response.status_code} {content_type} {body}")
    if response.headers.get("x-request-id") != request_id:
        soak.malformed.append(f"{step} {request_id}: answered as {response.headers.get('x-request-id')}")
    soak.answers.append(Answer(step, request_id, response.status_code, problem))
    return problem is None


def client_thread(
    url: str, sandbox_url: str, subject: str, key: str, number: int, soak: Soak, stop: threading.Event
) -> None:
    """Session token, session, its result (completed by the sandbox every other time, so redaction
    runs too), and now and then the result of an earlier session, until told to stop."""
    choose = random.Random(f"{soak.seed}-{number}")
    mine: list[str] = []
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client,
        httpx.Client(base_url=f"{sandbox_url}/_sandbox", timeout=10) as control,
    ):

        def send(
            step: str, request_id: str, method: str, path: str, body: Any = None
        ) -> httpx.Response | None:
            """The response when it is the documented success; None (noted in `soak`) otherwise."""
            try:
                response = client.request(method, path, headers={"X-Request-ID": request_id}, json=body)
            except httpx.TransportError as exc:
                soak.transport_errors.append(f"{step} {request_id}: {type(exc).__name__}")
                return None
            if check_shape(soak, step, request_id, response):
                return response
            # A client backs off a little after a failure, as any would: without it, instant 503s
            # (an open circuit, the token backoff) would turn the load into a loop of refusals.
            time.sleep(ERROR_PAUSE_SECONDS)
            return None

        for round_number in itertools.count():
            if stop.is_set():
                return
            prefix = f"t{number}-{round_number}"
            token = send("session-token", f"{prefix}-token", "POST", SESSION_TOKEN)
            if token is None:
                continue
            create_id = f"{prefix}-create"
            body = {"session_token": token.json()["session_token"]}
            created = send("create-session", create_id, "POST", SESSIONS, body)
            if created is None:
                continue
            session_id = created.json()["session_id"]
            soak.created.append((session_id, subject, create_id))
            mine.append(session_id)
            if round_number % 2:
                outcome = choose.choice(["live", "spoof"])
                completed = control.post(f"/sessions/{session_id}/complete", json={"outcome": outcome})
                assert completed.status_code == 200
            send("result", f"{prefix}-result", "GET", f"{SESSIONS}/{session_id}/result")
            if round_number % 3 == 2:
                send("earlier-result", f"{prefix}-earlier", "GET", f"{SESSIONS}/{choose.choice(mine)}/result")


def resident_bytes(pid: int) -> int:
    """VmRSS of `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def sample_rss(pid: int, soak: Soak, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(1.0):
        soak.rss.append((time.monotonic() - started, resident_bytes(pid)))


def flow_succeeds(url: str, key: str, attempt: int) -> bool:
    """One whole flow, answered as normal: session token, session, result."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=10) as client:
        token = client.post(SESSION_TOKEN, headers={"X-Request-ID": f"after-{attempt}-token"})
        if token.status_code != 200:
            return False
        created = client.post(
            SESSIONS,
            headers={"X-Request-ID": f"after-{attempt}-create"},
            json={"session_token": token.json()["session_token"]},
        )
        if created.status_code != 201:
            return False
        session_id = created.json()["session_id"]
        result = client.get(
            f"{SESSIONS}/{session_id}/result", headers={"X-Request-ID": f"after-{attempt}-result"}
        )
        return result.status_code == 200 and result.json()["session_id"] == session_id


@pytest.fixture
def sandbox_url() -> Iterator[str]:
    server = ServerThread(upstream_sandbox().app, lifespan="off").start()
    yield server.url
    server.stop()


def start_serve_logging_to(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """`serve` with one worker, its output in `log_path`: a file, not a pipe, since nobody reads a
    pipe during the run and a full one would block the proxy. Its own session, so that it can be
    stopped whole."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [COMMAND, "serve", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        raise
    return process, url


def run_load(url: str, sandbox_url: str, callers: list[tuple[str, str]], soak: Soak, pid: int) -> int:
    """CLIENT_THREADS clients and the fault injector for SOAK_SECONDS, the RSS of `pid` sampled
    every second; returns the RSS at the end of the load."""
    stop_load, stop_sampling = threading.Event(), threading.Event()
    threads = [
        threading.Thread(
            target=noting_errors(soak, client_thread),
            args=(url, sandbox_url, *callers[number % len(callers)], number, soak, stop_load),
            daemon=True,
        )
        for number in range(CLIENT_THREADS)
    ]
    threads.append(
        threading.Thread(
            target=noting_errors(soak, inject_faults), args=(sandbox_url, soak, stop_load), daemon=True
        )
    )
    sampler = threading.Thread(target=sample_rss, args=(pid, soak, stop_sampling), daemon=True)
    for thread in [*threads, sampler]:
        thread.start()
    try:
        time.sleep(SOAK_SECONDS)
    finally:
        stop_load.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a thread of the test hung"
        stop_sampling.set()
        sampler.join(timeout=5)
    return resident_bytes(pid)


def assert_recovers(url: str, sandbox_url: str, key: str, soak: Soak) -> None:
    """Faults cleared, the open circuit and the token backoff (1 s each here) close by themselves:
    within a few seconds flows succeed again, and then every one does."""
    assert httpx.delete(f"{sandbox_url}/_sandbox/faults").status_code == 204
    deadline = time.monotonic() + 15
    attempt = 0
    while not flow_succeeds(url, key, attempt):
        assert time.monotonic() < deadline, f"the proxy did not recover from the faults {soak.replay()}"
        attempt += 1
        time.sleep(0.2)
    for extra in range(5):
        assert flow_succeeds(url, key, 1000 + extra), f"not normal after recovery {soak.replay()}"


def summarize(soak: Soak, rss_warm: int, rss_end: int) -> str:
    statuses = collections.Counter((answer.step, answer.status, answer.problem) for answer in soak.answers)
    return (
        f"seed {soak.seed}: {len(soak.answers)} answers in {SOAK_SECONDS:.0f} s, {len(soak.created)} "
        f"sessions, {len(soak.faults)} faults; RSS {rss_warm / 2**20:.1f} MiB after the warm-up, "
        f"{rss_end / 2**20:.1f} MiB at the end (every 5 s: "
        f"{' '.join(f'{rss / 2**20:.0f}' for _, rss in soak.rss[4::5])}); "
        + ", ".join(
            f"{step} {status} {problem or ''}".rstrip() + f": {count}"
            for (step, status, problem), count in sorted(statuses.items(), key=str)
        )
    )


def assert_every_failure_explained(soak: Soak, summary: str) -> None:
    replay = soak.replay()
    assert not soak.crashed, soak.crashed
    assert not soak.transport_errors, f"{soak.transport_errors[:5]} {replay}"
    assert not soak.malformed, f"{soak.malformed[:5]} {replay}"
    unexplained = {
        (answer.status, answer.problem)
        for answer in soak.answers
        if answer.status != SUCCESS[answer.step]
        and EXPLAINED_BY_FAULTS.get(answer.problem or "") != answer.status
    }
    assert not unexplained, f"answers no injected fault explains: {unexplained} {replay}\n{summary}"
    # Not vacuous: the load went on throughout, faults were injected every second, and once every
    # kind was, each main way of failing had been taken.
    assert len(soak.created) >= SOAK_SECONDS, summary
    assert len(soak.faults) >= SOAK_SECONDS / FAULT_INTERVAL_SECONDS / 2, summary
    if len(soak.faults) >= len(fault_menu(random.Random())):
        seen = {answer.problem for answer in soak.answers}
        assert {"upstream-unavailable", "upstream-malformed", "upstream-timeout"} <= seen, summary


def assert_nothing_lost(env: dict[str, str], database: Path, soak: Soak) -> None:
    """Every answer has its audit record (with the same status and problem), every 201 its ownership
    row, and the chain verifies, through the commands operators use."""
    replay = soak.replay()
    with ThreadPoolExecutor(max_workers=2) as pool:  # two CLI start-ups at once: both only read
        exporting = pool.submit(run, env, "audit", "export")
        verifying = pool.submit(run, env, "audit", "verify")
        owners, _, _ = read_store(f"sqlite:///{database}")
        exported, verified = exporting.result(), verifying.result()
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    audited = by_request_id(records)
    unaudited = [answer.request_id for answer in soak.answers if answer.request_id not in audited]
    assert not unaudited, f"{len(unaudited)} answers have no audit record, e.g. {unaudited[:5]} {replay}"
    disagreeing = [
        (answer, audited[answer.request_id])
        for answer in soak.answers
        if (audited[answer.request_id]["status"], audited[answer.request_id]["problem"])
        != (answer.status, answer.problem)
    ]
    assert not disagreeing, f"audit records that differ from the answer: {disagreeing[:3]}"
    unbound = [
        session_id
        for session_id, subject, request_id in soak.created
        if owners.get(session_id) != (subject, request_id)
    ]
    assert not unbound, f"{len(unbound)} created sessions have no ownership row, e.g. {unbound[:3]} {replay}"
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"audit chain OK: {len(records)} records verified" in verified.stdout, verified.stdout


def assert_clean_logs(logs: str, soak: Soak) -> None:
    """No secret, token, key or image in the proxy's log, a line for every request, no crash."""
    assert not find_leaks(logs), find_leaks(logs)[:5]
    events = collections.Counter(
        json.loads(line).get("event") for line in logs.splitlines() if line.startswith("{")
    )
    assert events["request"] >= len(soak.answers), events
    assert not events["unhandled_error"], f"{events} {soak.replay()}"


# The suite's 120 s per test is less than the soak plus start-up, recovery and the audit commands.
@pytest.mark.timeout(SOAK_SECONDS + 120)
def test_a_minute_of_load_and_upstream_faults(
    tmp_path: Path, sandbox_url: str, log_scan: LogScan, capsys: pytest.CaptureFixture[str]
) -> None:
    soak = Soak(seed=int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32)))
    database = tmp_path / "soak.db"
    keys = asyncio.run(
        issue_keys(proxy_settings(sandbox_url, database), [("alice", "alice", []), ("bob", "bob", [])])
    )
    env = subprocess_env(
        sandbox_url,
        database,
        CYNOPSIS_TIMEOUT_SECONDS=str(UPSTREAM_TIMEOUT_SECONDS),
        CYNOPSIS_CONNECT_TIMEOUT_SECONDS="0.5",
        CYNOPSIS_TOKEN_TIMEOUT_SECONDS=str(UPSTREAM_TIMEOUT_SECONDS),
        CYNOPSIS_TOKEN_FAILURE_BACKOFF_SECONDS="1",
        CYNOPSIS_MAX_RESPONSE_BYTES=str(MAX_RESPONSE_BYTES),
        CYNOPSIS_CIRCUIT_OPEN_SECONDS="1",
        LIVENESS_PROXY_LOG_LEVEL="debug",
        **UNLIMITED,
    )
    log_path = tmp_path / "serve.log"
    process, url = start_serve_logging_to(env, log_path)
    try:
        callers = [("alice", keys["alice"].key), ("bob", keys["bob"].key)]
        rss_end = run_load(url, sandbox_url, callers, soak, process.pid)
        assert_recovers(url, sandbox_url, keys["bob"].key, soak)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    logs = log_path.read_text()
    log_scan.scan("test_soak serve", logs)
    assert process.returncode == 0, logs[-3000:]

    rss_warm = next((rss for moment, rss in soak.rss if moment >= WARM_UP_SECONDS), soak.rss[0][1])
    summary = summarize(soak, rss_warm, rss_end)
    with capsys.disabled():
        print(f"\n{summary}")
    assert_every_failure_explained(soak, summary)
    assert_nothing_lost(env, database, soak)
    growth = rss_end - rss_warm
    assert growth < RSS_GROWTH_LIMIT_BYTES, (
        f"RSS grew by {growth / 2**20:.1f} MiB after the warm-up: {summary}"
    )
    assert_clean_logs(logs, soak)
