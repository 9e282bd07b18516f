"""`liveness-proxy webhooks …` and the system events of `audit export`, run through the CLI's own
`main` in this process (one subprocess checks the installed command), against real receivers that
verify with the official `standardwebhooks` package, a real database state made by the store's own
writers, and once beside a running proxy."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import standardwebhooks

from integration.test_audit_chain import independent_hash
from liveness_proxy.cli import main
from liveness_proxy.delivery import VerdictEvents
from liveness_proxy.store import (
    AuditLog,
    AuditRecord,
    DeliveryRecorder,
    JobQueue,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
    VerdictLedger,
    WebhookOutbox,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.outbox import disable_endpoint
from liveness_proxy.webhook_signing import parse_webhook_secrets
from support import TEST_AUDIT_KEYS, TEST_KEYS
from webhook_receiver import WebhookReceiver

# Any 64 hex digits: these tests are about verdicts, not subjects (see store/subjects.py).
COMMITMENT = "c" * 64

COMMAND = str(Path(sys.executable).parent / "liveness-proxy")
NOW = time.time()


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cli:
    """`liveness-proxy ARGS` through `main`, in this process, with this test's environment only."""

    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    outputs: list[str] = field(default_factory=list)

    def __call__(self, *args: str) -> Ran:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refusing the arguments
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        self.outputs.append(out + err)
        return Ran(code, out, err)

    def setenv(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.monkeypatch.setenv(name, str(value))

    def everything_printed(self) -> str:
        return "\n".join(self.outputs)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:

    for name in list(os.environ):
        if name.startswith(("LIVENESS_PROXY_", "CYNOPSIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # Settings.load reads ./.env: none here
    monkeypatch.setenv("LIVENESS_PROXY_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    return Cli(capsys, monkeypatch)


# -- state made by the store's own writers ----------------------------------------------------------


async def _seed_dead_letter(database_url: str) -> str:
    """A completed session whose webhook failed twice (HTTP 500) and was dead-lettered, after one
    request's audit record: what a proxy with a broken receiver leaves behind."""
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        log = AuditLog(engine, TEST_AUDIT_KEYS)
        await log.append(
            AuditRecord(
                NOW - 120,
                "req-0",
                "alice",
                "key:1",
                "session.create",
                "s-1",
                201,
                200,
                3.0,
                None,
                subject_commitment=COMMITMENT,
            )
        )
        await log.close()
        ownership = SessionOwnership(engine, first_followup_seconds=3.0)
        owner = SessionOwner(
            "s-1", "alice", "key:1", NOW - 120, "req-0", reference="loan-7", subject_commitment=COMMITMENT
        )
        await ownership.bind(owner, "req-0")
        ledger = VerdictLedger(
            engine,
            ownership,
            TEST_AUDIT_KEYS,
            events=VerdictEvents(pass_threshold=None),
            wall_clock=lambda: NOW - 60,
        )
        await ledger.record(owner, SessionVerdict("SUCCEEDED", 97.5, NOW - 60, "req-1"), read_by="request")
        await ledger.close()
        await ownership.close()
        queue, outbox, recorder = (
            JobQueue(engine),
            WebhookOutbox(engine),
            DeliveryRecorder(engine, TEST_AUDIT_KEYS),
        )
        for retry_at in (NOW - 30, None):  # a retry, then no more: the dead letter
            [job] = await queue.claim("deliver", owner="worker-1", limit=1, lease_seconds=60, now=NOW - 30)
            assert await recorder.settle_attempt(
                job,
                owner="worker-1",
                now=NOW - 30,
                result="failed",
                status=500,
                error="HTTP 500",
                retry_at=retry_at,
                session_id="s-1",
            )
        await recorder.close()
        [event] = await outbox.events()
        return event.event_id
    finally:
        await engine.dispose()


async def _disable_endpoint(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            assert await disable_endpoint(connection, now=NOW)
    finally:
        await engine.dispose()


async def _endpoint_disabled_at(database_url: str) -> float | None:
    engine = create_engine(database_url)
    try:
        return await WebhookOutbox(engine).endpoint_disabled_at()
    finally:
        await engine.dispose()


# -- secret -----------------------------------------------------------------------------------------


def test_secret_prints_only_a_fresh_secret_that_standard_webhooks_accepts(cli: Cli) -> None:
    first, second = cli("webhooks", "secret"), cli("webhooks", "secret")
    assert first.code == 0
    assert first.stderr == ""
    secret = first.stdout.removesuffix("\n")
    assert "\n" not in secret
    assert secret.startswith("whsec_")
    assert secret != second.stdout.removesuffix("\n")
    [key] = parse_webhook_secrets(secret)
    assert len(key) == 32
    assert base64.b64decode(secret.removeprefix("whsec_")) == key
    standardwebhooks.Webhook(secret)  # the receiver's library takes it as it is


def test_the_installed_command_has_the_webhooks_group() -> None:
    result = subprocess.run(
        [COMMAND, "webhooks", "secret"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert parse_webhook_secrets(result.stdout.strip())


# -- test -------------------------------------------------------------------------------------------


def test_test_sends_a_signed_ping_the_receiver_verifies(cli: Cli) -> None:
    with WebhookReceiver() as receiver:
        cli.setenv(receiver.settings())
        ran = cli("webhooks", "test")
        [delivery] = receiver.wait_for(1)
        url = receiver.url
    assert ran.code == 0, ran.stderr
    assert delivery.verified
    assert delivery.body["type"] == "liveness.ping"
    assert delivery.body["data"] == {}
    assert delivery.body["timestamp"].endswith("Z")
    assert f"sent liveness.ping {delivery.webhook_id} to {url}" in ran.stdout
    assert "answer: HTTP 200; verdict: delivered" in ran.stdout
    assert receiver.secret not in cli.everything_printed()
    assert receiver.secret.removeprefix("whsec_") not in cli.everything_printed()
    assert delivery.signature.removeprefix("v1,") not in cli.everything_printed()


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [(500, "answer: HTTP 500; verdict: failed; error: HTTP 500"), (410, "answer: HTTP 410; verdict: gone")],
)
def test_test_exits_1_and_says_why_when_the_receiver_refuses(cli: Cli, answer: int, verdict: str) -> None:
    with WebhookReceiver(always=answer) as receiver:
        cli.setenv(receiver.settings())
        ran = cli("webhooks", "test")
        [delivery] = receiver.wait_for(1, accepted=False)
    assert ran.code == 1
    assert delivery.verified  # the receiver refused a good signature: its answer is the news
    assert verdict in ran.stdout
    if answer == 410:
        assert "webhooks enable" in ran.stderr
    assert receiver.secret not in cli.everything_printed()


def test_test_without_a_url_or_with_a_bad_secret_is_a_configuration_error(cli: Cli) -> None:
    no_url = cli("webhooks", "test")
    assert no_url.code == 2
    assert "LIVENESS_PROXY_WEBHOOK_URL: required" in no_url.stderr
    cli.setenv(
        {
            "LIVENESS_PROXY_WEBHOOK_URL": "http://127.0.0.1:9/hooks",
            "LIVENESS_PROXY_WEBHOOK_SECRET": "whsec_dG9vc2hvcnQ=",
        }
    )
    bad_secret = cli("webhooks", "test")
    assert bad_secret.code == 2
    assert "LIVENESS_PROXY_WEBHOOK_SECRET: secret 1 must decode to" in bad_secret.stderr
    assert "dG9vc2hvcnQ" not in cli.everything_printed()


# -- list, resend, enable ---------------------------------------------------------------------------


def test_list_resend_and_enable_on_a_dead_letter(cli: Cli, database_url: str) -> None:
    cli.setenv({"LIVENESS_PROXY_DATABASE_URL": database_url})
    event_id = asyncio.run(_seed_dead_letter(database_url))

    failed = cli("webhooks", "list", "--failed", "--json")
    assert failed.code == 0, failed.stderr
    [letter] = failed.json()["events"]
    assert failed.json()["endpoint"] == {"disabled": False, "disabled_at": None}
    assert letter == {
        "event_id": event_id,
        "type": "liveness.session.completed",
        "session_id": "s-1",
        "state": "dead",
        "attempts": 2,
        "last_status": 500,
        "last_error": "HTTP 500",
        "created_at": letter["created_at"],
        "delivered_at": None,
        "next_attempt_at": None,
    }
    assert letter["created_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 60))
    table = cli("webhooks", "list")
    assert table.stdout.splitlines()[0] == "endpoint: enabled"
    [row] = [line for line in table.stdout.splitlines() if line.startswith(event_id)]
    assert row.split()[1:6] == ["liveness.session.completed", "s-1", "dead", "2", "500"]
    assert row.endswith("HTTP 500")

    resent = cli("webhooks", "resend", event_id)
    assert resent.code == 0, resent.stderr
    assert f"re-queued {event_id} (liveness.session.completed; was dead after 2 attempts)" in resent.stdout
    [queued] = cli("webhooks", "list", "--json").json()["events"]
    assert queued["event_id"] == event_id  # the same webhook-id: receivers deduplicate on it
    assert (queued["state"], queued["attempts"], queued["last_error"]) == ("queued", 0, None)
    assert queued["next_attempt_at"] is not None
    assert cli("webhooks", "list", "--failed", "--json").json()["events"] == []
    assert "no failed webhook events" in cli("webhooks", "list", "--failed").stdout

    unknown = cli("webhooks", "resend", "msg_nosuchevent")
    assert unknown.code == 1
    assert "no webhook event with id 'msg_nosuchevent'" in unknown.stderr

    asyncio.run(_disable_endpoint(database_url))
    assert cli("webhooks", "list", "--json").json()["endpoint"]["disabled"] is True
    assert "endpoint: DISABLED since " in cli("webhooks", "list").stdout
    waiting = cli("webhooks", "resend", event_id)
    assert "the event waits until `liveness-proxy webhooks enable`" in waiting.stdout
    enabled = cli("webhooks", "enable")
    assert enabled.code == 0
    assert "re-enabled the webhook endpoint (disabled since " in enabled.stdout
    assert "1 queued events will be delivered" in enabled.stdout
    assert asyncio.run(_endpoint_disabled_at(database_url)) is None
    again = cli("webhooks", "enable")
    assert again.code == 0
    assert "was not disabled; nothing changed" in again.stdout


def test_list_limit_and_session_filter(cli: Cli, tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    event_id = asyncio.run(_seed_dead_letter(database_url))
    limited = cli("webhooks", "list", "--limit", "1", "--json")
    assert [event["event_id"] for event in limited.json()["events"]] == [event_id]
    assert "showing the newest 1 events; --limit to see more" in limited.stderr
    assert cli("webhooks", "list", "--session", "s-2", "--json").json()["events"] == []
    refused = cli("webhooks", "list", "--limit", "0")
    assert refused.code == 2
    assert "not a whole number greater than 0" in refused.stderr


def test_webhooks_commands_do_not_migrate_the_database(cli: Cli, tmp_path: Path) -> None:
    for args in (["list"], ["resend", "msg_x"], ["enable"]):
        ran = cli("webhooks", *args)
        assert ran.code == 2
        assert "run `liveness-proxy db upgrade`" in ran.stderr
    with sqlite3.connect(tmp_path / "cli.db") as connection:
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == []


# -- beside a running proxy -------------------------------------------------------------------------

# Seconds instead of minutes: the same code, on a schedule a test can wait for.
FAST = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.8",
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
    "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2",
}


def _wait_until(condition: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def test_a_running_proxy_delivers_what_the_cli_resends_and_enables(
    cli: Cli, make_proxy: Callable[..., Any]
) -> None:
    with (
        WebhookReceiver(always=500) as receiver,
        make_proxy(proxy_overrides={**FAST, **receiver.settings()}) as proxy,
    ):
        cli.setenv({"LIVENESS_PROXY_DATABASE_URL": proxy.settings.database_url})
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        proxy.sandbox.complete_session(session_id, live=True, confidence=90.0)

        def dead_letters() -> list[dict[str, Any]]:
            events = cli("webhooks", "list", "--failed", "--json").json()["events"]
            return [event for event in events if event["state"] == "dead"]

        [letter] = _wait_until(dead_letters)
        assert (letter["session_id"], letter["attempts"], letter["last_status"]) == (session_id, 3, 500)
        # The receiver is fixed but answers 410 once: the endpoint is disabled, nothing is lost.
        receiver.always = None
        receiver.script.append(410)
        assert cli("webhooks", "resend", letter["event_id"]).code == 0
        _wait_until(lambda: cli("webhooks", "list", "--json").json()["endpoint"]["disabled"])
        assert receiver.accepted() == []
        assert "re-enabled the webhook endpoint" in cli("webhooks", "enable").stdout
        [delivery] = receiver.wait_for(1)
        [delivered] = _wait_until(
            lambda: [
                e for e in cli("webhooks", "list", "--json").json()["events"] if e["state"] == "delivered"
            ]
        )
        exported = cli("audit", "export")
    assert delivery.webhook_id == letter["event_id"]
    assert delivery.verified
    assert [attempt.answered for attempt in receiver.deliveries] == [500, 500, 500, 410, 200]
    assert delivered["event_id"] == letter["event_id"]
    assert delivered["last_status"] == 200
    assert delivered["delivered_at"] is not None
    records = [orjson.loads(line) for line in exported.stdout.splitlines()]
    system = [record["action"] for record in records if record["kind"] == "system"]
    assert system == ["verdict.record", "webhook.dead_letter", "webhook.disabled", "webhook.delivered"]
    assert {record["action"] for record in records if record["kind"] == "request"} >= {"session.create"}
    assert receiver.secret not in cli.everything_printed()


# -- audit export -----------------------------------------------------------------------------------


def test_audit_export_says_which_records_are_system_events_and_stays_rehashable(
    cli: Cli, tmp_path: Path
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    event_id = asyncio.run(_seed_dead_letter(database_url))
    exported = cli("audit", "export")
    assert exported.code == 0, exported.stderr
    records = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert [(record["action"], record["kind"]) for record in records] == [
        ("session.create", "request"),
        ("verdict.record", "system"),
        ("webhook.dead_letter", "system"),
    ]
    assert records[0]["detail"] is None
    # `detail` is exported as the JSON string that was hashed, so anyone can recompute the chain.
    assert json.loads(records[2]["detail"]) == {"attempts": 2, "event_id": event_id, "status": 500}
    for record in records:
        assert record["record_hash"] == independent_hash(record)
    for earlier, later in itertools.pairwise(records):
        assert later["prev_hash"] == earlier["record_hash"]
