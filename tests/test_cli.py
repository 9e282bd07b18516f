"""The `liveness-proxy` command, run as a user would: as a subprocess, against a real sandbox."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from liveness_proxy.sandbox import Sandbox, SandboxConfig
from support import CLIENT_ID, CLIENT_SECRET, DOMAIN_ID, TEST_PEPPER, ServerThread

COMMAND = str(Path(sys.executable).parent / "liveness-proxy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    upstream = Sandbox(
        SandboxConfig(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, domain_id=DOMAIN_ID, control_enabled=True
        )
    )
    server = ServerThread(upstream.app, lifespan="off").start()
    yield upstream, server.url
    server.stop()


@pytest.fixture
def env(tmp_path: Path, sandbox: tuple[Sandbox, str]) -> dict[str, str]:
    _, url = sandbox
    values = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))
    }
    values.update(
        {
            "CYNOPSIS_TOKEN_URL": f"{url}/oauth/token",
            "CYNOPSIS_API_BASE_URL": url,
            "CYNOPSIS_CLIENT_ID": CLIENT_ID,
            "CYNOPSIS_CLIENT_SECRET": CLIENT_SECRET,
            "CYNOPSIS_DOMAIN_ID": DOMAIN_ID,
            "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "LIVENESS_PROXY_API_KEY_PEPPER": TEST_PEPPER,
        }
    )
    return values


def run(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_keys_create_list_revoke(env: dict[str, str]) -> None:
    created = run(env, "keys", "create", "--subject", "alice", "--scope", "liveness:admin", "--name", "ops")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("lpk_")
    as_json = run(env, "keys", "create", "--subject", "bob", "--json")
    made = json.loads(as_json.stdout)
    assert made["key"].startswith(f"lpk_{made['id']}_")

    listing = run(env, "keys", "list")
    assert listing.returncode == 0
    assert "alice" in listing.stdout
    assert "liveness:admin" in listing.stdout
    assert key not in listing.stdout
    assert key.split("_", 2)[2] not in listing.stdout
    key_id = key.split("_")[1]
    assert run(env, "keys", "revoke", key_id).returncode == 0
    assert run(env, "keys", "revoke", key_id).returncode == 1
    rows = [json.loads(line) for line in run(env, "keys", "list", "--json").stdout.splitlines()]
    assert {row["subject"]: row["revoked_at"] is not None for row in rows} == {"alice": True, "bob": False}


def test_configuration_error_is_one_line_and_exit_code_2(env: dict[str, str], tmp_path: Path) -> None:
    del env["LIVENESS_PROXY_API_KEY_PEPPER"]
    result = run(env, "keys", "create", "--subject", "alice", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "LIVENESS_PROXY_API_KEY_PEPPER: required" in result.stderr
    env["LIVENESS_PROXY_PORT"] = "not-a-port"
    result = run(env, "serve", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "LIVENESS_PROXY_PORT: " in result.stderr


def test_check_fetches_a_token_and_prints_no_secret(
    env: dict[str, str], sandbox: tuple[Sandbox, str]
) -> None:
    result = run(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "upstream token: obtained" in result.stdout
    assert "check: OK" in result.stdout
    assert CLIENT_SECRET not in result.stdout + result.stderr
    assert TEST_PEPPER not in result.stdout + result.stderr
    assert sandbox[0].tokens_issued == 1


def test_check_fails_on_wrong_credentials(env: dict[str, str]) -> None:
    env["CYNOPSIS_CLIENT_SECRET"] = "wrong-secret-value"
    result = run(env, "check")
    assert result.returncode == 1
    assert "invalid_client" in result.stdout
    assert "wrong-secret-value" not in result.stdout + result.stderr


def test_db_upgrade_creates_the_schema(env: dict[str, str], tmp_path: Path) -> None:
    result = run(env, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    import sqlite3

    from alembic.script import ScriptDirectory

    from liveness_proxy.store.database import alembic_config

    with sqlite3.connect(tmp_path / "cli.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"liveness_sessions", "api_keys", "audit_records"} <= tables
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert journal == "wal"


def _wait_ready(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("serve did not become ready")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_runs_the_flow_and_stops_on_sigterm(
    env: dict[str, str], sandbox: tuple[Sandbox, str], workers: str
) -> None:
    key = run(env, "keys", "create", "--subject", "alice").stdout.strip().splitlines()[-1]
    port = free_port()
    process = subprocess.Popen(
        [COMMAND, "serve", "--port", str(port), "--workers", workers],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        auth = {"Authorization": f"Bearer {key}"}
        token = httpx.post(f"{url}/v1/liveness/session-token", headers=auth).json()["session_token"]
        created = httpx.post(f"{url}/v1/liveness/sessions", headers=auth, json={"session_token": token})
        assert created.status_code == 201
        session_id = created.json()["session_id"]
        sandbox[0].complete_session(session_id, live=True)
        result = httpx.get(f"{url}/v1/liveness/sessions/{session_id}/result", headers=auth)
        assert result.json()["status"] == "SUCCEEDED"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert CLIENT_SECRET not in stderr
    assert key not in stderr
    exported = run(env, "audit", "export", "--format", "jsonl")
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["action"] for r in records] == ["session_token.create", "session.create", "result.read"]


def test_sandbox_command_serves_the_simulated_api(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [COMMAND, "sandbox", "--port", str(port), "--client-id", "c", "--client-secret", "s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/oauth/token",
                    data={"grant_type": "client_credentials", "client_id": "c", "client_secret": "s"},
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.status_code == 200
        assert answer.json()["token_type"] == "Bearer"
        assert httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats").status_code == 404  # control API off
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)


def test_demo_walkthrough_runs_the_whole_flow(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))}
    result = subprocess.run(
        [
            COMMAND,
            "demo",
            "--port",
            "0",
            "--sandbox-port",
            "0",
            "--walkthrough-only",
            "--dir",
            str(tmp_path / "d"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEY=lpk_" in result.stdout
    assert "curl -s -X POST" in result.stdout
    assert "walkthrough: status=SUCCEEDED" in result.stdout
    assert "iVBORw0KGg" not in result.stdout  # no base64 PNG reached the caller
