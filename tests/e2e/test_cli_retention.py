"""`liveness-proxy retention run`, through the CLI's own `main` in this process (one subprocess
checks the installed command), on a database state made by the store's own writers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from liveness_proxy.cli import main
from liveness_proxy.delivery import VerdictEvents
from liveness_proxy.store import (
    AuditLog,
    AuditRecord,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
    VerdictLedger,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.retention import DAY_SECONDS
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import audit_records, liveness_sessions, webhook_events
from support import TEST_AUDIT_KEYS, TEST_KEYS, TEST_PEPPER

COMMAND = str(Path(sys.executable).parent / "liveness-proxy")
NOW = time.time()


async def _seed(database_url: str) -> None:
    """Two sessions with their verdicts and webhook events, 40 days and one day old, and the audit
    records of their creation, 100 days and one day old."""
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        registry = SubjectRegistry(engine, TEST_KEYS.subjects)
        log = AuditLog(engine, TEST_AUDIT_KEYS)
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        for session_id, subject, created_at, audited_at in (
            ("s-old", "alice", NOW - 40 * DAY_SECONDS, NOW - 100 * DAY_SECONDS),
            ("s-new", "bob", NOW - DAY_SECONDS, NOW - DAY_SECONDS),
        ):
            secret = await registry.resolve(subject)
            await log.append(
                AuditRecord(
                    audited_at,
                    "req-" + session_id,
                    subject,
                    "key:1",
                    "session.create",
                    session_id,
                    201,
                    200,
                    3.0,
                    None,
                    subject_commitment=secret.commitment,
                )
            )
            owner = SessionOwner(
                session_id,
                subject,
                "key:1",
                created_at,
                "req-" + session_id,
                reference="loan-7",
                subject_commitment=secret.commitment,
            )
            await ownership.bind(owner, "req-" + session_id)
            ledger = VerdictLedger(
                engine,
                ownership,
                TEST_AUDIT_KEYS,
                events=VerdictEvents(pass_threshold=None),
                wall_clock=_at(created_at + 60),
            )
            await ledger.record(
                owner,
                SessionVerdict("SUCCEEDED", 97.5, created_at + 60, "read-" + session_id),
                read_by="request",
            )
            await ledger.close()
        await log.close()
        await ownership.close()
    finally:
        await engine.dispose()


def _at(instant: float) -> Callable[[], float]:
    return lambda: instant


async def _rows(database_url: str, column: Any) -> list[Any]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return list((await connection.execute(select(column).order_by(column))).scalars())
    finally:
        await engine.dispose()


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    for name in list(os.environ):
        if name.startswith(("LIVENESS_PROXY_", "CYNOPSIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # Settings.load reads ./.env: none here
    monkeypatch.setenv("LIVENESS_PROXY_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIVENESS_PROXY_API_KEY_PEPPER", TEST_PEPPER)
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    asyncio.run(_seed(url))
    return url


def test_retention_run_removes_what_is_past_each_cutoff_and_prints_the_counts(
    database: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # With both settings at 0, only what expired on its own goes: the sessions and plain values stay.
    assert main(["retention", "run"]) == 0
    kept = capsys.readouterr().out
    assert "retention applied: sessions: 0, webhook events: 0, jobs: 0, audit plaintext: 0," in kept
    assert "sessions, verdicts and webhook events created before: kept (0 days)" in kept
    assert asyncio.run(_rows(database, liveness_sessions.c.session_id)) == ["s-new", "s-old"]
    assert asyncio.run(_rows(database, audit_records.c.subject)).count("alice") == 2

    monkeypatch.setenv("LIVENESS_PROXY_RETENTION_DAYS", "30")
    monkeypatch.setenv("LIVENESS_PROXY_AUDIT_PLAINTEXT_RETENTION_DAYS", "90")
    assert main(["retention", "run"]) == 0
    printed = capsys.readouterr().out
    # The old session's follow-up and its event's delivery are its two jobs.
    assert "retention applied: sessions: 1, webhook events: 1, jobs: 2, audit plaintext: 1," in printed
    assert "sessions, verdicts and webhook events created before: 20" in printed  # an ISO date
    assert asyncio.run(_rows(database, liveness_sessions.c.session_id)) == ["s-new"]
    assert len(asyncio.run(_rows(database, webhook_events.c.event_id))) == 1
    # Alice's session.create record (100 days old) lost its plain subject; her verdict's (40) did not.
    assert asyncio.run(_rows(database, audit_records.c.subject)).count("alice") == 1

    assert main(["audit", "verify"]) == 0
    assert "audit chain OK" in capsys.readouterr().out

    assert main(["retention", "run", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["complete"] is True
    assert set(again["removed"].values()) == {0}
    assert again["cutoffs"]["sessions_before"] == pytest.approx(time.time() - 30 * DAY_SECONDS, abs=60)


@pytest.mark.slow
def test_the_installed_command_runs_retention_and_prints_json(database: str) -> None:
    result = subprocess.run(
        [COMMAND, "retention", "run", "--json"],
        env={**os.environ, "LIVENESS_PROXY_RETENTION_DAYS": "30"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["removed"]["sessions"] == 1
    assert printed["cutoffs"]["audit_plaintext_before"] is None
