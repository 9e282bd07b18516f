"""Crash safety of the audit log: every answer `serve` sent has its record, even after `kill -9`.

The real command runs as a subprocess group (two uvicorn workers writing one chain), under load from
several client threads; the whole group is killed with SIGKILL mid-load. Then every request id the
clients got an answer for must be in the log, and the chain must verify, before and after a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.test_cli import COMMAND, free_port, run
from liveness_proxy.sandbox import Sandbox, SandboxConfig
from support import CLIENT_ID, CLIENT_SECRET, DOMAIN_ID, ServerThread, subprocess_env

# kill -9 under load, ~15 s
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

CLIENT_THREADS = 16
LOAD_SECONDS = 1.5
SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


@pytest.fixture
def upstream_url() -> Iterator[str]:
    sandbox = Sandbox(
        SandboxConfig(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, domain_id=DOMAIN_ID, control_enabled=True
        )
    )
    server = ServerThread(sandbox.app, lifespan="off").start()
    yield server.url
    server.stop()


@pytest.fixture
def env(tmp_path: Path, upstream_url: str) -> dict[str, str]:
    # The load is the point here, not the per-subject limits.
    return subprocess_env(
        upstream_url,
        tmp_path / "crash.db",
        LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN="1000000/minute",
        LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION="1000000/minute",
        LIVENESS_PROXY_RATE_LIMIT_RESULT="1000000/minute",
        LIVENESS_PROXY_DAILY_ATTEMPTS="1000000",
    )


def start_serve(env: dict[str, str], workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # A session of its own, so that SIGKILL reaches the workers too, not only uvicorn's supervisor.
    process = subprocess.Popen(
        [COMMAND, "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve exited during start-up"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("serve did not become ready")


def exported_request_ids(env: dict[str, str]) -> list[str]:
    exported = run(env, "audit", "export")
    assert exported.returncode == 0, exported.stderr
    return [json.loads(line)["request_id"] for line in exported.stdout.splitlines()]


def drive_load(url: str, key: str, session_id: str, acknowledged: list[str]) -> list[threading.Thread]:
    """Threads sending result reads and session-token requests until the server dies; each keeps the
    request id of every answer it received."""

    def client_thread(number: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            for sent in range(1_000_000):
                headers = {"X-Request-ID": f"load-{number}-{sent}"}
                try:
                    if sent % 2:
                        response = client.get(f"{SESSIONS}/{session_id}/result", headers=headers)
                    else:
                        response = client.post(SESSION_TOKEN, headers=headers)
                except httpx.TransportError:
                    return  # the server is gone: this request was never answered
                acknowledged.append(response.headers["x-request-id"])  # list.append is atomic

    threads = [
        threading.Thread(target=client_thread, args=(number,), daemon=True)
        for number in range(CLIENT_THREADS)
    ]
    for thread in threads:
        thread.start()
    return threads


def test_every_answered_request_is_audited_after_kill_9(env: dict[str, str]) -> None:
    key = run(env, "keys", "create", "--subject", "alice").stdout.strip().splitlines()[-1]
    process, url = start_serve(env, workers=2)
    try:
        auth = {"Authorization": f"Bearer {key}"}
        token = httpx.post(f"{url}{SESSION_TOKEN}", headers=auth).json()["session_token"]
        created = httpx.post(f"{url}{SESSIONS}", headers=auth, json={"session_token": token})
        assert created.status_code == 201
        acknowledged: list[str] = []
        threads = drive_load(url, key, created.json()["session_id"], acknowledged)
        time.sleep(LOAD_SECONDS)
        os.killpg(process.pid, signal.SIGKILL)  # mid-load: requests are in flight in every thread
        for thread in threads:
            thread.join(timeout=15)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    assert process.returncode == -signal.SIGKILL
    assert len(acknowledged) > 100, "too little load reached the server to mean anything"

    audited = exported_request_ids(env)
    missing = set(acknowledged) - set(audited)
    assert not missing, f"{len(missing)} answered requests have no audit record, e.g. {sorted(missing)[:5]}"
    verified = run(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"audit chain OK: {len(audited)} records verified" in verified.stdout

    # The chain carries on from where the killed workers left it.
    process, url = start_serve(env, workers=1)
    try:
        for index in range(5):
            answered = httpx.post(f"{url}{SESSION_TOKEN}", headers={**auth, "X-Request-ID": f"after-{index}"})
            assert answered.status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    after = exported_request_ids(env)
    assert after[-5:] == [f"after-{index}" for index in range(5)]
    verified = run(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"audit chain OK: {len(audited) + 5} records verified" in verified.stdout
