"""Many processes, one deployment: `serve` replicas sharing PostgreSQL and Redis, and `serve
--workers N` sharing SQLite. The real command runs as subprocesses against a sandbox upstream over
loopback; the tests drive them round-robin, the way a load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from e2e.test_cli import COMMAND, free_port, run
from liveness_proxy.sandbox import Sandbox
from liveness_proxy.settings import settings_from_mapping
from services import shared_backend
from support import LogScan, ServerThread, issue_keys, subprocess_env, upstream_sandbox

# several `serve` processes per test, 20-40 s each
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
# Short enough that a test can wait for a token to expire; with a refresh margin of 1 s a burst has
# 4 s (on a loaded 2-core CI machine) before a background refresh could add a second token request.
TOKEN_LIFETIME_SECONDS = 5
CALLERS = ("alice", "bob", "dave", "admin")


@dataclass
class Fleet:
    """Replicas of `serve` behind no balancer: `url(i)` picks one, `next_url()` goes round-robin."""

    sandbox: Sandbox
    env: dict[str, str]
    urls: list[str]
    processes: list[subprocess.Popen[bytes]]
    log_files: list[Path]
    keys: dict[str, str] = field(default_factory=dict)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def next_url(self) -> str:
        return self.urls[next(self._turn) % len(self.urls)]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def kill(self, index: int) -> None:
        os.killpg(self.processes[index].pid, signal.SIGKILL)
        self.processes[index].wait(timeout=15)


def _start_serve(
    env: dict[str, str], log_file: Path, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log_file.open("ab") as log:
        # A session of its own, so that SIGKILL reaches uvicorn's workers too.
        process = subprocess.Popen(
            [COMMAND, "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    return process, f"http://127.0.0.1:{port}"


def _wait_listening(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve at {url} exited during start-up"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"serve at {url} did not start")


@contextlib.contextmanager
def running_fleet(
    tmp_path: Path,
    log_scan: LogScan,
    origin: str,
    *,
    replicas: int,
    workers: int = 1,
    shared: bool = True,
    **settings: str,
) -> Iterator[Fleet]:
    sandbox = upstream_sandbox(token_lifetime_seconds=TOKEN_LIFETIME_SECONDS)
    upstream = ServerThread(sandbox.app, lifespan="off").start()
    backend: contextlib.AbstractContextManager[dict[str, str]] = (
        shared_backend() if shared else contextlib.nullcontext({})
    )
    fleet: Fleet | None = None
    try:
        with backend as overrides:
            values = {
                "CYNOPSIS_TOKEN_REFRESH_MARGIN_SECONDS": "1",
                "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "1000000/minute",
                "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "1000000/minute",
                "LIVENESS_PROXY_RATE_LIMIT_RESULT": "1000000/minute",
                "LIVENESS_PROXY_DAILY_ATTEMPTS": "1000000",
                **overrides,
                **settings,
            }
            env = subprocess_env(upstream.url, tmp_path / "fleet.db", **values)
            ours = {name: value for name, value in env.items() if name.startswith(("CYNOPSIS_", "LIVENESS_"))}
            callers = [(who, who, ["liveness:admin"] if who == "admin" else []) for who in CALLERS]
            issued = asyncio.run(issue_keys(settings_from_mapping(ours), callers))
            keys = {who: key.key for who, key in issued.items()}
            log_files = [tmp_path / f"replica-{index}.log" for index in range(replicas)]
            started = [_start_serve(env, log_file, workers) for log_file in log_files]
            fleet = Fleet(
                sandbox=sandbox,
                env=env,
                urls=[url for _, url in started],
                processes=[process for process, _ in started],
                log_files=log_files,
                keys=keys,
            )
            # Every replica up first, then each one's readiness (which needs a token) in a row, so
            # that all of them ask for their first token within moments of each other.
            for process, url in started:
                _wait_listening(process, url)
            for _, url in started:
                ready = httpx.get(f"{url}/readyz", timeout=10)
                assert ready.status_code == 200, ready.text
            yield fleet
    finally:
        if fleet is not None:
            for process in fleet.processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in fleet.processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            for log_file in fleet.log_files:
                log_scan.scan(f"{origin} {log_file.name}", log_file.read_text(errors="replace"))
        upstream.stop()


async def _burst(fleet: Fleet, count: int, who: str) -> list[int]:
    """`count` concurrent session-token requests, spread round-robin over the replicas."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        answers = await asyncio.gather(
            *(http.post(f"{fleet.next_url()}{SESSION_TOKEN}", headers=fleet.auth(who)) for _ in range(count))
        )
    return [answer.status_code for answer in answers]


def _create_session(fleet: Fleet, url: str, who: str) -> httpx.Response:
    token = httpx.post(f"{url}{SESSION_TOKEN}", headers=fleet.auth(who)).json()["session_token"]
    return httpx.post(f"{url}{SESSIONS}", headers=fleet.auth(who), json={"session_token": token})


def test_three_replicas_share_ownership_limits_and_one_token(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    limit = 5
    with running_fleet(
        tmp_path,
        log_scan,
        request.node.nodeid,
        replicas=3,
        LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION=f"{limit}/minute",
        # The token burst below needs a quiet fleet: the finalizer's reads would refresh the token
        # in the background (tests/e2e/test_fleet_delivery.py is where the fleet follows sessions).
        LIVENESS_PROXY_FINALIZER="off",
    ) as fleet:
        # Three replicas, each of which needed a token to become ready, asked for one in all.
        assert fleet.sandbox.token_requests == 1

        # A session created on replica 0 belongs to alice on every replica, and only to her.
        created = _create_session(fleet, fleet.urls[0], "alice")
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        result = f"{SESSIONS}/{session_id}/result"
        assert httpx.get(f"{fleet.urls[1]}{result}", headers=fleet.auth("alice")).status_code == 200
        stranger = httpx.get(f"{fleet.urls[2]}{result}", headers=fleet.auth("bob"))
        assert stranger.status_code == 404
        admin_view = httpx.get(f"{fleet.urls[2]}{SESSIONS}/{session_id}", headers=fleet.auth("admin"))
        assert admin_view.status_code == 200
        assert admin_view.json()["subject"] == "alice"

        # A limit of K is K for the whole fleet, not K per replica.
        statuses = [_create_session(fleet, fleet.next_url(), "dave").status_code for _ in range(3 * limit)]
        assert statuses.count(201) == limit, statuses
        assert statuses.count(429) == 2 * limit, statuses

        # Quiet until the token has expired everywhere, then 300 requests at once: one token request.
        time.sleep(TOKEN_LIFETIME_SECONDS + 1.0)
        before = fleet.sandbox.token_requests
        statuses = asyncio.run(_burst(fleet, 300, "alice"))
        assert statuses == [200] * 300
        assert fleet.sandbox.token_requests - before == 1


def test_killing_a_replica_loses_no_acknowledged_record(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    with running_fleet(tmp_path, log_scan, request.node.nodeid, replicas=3) as fleet:
        acknowledged: list[str] = []
        created_sessions: list[str] = []
        stop = threading.Event()

        def client_thread(number: int) -> None:
            with httpx.Client(headers=fleet.auth("alice"), timeout=10) as client:
                for sent in itertools.count():
                    if stop.is_set():
                        return
                    url = fleet.urls[(number + sent) % len(fleet.urls)]
                    headers = {"X-Request-ID": f"load-{number}-{sent}"}
                    try:
                        if sent % 3 == 2:
                            token = client.post(f"{url}{SESSION_TOKEN}").json()["session_token"]
                            answer = client.post(
                                f"{url}{SESSIONS}", headers=headers, json={"session_token": token}
                            )
                            if answer.status_code == 201:
                                created_sessions.append(answer.json()["session_id"])
                        else:
                            answer = client.post(f"{url}{SESSION_TOKEN}", headers=headers)
                    except (httpx.TransportError, KeyError, ValueError):
                        continue  # that replica is gone: the request was never answered
                    acknowledged.append(answer.headers["x-request-id"])

        threads = [threading.Thread(target=client_thread, args=(n,), daemon=True) for n in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        fleet.kill(2)  # mid-load: requests are in flight on it
        time.sleep(1.0)  # the survivors keep serving
        stop.set()
        for thread in threads:
            thread.join(timeout=20)

        assert len(acknowledged) > 100, "too little load reached the fleet to mean anything"
        exported = run(fleet.env, "audit", "export")
        assert exported.returncode == 0, exported.stderr
        audited = {json.loads(line)["request_id"] for line in exported.stdout.splitlines()}
        missing = set(acknowledged) - audited
        assert not missing, f"{len(missing)} answered requests have no audit record: {sorted(missing)[:5]}"
        verified = run(fleet.env, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # Every session a caller was told about is bound to its owner, readable on a survivor.
        assert created_sessions
        for session_id in created_sessions:
            answer = httpx.get(f"{fleet.urls[0]}{SESSIONS}/{session_id}", headers=fleet.auth("admin"))
            assert answer.status_code == 200, session_id
            assert answer.json()["subject"] == "alice"


def test_workers_on_one_machine_share_one_token_through_the_database(
    tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    # No Redis: SQLite alone carries the token between `serve --workers 3`.
    with running_fleet(tmp_path, log_scan, request.node.nodeid, replicas=1, workers=3, shared=False) as fleet:
        assert fleet.sandbox.token_requests == 1
        assert asyncio.run(_burst(fleet, 150, "alice")) == [200] * 150
        time.sleep(TOKEN_LIFETIME_SECONDS + 1.0)
        before = fleet.sandbox.token_requests
        statuses = asyncio.run(_burst(fleet, 300, "alice"))
        assert statuses == [200] * 300
        assert fleet.sandbox.token_requests - before == 1
