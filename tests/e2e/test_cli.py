"""The `liveness-proxy` command, run as a user would: as a subprocess, against a real sandbox."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from liveness_proxy.sandbox import Sandbox, SandboxConfig
from services import scratch_postgres, shared_backend
from support import (
    CLIENT_ID,
    CLIENT_SECRET,
    DOMAIN_ID,
    TEST_AUDIT_KEYS,
    TEST_KEYS,
    TEST_PEPPER,
    ServerThread,
    subprocess_env,
)

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
    return subprocess_env(sandbox[1], tmp_path / "cli.db")


def run(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_check_on_postgresql_and_redis_reports_both(env: dict[str, str]) -> None:
    with shared_backend() as overrides:
        result = run({**env, **overrides}, "db", "upgrade")
        assert result.returncode == 0, result.stderr
        result = run({**env, **overrides}, "check")
        assert result.returncode == 0, result.stdout + result.stderr
        from alembic.script import ScriptDirectory

        from liveness_proxy.store.database import alembic_config

        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert f"schema revision {head}" in result.stdout
        assert "redis: reachable" in result.stdout
    result = run({**env, "LIVENESS_PROXY_REDIS_URL": "redis://:hidden-redis-password@127.0.0.1:1/0"}, "check")
    assert result.returncode == 1
    assert "redis: FAILED (ConnectionError" in result.stdout
    assert "LIVENESS_PROXY_REDIS_URL=redis://:***@127.0.0.1:1/0" in result.stdout
    assert "hidden-redis-password" not in result.stdout + result.stderr


def test_check_and_db_upgrade_show_no_form_of_password(env: dict[str, str]) -> None:
    """Userinfo and `?password=`, on a PostgreSQL database that is really upgraded and checked, and on
    a Redis URL (unreachable: its check fails, and says so without the password)."""
    with scratch_postgres() as scratch:
        parts = urlsplit(scratch)
        # The test server trusts loopback: the passwords are carried, not needed (unless it has one).
        userinfo_password = parts.password or "pg-userinfo-pw"
        query_password = parts.password or "pg-query-pw"
        login = f"{parts.username or getpass.getuser()}:{userinfo_password}"
        database_url = parts._replace(
            netloc=f"{login}@{parts.hostname}:{parts.port or 5432}", query=f"password={query_password}"
        ).geturl()
        redis_url = "rediss://u:redis-userinfo-pw@127.0.0.1:1/0?password=redis-query-pw"
        overrides = {"LIVENESS_PROXY_DATABASE_URL": database_url, "LIVENESS_PROXY_REDIS_URL": redis_url}
        upgraded = run({**env, **overrides}, "db", "upgrade")
        checked = run({**env, **overrides}, "check")
    assert upgraded.returncode == 0, upgraded.stderr
    shown_database = f"{parts.username or getpass.getuser()}:***@{parts.hostname}:{parts.port or 5432}"
    assert f"{shown_database}{parts.path}?password=***" in upgraded.stdout
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "database: reachable" in checked.stdout
    assert "redis: FAILED" in checked.stdout
    assert "LIVENESS_PROXY_REDIS_URL=rediss://u:***@127.0.0.1:1/0?password=***" in checked.stdout
    assert f"LIVENESS_PROXY_DATABASE_URL={parts.scheme}://{shown_database}" in checked.stdout
    printed = upgraded.stdout + upgraded.stderr + checked.stdout + checked.stderr
    for secret in (userinfo_password, query_password, "redis-userinfo-pw", "redis-query-pw"):
        assert secret not in printed


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


@pytest.mark.slow
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
    # One record per request, plus the system event of the verdict (the caller's read or the
    # finalizer's, whichever came first), told apart by `kind`.
    requests = [r["action"] for r in records if r["kind"] == "request"]
    assert requests == ["session_token.create", "session.create", "result.read"]
    assert [r["action"] for r in records if r["kind"] == "system"] == ["verdict.record"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    verified = run(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"4 records verified (seq 1..4); head hash {records[-1]['record_hash']}" in verified.stdout
    [listed] = [json.loads(line) for line in run(env, "keys", "list", "--json").stdout.splitlines()]
    assert records[0]["occurred_at"] - 1 <= listed["last_used_at"] <= records[-1]["occurred_at"] + 1


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


# -- audit ------------------------------------------------------------------------------------------


def _seed_audit(env: dict[str, str], times: list[float]) -> None:
    """Audit records written through the real AuditLog, one per time given."""
    from liveness_proxy.store import AuditLog, AuditRecord, create_engine, upgrade_database
    from liveness_proxy.store.subjects import SubjectRegistry

    async def seed() -> None:
        engine = create_engine(env["LIVENESS_PROXY_DATABASE_URL"].replace("sqlite:", "sqlite+aiosqlite:", 1))
        try:
            await upgrade_database(engine, keys=TEST_KEYS)
            log = AuditLog(engine, TEST_AUDIT_KEYS)
            alice = await SubjectRegistry(engine, TEST_KEYS.subjects).resolve("alice")
            for index, occurred_at in enumerate(times):
                await log.append(
                    AuditRecord(
                        occurred_at,
                        f"r{index}",
                        "alice",
                        "key:1",
                        "result.read",
                        None,
                        200,
                        200,
                        1.0,
                        None,
                        subject_commitment=alice.commitment,
                    )
                )
            await log.close()
        finally:
            await engine.dispose()

    asyncio.run(seed())


@pytest.mark.slow
def test_audit_verify_passes_then_names_the_first_tampered_record(
    env: dict[str, str], tmp_path: Path
) -> None:
    _seed_audit(env, [1000.0 + index for index in range(5)])
    verified = run(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "audit chain OK: 5 records verified (seq 1..5); head hash " in verified.stdout
    with sqlite3.connect(tmp_path / "cli.db") as connection:
        connection.execute("UPDATE audit_records SET status = 403 WHERE seq = 3")
        record_id = connection.execute("SELECT id FROM audit_records WHERE seq = 3").fetchone()[0]
    broken = run(env, "audit", "verify")
    assert broken.returncode == 1
    assert f"BROKEN at seq 3 (id {record_id}): altered" in broken.stdout
    assert "2 records verified before it" in broken.stdout


def test_audit_verify_names_a_truncated_tail(env: dict[str, str], tmp_path: Path) -> None:
    _seed_audit(env, [1000.0, 1001.0, 1002.0])
    with sqlite3.connect(tmp_path / "cli.db") as connection:
        connection.execute("DELETE FROM audit_records WHERE seq = 3")
    broken = run(env, "audit", "verify")
    assert broken.returncode == 1
    assert "BROKEN at seq 3 (id -): truncated" in broken.stdout
    assert "tail truncated" in broken.stdout


def test_audit_export_selects_a_time_range(env: dict[str, str]) -> None:
    base = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    _seed_audit(env, [base - 1, base, base + 1, base + 2])
    exported = run(env, "audit", "export", "--since", "2026-01-01T00:00:00Z", "--until", str(int(base + 2)))
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    assert {"seq", "prev_hash", "record_hash"} <= records[0].keys()
    naive_is_utc = run(env, "audit", "export", "--since", "2026-01-01 00:00:01")
    assert [json.loads(line)["request_id"] for line in naive_is_utc.stdout.splitlines()] == ["r2", "r3"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "yesterday"], "is neither ISO 8601"),
        (["--until", "nan"], "is neither ISO 8601"),
        (["--since", "2026-02-01", "--until", "2026-01-01"], "--since must be earlier than --until"),
    ],
)
def test_audit_export_refuses_bad_times_with_exit_2(
    env: dict[str, str], arguments: list[str], message: str
) -> None:
    result = run(env, "audit", "export", *arguments)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_audit_purge_deletes_old_records_and_verify_still_passes(env: dict[str, str], tmp_path: Path) -> None:
    now = time.time()
    _seed_audit(env, [now - 10 * 86400] * 3 + [now - 60] * 2)
    purged = run(env, "audit", "purge", "--older-than", "5")
    assert purged.returncode == 0, purged.stderr
    assert "purged 3 audit records older than " in purged.stdout
    assert "the chain now starts after seq 3" in purged.stdout
    verified = run(env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout
    assert "2 records verified (seq 4..5); records up to seq 3 were purged" in verified.stdout
    with sqlite3.connect(tmp_path / "cli.db") as connection:
        connection.execute("DELETE FROM audit_records WHERE seq = 4")
    assert "BROKEN at seq 5" in run(env, "audit", "verify").stdout


@pytest.mark.parametrize("days", ["0", "-1", "1.5", "x"])
def test_audit_purge_wants_a_positive_number_of_days(env: dict[str, str], days: str) -> None:
    result = run(env, "audit", "purge", "--older-than", days)
    assert result.returncode == 2
    assert "whole number of days greater than 0" in result.stderr


def test_audit_commands_refuse_a_database_that_is_not_migrated(env: dict[str, str]) -> None:
    result = run(env, "audit", "verify")
    assert result.returncode == 2
    assert "run `liveness-proxy db upgrade`" in result.stderr
