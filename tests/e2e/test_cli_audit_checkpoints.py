"""`liveness-proxy audit signing-key` and `audit verify --checkpoints`, through the CLI's own `main`
in this process (as tests/e2e/test_cli_webhooks.py does), against chains written by the real
AuditLog and checkpoints written by the real CheckpointWriter into a JSON log stream."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
from pathlib import Path

import pytest

from e2e.test_cli_webhooks import Cli, Ran
from integration.test_audit_chain import record
from integration.test_audit_checkpoints import forge
from liveness_proxy.observability import Redactor, build_logger
from liveness_proxy.store import AuditLog, create_engine, upgrade_database
from liveness_proxy.store.audit_checkpoints import (
    CheckpointSigner,
    CheckpointWriter,
    key_fingerprint,
    load_public_key_pem,
)
from support import TEST_AUDIT_KEYS, TEST_KEYS, TEST_PEPPER


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    for name in list(os.environ):
        if name.startswith(("LIVENESS_PROXY_", "CYNOPSIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # Settings.load reads ./.env: none here
    monkeypatch.setenv("LIVENESS_PROXY_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    # The chain is keyed with the key derived from the pepper: verifying it needs the pepper.
    monkeypatch.setenv("LIVENESS_PROXY_API_KEY_PEPPER", TEST_PEPPER)
    return Cli(capsys, monkeypatch)


def new_key(cli: Cli, path: Path) -> tuple[Ran, CheckpointSigner]:
    made = cli("audit", "signing-key", "--out", str(path))
    assert made.code == 0, made.stderr
    return made, CheckpointSigner.from_file(path)


async def write_log_stream(database_url: str, key: Path, log_file: Path, batches: list[int]) -> None:
    """Records in `batches`, a checkpoint after each, all into one JSON log stream with other
    events between them: what `kubectl logs` or a log shipper hands an auditor."""
    engine = create_engine(database_url)
    stream = io.StringIO()
    logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=stream)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        writer = CheckpointWriter(engine, CheckpointSigner.from_file(key), logger=logger)
        written = 0
        for size in batches:
            log = AuditLog(engine, TEST_AUDIT_KEYS)
            for _ in range(size):
                await log.append(record(written, subject=None))  # checkpoints, not subjects, under test
                written += 1
            await log.close()
            logger.info("request", path="/v1/liveness/sessions", status=200)
            assert await writer.write_if_moved() is not None
        await writer.close()
    finally:
        await engine.dispose()
    log_file.write_text(stream.getvalue())


async def forge_database(database_url: str, **forgery: int) -> None:
    engine = create_engine(database_url)
    try:
        await forge(engine, **forgery)
    finally:
        await engine.dispose()


# -- signing-key ------------------------------------------------------------------------------------


def test_signing_key_writes_a_private_key_0600_and_prints_its_public_key(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.pem"
    made, signer = new_key(cli, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert made.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in made.stdout
    assert key_fingerprint(load_public_key_pem(made.stdout.encode())) == signer.fingerprint
    assert signer.fingerprint in made.stderr
    before = path.read_bytes()
    again = cli("audit", "signing-key", "--out", str(path))
    assert again.code == 2
    assert "exists; not overwritten" in again.stderr
    assert again.stdout == ""
    assert path.read_bytes() == before


# -- verify --checkpoints ---------------------------------------------------------------------------


def test_verify_reads_checkpoints_from_the_log_stream_and_fails_on_the_reviewers_forgery(
    cli: Cli, database_url: str, tmp_path: Path
) -> None:
    key = tmp_path / "signing.pem"
    new_key(cli, key)
    cli.setenv({"LIVENESS_PROXY_DATABASE_URL": database_url, "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE": key})
    log_file = tmp_path / "proxy.log"
    asyncio.run(write_log_stream(database_url, key, log_file, [5, 7]))
    verified = cli("audit", "verify", "--checkpoints", str(log_file))
    assert verified.code == 0, verified.stdout + verified.stderr
    assert "audit chain OK: 12 records verified (seq 1..12)" in verified.stdout
    assert "audit checkpoints OK: 2 of 2 match the chain; the latest: seq 12, signed " in verified.stdout
    assert "; 2 other log lines skipped" in verified.stdout

    asyncio.run(forge_database(database_url, seq=3, status=404, keep=9))  # a 200 becomes a 404
    forged = cli("audit", "verify", "--checkpoints", str(log_file))
    assert forged.code == 1
    assert "audit chain OK: 9 records verified" in forged.stdout  # the chain alone is fooled
    assert "audit checkpoints FAILED: 2 problems; 2 checkpoints read, 0 match the chain" in forged.stdout
    assert "line 2: rewritten: signed at " in forged.stdout
    assert "line 4: truncated: signed at " in forged.stdout
    assert "it now ends at seq 9" in forged.stdout


def test_verify_takes_public_keys_and_needs_one(cli: Cli, tmp_path: Path) -> None:
    old_key, new_key_file = tmp_path / "old.pem", tmp_path / "new.pem"
    old_public, new_public = tmp_path / "old.pub", tmp_path / "new.pub"
    old_public.write_text(new_key(cli, old_key)[0].stdout)
    new_public.write_text(new_key(cli, new_key_file)[0].stdout)
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    asyncio.run(write_log_stream(database_url, old_key, old_log, [3]))
    asyncio.run(write_log_stream(database_url, new_key_file, new_log, [2]))
    both = tmp_path / "both.log"
    both.write_text(old_log.read_text() + new_log.read_text())

    no_key = cli("audit", "verify", "--checkpoints", str(both))
    assert no_key.code == 2
    assert "no public key to check the signatures with" in no_key.stderr
    rotated = cli(
        "audit",
        "verify",
        "--checkpoints",
        str(both),
        "--public-key",
        str(old_public),
        "--public-key",
        str(new_public),
    )
    assert rotated.code == 0, rotated.stdout
    assert "audit checkpoints OK: 2 of 2 match the chain" in rotated.stdout
    only_new = cli("audit", "verify", "--checkpoints", str(both), "--public-key", str(new_public))
    assert only_new.code == 1
    assert "line 2: forged: signed by key " in only_new.stdout

    private_given = cli("audit", "verify", "--checkpoints", str(both), "--public-key", str(old_key))
    assert private_given.code == 2
    assert f"--public-key {old_key}: a private key: give the public key" in private_given.stderr
    assert old_key.read_text().splitlines()[1] not in private_given.stderr  # no key material
    without_checkpoints = cli("audit", "verify", "--public-key", str(new_public))
    assert without_checkpoints.code == 2
    assert "--public-key only with --checkpoints" in without_checkpoints.stderr
    missing = cli(
        "audit", "verify", "--checkpoints", str(tmp_path / "none.log"), "--public-key", str(new_public)
    )
    assert missing.code == 2
    assert "cannot read the file (No such file or directory)" in missing.stderr


def test_verify_reads_stdin_and_a_file_without_checkpoints_fails(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "signing.pem"
    new_key(cli, key)
    cli.setenv({"LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE": key})
    log_file = tmp_path / "proxy.log"
    asyncio.run(write_log_stream(f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}", key, log_file, [4]))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(log_file.read_bytes())))
    piped = cli("audit", "verify", "--checkpoints", "-")
    assert piped.code == 0, piped.stdout + piped.stderr
    assert "audit checkpoints OK: 1 of 1 match the chain; the latest: seq 4" in piped.stdout

    other_events = tmp_path / "other.log"
    other_events.write_text(json.dumps({"event": "request", "status": 200}) + "\n")
    empty = cli("audit", "verify", "--checkpoints", str(other_events))
    assert empty.code == 1
    assert f"audit checkpoints: NONE found in {other_events}; 1 other log line skipped" in empty.stdout
