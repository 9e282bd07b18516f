"""Erasure, proven from the outside (issue 19, "Proven"): a subject with a name and a reference of
its own uses a real proxy (JWT and API-key credentials, sessions with and without an Idempotency-Key,
a verdict delivered to a webhook receiver and one it refuses, a session token left unused, a failed
authentication beside it); `liveness-proxy subjects erase` then forgets it. Afterwards:

- SQLite: a byte scan of the database file and its write-ahead log finds neither the name nor the
  reference; PostgreSQL: every row of every table, cast to text, holds neither; Redis: no key under
  the proxy's prefix names the subject or its commitment, and no value holds either;
- the proxy's log never held them, from start to end (the access log carries the commitment);
- `audit verify` passes, `audit export` shows the subject's records erased, `subjects export` is
  empty; tampering with an erased record is still detected;
- a repeat answers zeros, the subject's API key is revoked and names the commitment, and the
  subject can come back under a new commitment.

Every scan is first run before the erasure and must find what it looks for there: a scan that
cannot find anything proves nothing.

The fleet test: two proxies on one PostgreSQL database and Redis, each with caches that would go
on serving the subject (its session binding, its API key for five minutes); the erasure, run by the
CLI beside them, reaches both through the erasure notices within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from integration.test_jwt import AUDIENCE, ISSUER, JwksEndpoint, rsa_jwk, sign
from liveness_proxy.auth import new_api_key
from liveness_proxy.settings import async_database_url
from liveness_proxy.store import ApiKeyStore, AuditLog, JobQueue, create_engine
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import api_keys, audit_records, jobs, metadata, webhook_events
from prepared import SQLITE_NAME, PreparedDatabases
from services import scratch_redis
from support import TEST_KEYS, TEST_PEPPER, Harness, LogScan, ProxyHarness, ServerThread, subprocess_env
from webhook_receiver import WebhookReceiver

# Several `liveness-proxy` runs (about a second each) beside a proxy: 5-10 s per test.
pytestmark = [pytest.mark.slow]

COMMAND = str(Path(sys.executable).parent / "liveness-proxy")
SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
REFERENCE_CLAIM = "application_id"
# What every erasure count is called, in the order `subjects erase --json` gives them.
COUNT_NAMES = (
    "sessions",
    "audit_records",
    "webhook_events_cancelled",
    "webhook_payloads_erased",
    "idempotency_records",
    "session_tokens",
    "api_keys_revoked",
    "redis_keys",
    "subject_secrets",
)


# -- the subject, its credentials, its proxy -----------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A data subject nobody else in the suite shares: its name and reference are markers a scan
    can look for in any byte."""

    name: str
    reference: str
    api_key: str
    api_key_id: str
    jwt: str

    @property
    def markers(self) -> tuple[bytes, bytes]:
        return self.name.encode(), self.reference.encode()

    def by_jwt(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwt}"}

    def by_key(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass(frozen=True)
class Backend:
    """Where a proxy keeps its state: the settings that say so, and how a test reaches it."""

    name: str
    overrides: dict[str, str]
    folder: Path  # the harness's folder (its SQLite file, when SQLite)

    @property
    def database_url(self) -> str:
        return self.overrides.get("LIVENESS_PROXY_DATABASE_URL", f"sqlite:///{self.folder / SQLITE_NAME}")

    @property
    def redis_prefix(self) -> str | None:
        return self.overrides.get("LIVENESS_PROXY_REDIS_KEY_PREFIX")


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_url(signing_key: rsa.RSAPrivateKey) -> Iterator[str]:
    server = ServerThread(JwksEndpoint(keys=[rsa_jwk(signing_key, "rsa-1")]).app(), lifespan="off").start()
    yield f"{server.url}/jwks.json"
    server.stop()


def with_engine(database_url: str, work: Callable[[AsyncEngine], Any]) -> Any:
    """`work(engine)` on an engine of the test's own on the database (only committed rows seen)."""

    async def go() -> Any:
        engine = create_engine(async_database_url(database_url), pool_size=1)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def new_subject(database_url: str, signing_key: rsa.RSAPrivateKey) -> Subject:
    """A subject with a random marker name and reference, an API key in the database (issued before
    the proxy starts, so that every process knows its id at once) and a JWT carrying both."""
    marker = secrets.token_hex(8)
    name, reference = f"subject-{marker}", f"reference-{marker}"
    # An operator names keys after their holder: the key's name must go with the subject too.
    issued = new_api_key(
        pepper=TEST_PEPPER.encode(), subject=name, scopes=[], name=f"laptop of {name}", now=time.time()
    )

    async def add(engine: AsyncEngine) -> None:
        await ApiKeyStore(engine).add(issued.stored)

    with_engine(database_url, add)
    token = sign(signing_key, sub=name, exp=int(time.time()) + 3600, **{REFERENCE_CLAIM: reference})
    return Subject(name, reference, issued.key, issued.key_id, token)


@contextlib.contextmanager
def backend_of(kind: str, prepared: PreparedDatabases, folder: Path) -> Iterator[tuple[Backend, Any]]:
    """A copy of the prepared SQLite database in `folder`, or a clone of the prepared PostgreSQL one
    with a Redis key prefix of the test's own; yields it with the harness's keys."""
    if kind == "sqlite":
        keys = prepared.sqlite(folder / SQLITE_NAME)
        yield Backend(kind, {}, folder), keys
        return
    with prepared.postgres() as (database_url, keys), scratch_redis() as (redis_url, prefix):
        overrides = {
            "LIVENESS_PROXY_DATABASE_URL": database_url,
            "LIVENESS_PROXY_REDIS_URL": redis_url,
            "LIVENESS_PROXY_REDIS_KEY_PREFIX": prefix,
        }
        yield Backend(kind, overrides, folder), keys


def proxy_overrides(backend: Backend, jwks_url: str, **extra: str) -> dict[str, str]:
    return {
        **backend.overrides,
        "LIVENESS_PROXY_JWT_JWKS_URL": jwks_url,
        "LIVENESS_PROXY_JWT_ISSUER": ISSUER,
        "LIVENESS_PROXY_JWT_AUDIENCE": AUDIENCE,
        "LIVENESS_PROXY_JWT_REFERENCE_CLAIM": REFERENCE_CLAIM,
        **extra,
    }


# -- the CLI, as an operator runs it ------------------------------------------------------------------


def cli_env(proxy: ProxyHarness, overrides: dict[str, str], folder: Path) -> dict[str, str]:
    """The proxy's own environment for a `liveness-proxy` run: its upstream, its database, its keys,
    and every setting the test gave it."""
    return subprocess_env(proxy.sandbox_url, folder / SQLITE_NAME, **overrides)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def cli_parallel(env: dict[str, str], *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Commands that write nothing run side by side (each costs about a second of start-up)."""
    processes = [
        subprocess.Popen([COMMAND, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in commands
    ]
    finished = []
    for args, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=60)
        finished.append(subprocess.CompletedProcess([COMMAND, *args], process.returncode, stdout, stderr))
    return finished


def erased_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = orjson.loads(result.stdout)
    assert list(answer["erased"]) == list(COUNT_NAMES)
    return answer


# -- the scans: every byte, every row, every key ---------------------------------------------------------


def sqlite_bytes(folder: Path, *, checkpoint: bool = True) -> bytes:
    """The database file and its write-ahead log, by default after a checkpoint that truncates the
    log (an erasure runs one itself; this one makes sure no reader of the proxy kept it from
    finishing)."""
    database = folder / SQLITE_NAME
    if checkpoint:
        connection = sqlite3.connect(database)
        try:
            busy, _frames, _copied = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            connection.close()
        assert busy == 0, "a reader kept the checkpoint from truncating the write-ahead log"
    wal = database.with_name(database.name + "-wal")
    # Read by another process: closing a descriptor of the file in this one would drop the POSIX
    # locks the in-process proxy's connections hold on it, and the next process to close its last
    # connection would take the write-ahead log from under them ("disk I/O error").
    files = [str(database)] + ([str(wal)] if wal.exists() else [])
    return subprocess.run(["cat", *files], capture_output=True, check=True, timeout=30).stdout


async def postgres_rows(database_url: str) -> dict[str, list[str]]:
    """Every row of every table of the proxy's schema, cast to text, by table."""
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        tables = [
            str(row["table_name"])
            for row in await connection.fetch(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        ]
        rows = {}
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            # The table names come from the catalogue, quoted: no value of anyone's is in the query.
            query = f"SELECT t::text FROM {quoted} t"  # noqa: S608
            rows[table] = [str(row[0]) for row in await connection.fetch(query)]
        return rows
    finally:
        await connection.close()


def redis_contents(url: str, prefix: str) -> dict[bytes, bytes]:
    """Every key under `prefix` and its value (whatever its type), as bytes."""
    client = redis.Redis.from_url(url)
    try:
        contents = {}
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            type_name: Any = client.type(key)  # bytes: the client does not decode
            kind = type_name.decode()
            value: Any
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            else:
                raise AssertionError(f"a Redis key of type {kind} the scan does not read: {key!r}")
            contents[key] = repr(value).encode()
        return contents
    finally:
        client.close()


def found_in(haystack: bytes, *needles: bytes) -> list[bytes]:
    return [needle for needle in needles if needle in haystack]


def held_anywhere(backend: Backend, subject: Subject, commitment: str) -> dict[str, list[str]]:
    """Where the subject's name or reference (and, in Redis, its commitment) is still held: every
    place each scan found one, empty when none did."""
    found: dict[str, list[str]] = {}
    if backend.name == "sqlite":
        in_files = found_in(sqlite_bytes(backend.folder), *subject.markers)
        if in_files:
            found["sqlite"] = [hit.decode() for hit in in_files]
        return found
    tables = asyncio.run(postgres_rows(backend.database_url))
    assert set(metadata.tables) <= set(tables), "the scan missed some of the proxy's tables"
    for table, rows in tables.items():
        hits = [row for row in rows if subject.name in row or subject.reference in row]
        if hits:
            found[f"postgresql {table}"] = hits
    prefix = backend.redis_prefix
    assert prefix is not None
    for key, value in redis_contents(backend.overrides["LIVENESS_PROXY_REDIS_URL"], prefix).items():
        if found_in(key + b" " + value, *subject.markers, commitment.encode()):
            found.setdefault("redis", []).append(key.decode())
    return found


# -- the proxy's database, read and written by the test ------------------------------------------------


def audit_rows(database_url: str) -> list[dict[str, Any]]:
    async def read(engine: AsyncEngine) -> list[dict[str, Any]]:
        return [row async for row in AuditLog(engine, TEST_KEYS.audit).iterate()]

    result: list[dict[str, Any]] = with_engine(database_url, read)
    return result


def verify_with_subjects(database_url: str) -> Any:
    """`audit verify`'s own check, plain subjects against their commitments included."""

    async def check(engine: AsyncEngine) -> Any:
        return await AuditLog(engine, TEST_KEYS.audit).verify(
            subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
        )

    return with_engine(database_url, check)


def set_audit_columns(database_url: str, record_id: int, **values: Any) -> None:
    async def write(engine: AsyncEngine) -> None:
        async with engine.begin() as connection:
            await connection.execute(
                update(audit_records).where(audit_records.c.id == record_id).values(**values)
            )

    with_engine(database_url, write)


def api_key_row(database_url: str, key_id: str) -> dict[str, Any]:
    async def read(engine: AsyncEngine) -> dict[str, Any]:
        async with engine.connect() as connection:
            row = (await connection.execute(select(api_keys).where(api_keys.c.key_id == key_id))).one()
        return dict(row._mapping)

    result: dict[str, Any] = with_engine(database_url, read)
    return result


def delivery_job(database_url: str, session_id: str) -> dict[str, Any] | None:
    async def read(engine: AsyncEngine) -> dict[str, Any] | None:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    select(jobs, webhook_events.c.body, webhook_events.c.delivered_at)
                    .join(webhook_events, webhook_events.c.event_id == jobs.c.ref)
                    .where(jobs.c.kind == "deliver", webhook_events.c.session_id == session_id)
                )
            ).first()
        return None if row is None else dict(row._mapping)

    result: dict[str, Any] | None = with_engine(database_url, read)
    return result


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


# -- what the subject does ----------------------------------------------------------------------------------


def create_session(
    client: httpx.Client, headers: dict[str, str], *, idempotency_key: str | None = None
) -> str:
    token = client.post(SESSION_TOKEN, headers=headers)
    assert token.status_code == 200, token.text
    extra = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    body = {"session_token": token.json()["session_token"]}
    created = client.post(SESSIONS, headers={**headers, **extra}, json=body)
    assert created.status_code == 201, created.text
    if idempotency_key is not None:
        replayed = client.post(SESSIONS, headers={**headers, **extra}, json=body)
        assert replayed.headers.get("idempotent-replayed") == "true"
        assert replayed.json()["session_id"] == created.json()["session_id"]
    session_id: str = created.json()["session_id"]
    return session_id


def read_result(client: httpx.Client, headers: dict[str, str], session_id: str) -> httpx.Response:
    return client.get(f"{SESSIONS}/{session_id}/result", headers=headers)


@dataclass(frozen=True)
class Activity:
    sessions: tuple[str, ...]
    delivered: str  # the session whose verdict reached the receiver
    undelivered: str  # the session whose verdict the receiver keeps refusing
    commitment: str


def act_as_subject(proxy: ProxyHarness, subject: Subject, receiver: WebhookReceiver) -> Activity:
    """Everything a subject leaves behind, each kind once: sessions by JWT (with the reference) and by
    API key, one with an Idempotency-Key, a verdict delivered by webhook and one not (the receiver
    refuses it; its next attempt is a minute away), a session token never used, and beside it a
    failed authentication from the same address."""
    with proxy.client() as client:
        delivered = create_session(client, subject.by_jwt())
        undelivered = create_session(
            client, subject.by_jwt(), idempotency_key=f"order-{secrets.token_hex(4)}"
        )
        by_key = create_session(client, subject.by_key())

        proxy.sandbox.complete_session(delivered, live=True, confidence=97.5)
        answer = read_result(client, subject.by_jwt(), delivered)
        assert (answer.status_code, answer.json().get("status")) == (200, "SUCCEEDED"), answer.text
        [delivery] = receiver.wait_for(1)
        assert delivery.body["data"]["subject"] == subject.name
        assert delivery.body["data"]["reference"] == subject.reference

        receiver.always = 500
        proxy.sandbox.complete_session(undelivered, live=False, confidence=3.0)
        answer = read_result(client, subject.by_key(), undelivered)  # the same subject, by its key
        assert (answer.status_code, answer.json().get("status")) == (200, "FAILED"), answer.text
        refused = wait_until(
            lambda: (
                (job := delivery_job(proxy.settings.database_url, undelivered)) is not None
                and job["attempts"] == 1
                and job["lease_owner"] is None
                and job
            ),
            "the refused delivery",
        )
        assert refused["state"] == "queued"
        assert refused["delivered_at"] is None

        unused = client.post(SESSION_TOKEN, headers=subject.by_key())
        assert unused.status_code == 200
        failed = client.post(SESSION_TOKEN, headers={"Authorization": "Bearer lpk_00000000deadbeef_nope"})
        assert failed.status_code == 401
    proxy.flush_failed_authentications()
    commitment = proxy.access_line(answer.headers["x-request-id"])["subject_commitment"]
    assert isinstance(commitment, str)
    assert len(commitment) == 64
    return Activity((delivered, undelivered, by_key), delivered, undelivered, commitment)


# -- the test ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgres-redis"])
def test_an_erased_subject_is_nowhere_and_the_chain_still_verifies(
    kind: str,
    tmp_path: Path,
    prepared_databases: PreparedDatabases,
    signing_key: rsa.RSAPrivateKey,
    jwks_url: str,
    log_scan: LogScan,
    request: pytest.FixtureRequest,
) -> None:
    with (
        backend_of(kind, prepared_databases, tmp_path) as (backend, keys),
        WebhookReceiver() as receiver,
    ):
        subject = new_subject(backend.database_url, signing_key)
        overrides = proxy_overrides(
            backend,
            jwks_url,
            LIVENESS_PROXY_WORKER_INTERVAL_SECONDS="0.05",
            LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE="0,60",
            **receiver.settings(),
        )
        with Harness(
            tmp_path,
            proxy_overrides=overrides,
            prepared_keys=keys,
            in_process=True,
            log_scan=log_scan,
            origin=request.node.nodeid,
        ) as proxy:
            database_url = proxy.settings.database_url
            env = cli_env(proxy, overrides, tmp_path)
            activity = act_as_subject(proxy, subject, receiver)
            commitment = activity.commitment

            # Before: every scan finds the subject (each can fail), and the access request lists it all.
            before = held_anywhere(backend, subject, commitment)
            if kind == "sqlite":
                assert set(before) == {"sqlite"}
                assert sorted(before["sqlite"]) == sorted([subject.name, subject.reference])
            else:
                for table in ("liveness_sessions", "api_keys", "audit_records", "webhook_events"):
                    assert f"postgresql {table}" in before, before
                assert before["redis"], "no Redis key named the commitment before the erasure"
            access = cli(env, "subjects", "export", subject.name)
            assert access.returncode == 0, access.stderr
            exported = orjson.loads(access.stdout)
            assert exported["commitment"] == commitment
            assert {session["session_id"] for session in exported["sessions"]} == set(activity.sessions)
            assert {session["reference"] for session in exported["sessions"]} == {subject.reference, None}
            assert [key["key_id"] for key in exported["api_keys"]] == [subject.api_key_id]
            assert "secret_hash" not in exported["api_keys"][0]
            assert {event["session_id"] for event in exported["webhook_events"]} == {
                activity.delivered,
                activity.undelivered,
            }
            assert all(
                event["body"]["data"]["subject"] == subject.name for event in exported["webhook_events"]
            )
            records = exported["audit_records"]
            assert records
            assert all(record["subject"] == subject.name for record in records)
            assert all(record["subject_commitment"] == commitment for record in records)

            # What an erasure would do (the Python API, dry run), then the CLI does it.
            planned = proxy.in_process.call(  # type: ignore[union-attr]
                proxy.runtime.erasure.erase_subject(subject.name, request_id="test-dry-run", dry_run=True), 30
            )
            erased = erased_json(cli(env, "subjects", "erase", subject.name, "--json"))
            counts = erased["erased"]
            assert erased["commitment"] == commitment
            assert erased["dry_run"] is False
            assert counts == {
                "sessions": 3,
                "audit_records": len(records),
                "webhook_events_cancelled": 1,
                "webhook_payloads_erased": 1,
                "idempotency_records": 1,
                "session_tokens": 1,
                "api_keys_revoked": 1,
                "redis_keys": counts["redis_keys"],
                "subject_secrets": 1,
            }
            assert (counts["redis_keys"] > 0) == (kind != "sqlite")
            assert planned.dry_run
            assert planned.commitment == commitment
            assert planned.counts.as_dict() == counts, "the dry run did not foresee what the erasure did"

            # (a)-(c): nowhere, in any byte, row or key. On SQLite, first as the erasure left the
            # files: its own checkpoint copied the zeroed pages over the old ones (which the scan
            # before moved into the database file) and emptied the write-ahead log.
            if kind == "sqlite":
                assert found_in(sqlite_bytes(tmp_path, checkpoint=False), *subject.markers) == []
            assert held_anywhere(backend, subject, commitment) == {}

            # (e), (i): the chain verifies; the exports show the records erased, the subject gone;
            # and an operator's resend of the erased event is refused: there is nothing left to send.
            [erased_event] = [
                event["event_id"]
                for event in exported["webhook_events"]
                if event["session_id"] == activity.undelivered
            ]
            verify, audit_export, access, resend = cli_parallel(
                env,
                ("audit", "verify"),
                ("audit", "export"),
                ("subjects", "export", subject.name),
                ("webhooks", "resend", erased_event),
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert verify.stdout.startswith("audit chain OK")
            assert subject.name not in audit_export.stdout
            assert subject.reference not in audit_export.stdout
            exported_records = [orjson.loads(line) for line in audit_export.stdout.splitlines()]
            own = [record for record in exported_records if record["subject_commitment"] == commitment]
            [erasure_event] = [record for record in own if record["action"] == "subject.erased"]
            erased_records = [record for record in own if record["action"] != "subject.erased"]
            assert {record["id"] for record in erased_records} == {record["id"] for record in records}
            assert all(record["erased"] is True and record["subject"] is None for record in erased_records)
            assert erasure_event["subject"] is None
            assert erasure_event["erased"] is False
            assert orjson.loads(erasure_event["detail"]) == counts
            [failed_auth] = [record for record in exported_records if record["action"] == "auth.failed"]
            assert failed_auth["erased"] is False
            assert failed_auth["personal"] is not None
            assert access.returncode == 0, access.stderr
            assert orjson.loads(access.stdout) == {
                "subject": subject.name,
                "commitment": None,
                "sessions": [],
                "api_keys": [],
                "webhook_events": [],
                "audit_records": [],
                "audit_records_erased": 0,
            }

            # The undelivered event was cancelled, the delivered one kept its history; neither has a body.
            cancelled = delivery_job(database_url, activity.undelivered)
            kept = delivery_job(database_url, activity.delivered)
            assert cancelled is not None
            assert kept is not None
            assert (cancelled["state"], cancelled["last_error"], cancelled["body"]) == (
                "cancelled",
                "erased",
                None,
            )
            assert (kept["state"], kept["body"]) == ("done", None)

            assert cancelled["ref"] == erased_event
            assert resend.returncode == 1, resend.stdout
            assert "erased" in resend.stderr
            # Nor does the worker send anything for it if its job is queued again all the same.
            seen = len(receiver.deliveries)

            async def requeue(engine: AsyncEngine) -> bool:
                return await JobQueue(engine).requeue("deliver", cancelled["ref"], now=time.time())

            assert with_engine(database_url, requeue)
            settled = wait_until(
                lambda: (
                    (job := delivery_job(database_url, activity.undelivered)) is not None
                    and (job["state"] != "queued" or len(receiver.deliveries) > seen)
                    and job
                ),
                "the requeued job of the erased event",
            )
            assert len(receiver.deliveries) == seen, "a webhook was sent for an erased event"
            assert (settled["state"], settled["last_error"]) == ("cancelled", "erased")

            # (j): the key is revoked and names the commitment; the proxy refuses it.
            key_row = api_key_row(database_url, subject.api_key_id)
            assert key_row["revoked_at"] is not None
            assert (key_row["subject"], key_row["name"]) == (commitment, "(erased)")
            with proxy.client() as client:
                assert client.post(SESSION_TOKEN, headers=subject.by_key()).status_code == 401

            # (f): tampering with an erased record is still detected: its commitment changed (the
            # HMAC covers it), or the erased name written back (no secret is left to match it).
            target = erased_records[0]
            set_audit_columns(database_url, target["id"], subject_commitment="0" * 64)
            tampered = cli(env, "audit", "verify")
            assert tampered.returncode == 1, tampered.stdout
            assert f"BROKEN at seq {target['seq']} (id {target['id']}): altered" in tampered.stdout
            set_audit_columns(database_url, target["id"], subject_commitment=commitment)
            set_audit_columns(database_url, target["id"], subject=subject.name)
            verdict = verify_with_subjects(database_url)
            assert verdict.problem is not None
            assert (verdict.problem.kind, verdict.problem.seq) == ("orphaned", target["seq"])
            set_audit_columns(database_url, target["id"], subject=None)
            assert verify_with_subjects(database_url).ok

            # (g): a repeat (the Python API, in the running proxy) finds nothing and chains nothing.
            events_before = sum(row["action"] == "subject.erased" for row in audit_rows(database_url))
            again = proxy.in_process.call(  # type: ignore[union-attr]
                proxy.runtime.erasure.erase_subject(subject.name, request_id="test-repeat"), 30
            )
            assert again.commitment is None
            assert again.counts.as_dict() == dict.fromkeys(COUNT_NAMES, 0)
            assert sum(row["action"] == "subject.erased" for row in audit_rows(database_url)) == events_before

            # (h): the subject comes back, under a new commitment.
            with proxy.client() as client:
                back = client.post(SESSION_TOKEN, headers=subject.by_jwt())
            assert back.status_code == 200, back.text
            [record] = [
                row for row in audit_rows(database_url) if row["request_id"] == back.headers["x-request-id"]
            ]
            assert record["subject"] == subject.name
            assert record["subject_commitment"] not in (None, commitment)
            assert (
                proxy.access_line(back.headers["x-request-id"])["subject_commitment"]
                == record["subject_commitment"]
            )
            assert verify_with_subjects(database_url).ok

            # (d): the log, from start to end, never named the subject or its reference; nor do
            # the metrics.
            with proxy.client() as client:
                metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert found_in(metrics.content, *subject.markers) == []
            log = proxy.log_text()
            assert commitment in log  # the access log carries the commitment instead
            assert subject.name not in log
            assert subject.reference not in log


# Timing-bound (the caches must empty within seconds): in the "heavy" group, so that it never runs
# beside the tests that load the machine (see tests/conftest.py).
@pytest.mark.xdist_group("heavy")
def test_an_erasure_reaches_every_proxy_of_the_fleet_within_seconds(
    tmp_path: Path,
    prepared_databases: PreparedDatabases,
    signing_key: rsa.RSAPrivateKey,
    jwks_url: str,
    log_scan: LogScan,
    request: pytest.FixtureRequest,
) -> None:
    """Two proxies on one PostgreSQL database and Redis, at the default worker interval, each
    holding the subject in its caches: the session's binding (which would go on serving the session
    to the subject) and its API key (trusted for five minutes). The CLI erases the subject beside
    them; both empty their caches on the erasure notice, within a few seconds."""
    first_folder, second_folder = tmp_path / "first", tmp_path / "second"
    first_folder.mkdir()
    second_folder.mkdir()
    with backend_of("postgres-redis", prepared_databases, first_folder) as (backend, keys):
        subject = new_subject(backend.database_url, signing_key)
        overrides = proxy_overrides(backend, jwks_url, LIVENESS_PROXY_API_KEY_CACHE_SECONDS="300")

        def harness(folder: Path, **extra: str) -> Harness:
            return Harness(
                folder,
                proxy_overrides={**overrides, **extra},
                prepared_keys=keys,
                in_process=True,
                log_scan=log_scan,
                origin=request.node.nodeid,
            )

        with harness(first_folder) as first:
            # The second proxy calls the first one's sandbox: one upstream, as in a real fleet.
            upstream = {
                "CYNOPSIS_TOKEN_URL": f"{first.sandbox_url}/oauth/token",
                "CYNOPSIS_API_BASE_URL": first.sandbox_url,
            }
            with harness(second_folder, **upstream) as second:
                proxies = {"first": first, "second": second}
                with first.client() as client:
                    session_id = create_session(client, subject.by_jwt())
                first.sandbox.complete_session(session_id, live=True, confidence=90.0)
                for proxy in proxies.values():
                    with proxy.client() as client:
                        assert read_result(client, subject.by_jwt(), session_id).status_code == 200
                        assert client.post(SESSION_TOKEN, headers=subject.by_key()).status_code == 200

                erased = erased_json(
                    cli(cli_env(first, overrides, first_folder), "subjects", "erase", subject.name, "--json")
                )
                assert (erased["erased"]["sessions"], erased["erased"]["api_keys_revoked"]) == (1, 1)
                erased_at = time.monotonic()

                def forgotten(proxy: ProxyHarness) -> bool:
                    with proxy.client() as client:
                        session = read_result(client, subject.by_jwt(), session_id).status_code
                        key = client.post(SESSION_TOKEN, headers=subject.by_key()).status_code
                    assert session in (200, 404), session
                    assert key in (200, 401), key
                    return (session, key) == (404, 401)

                for name, proxy in proxies.items():
                    wait_until(functools.partial(forgotten, proxy), f"the {name} proxy to forget", timeout=10)
                took = time.monotonic() - erased_at
                for proxy in proxies.values():
                    assert subject.name not in proxy.log_text()
    # The notice is polled every worker pass (1 s by default), and nothing else empties these caches.
    assert took < 5.0, f"the proxies forgot the subject {took:.1f} s after its erasure"
