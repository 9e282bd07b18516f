"""The admin's erasure routes over HTTP: `POST /v1/subjects/erase` forgets a subject (its sessions,
verdicts, idempotency records, session-token bindings, Redis keys, API keys, the plain values of its
audit records, its secret) and `DELETE /v1/liveness/sessions/{id}` one session; the audit chain still
verifies, the subject's name is left in no audit record and no log line, a repeat answers zeros,
and a subject who comes back starts with a new secret. On SQLite, and on PostgreSQL with Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import orjson
import pytest
from starlette.requests import HTTPConnection

from liveness_proxy import Caller
from liveness_proxy.auth import new_api_key
from liveness_proxy.settings import async_database_url
from liveness_proxy.store import ApiKeyStore, AuditLog, create_engine
from liveness_proxy.store.subjects import SubjectRegistry
from prepared import SQLITE_NAME, PreparedDatabases
from services import scratch_redis
from support import TEST_AUDIT_KEYS, TEST_KEYS, TEST_PEPPER, Harness, LogScan, ProxyHarness

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

ERASE = "/v1/subjects/erase"
SESSIONS = "/v1/liveness/sessions"
SESSION_TOKEN = "/v1/liveness/session-token"
# Who the host says is calling, and for which business reference (library mode's hook): a subject
# can then come back after its erasure (its API keys are revoked by it).
USER_HEADER = "x-test-user"
REFERENCE_HEADER = "x-test-reference"
# Names no log line and no audit record may hold once erased; distinctive, so a scan cannot miss.
SUBJECT = "erin.erasable-5c1d9e"
REFERENCE = "order-erin-77aa03"
OTHER = "frank-keeps-4b2e"
ZEROS = {
    "sessions": 0,
    "audit_records": 0,
    "webhook_events_cancelled": 0,
    "webhook_payloads_erased": 0,
    "idempotency_records": 0,
    "session_tokens": 0,
    "api_keys_revoked": 0,
    "redis_keys": 0,
    "subject_secrets": 0,
}


async def host_hook(connection: HTTPConnection) -> Caller | None:
    user = connection.headers.get(USER_HEADER)
    if user is None:
        return None
    return Caller(
        subject=user,
        scopes=frozenset(),
        credential_id="host",
        reference=connection.headers.get(REFERENCE_HEADER),
    )


@dataclass
class ErasureProxy:
    proxy: ProxyHarness
    backend: str
    # An API key of SUBJECT's, issued before the proxy started.
    subject_key: str

    @property
    def admin(self) -> dict[str, str]:
        return self.proxy.auth(self.proxy.keys.admin)


def add_api_key(database_url: str, subject: str) -> str:
    async def add() -> str:
        engine = create_engine(async_database_url(database_url), pool_size=1)
        try:
            issued = new_api_key(
                pepper=TEST_PEPPER.encode(), subject=subject, scopes=[], name="mobile app", now=time.time()
            )
            await ApiKeyStore(engine).add(issued.stored)
            return issued.key
        finally:
            await engine.dispose()

    return asyncio.run(add())


@pytest.fixture(params=["sqlite", "postgres-redis"])
def erasure_proxy(
    request: pytest.FixtureRequest, tmp_path: Path, prepared_databases: PreparedDatabases, log_scan: LogScan
) -> Iterator[ErasureProxy]:
    """A proxy with the host hook, and an API key of SUBJECT's besides, on each backend."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgres-redis":
            database_url, keys = stack.enter_context(prepared_databases.postgres())
            redis_url, prefix = stack.enter_context(scratch_redis())
            overrides = {
                "LIVENESS_PROXY_DATABASE_URL": database_url,
                "LIVENESS_PROXY_REDIS_URL": redis_url,
                "LIVENESS_PROXY_REDIS_KEY_PREFIX": prefix,
            }
        else:
            keys = prepared_databases.sqlite(tmp_path / SQLITE_NAME)
            database_url, overrides = f"sqlite:///{tmp_path / SQLITE_NAME}", {}
        subject_key = add_api_key(database_url, SUBJECT)
        proxy = stack.enter_context(
            Harness(
                tmp_path,
                proxy_overrides=overrides,
                app_options={"authenticate_caller": host_hook},
                prepared_keys=keys,
                in_process=True,
                log_scan=log_scan,
                origin=request.node.nodeid,
            )
        )
        yield ErasureProxy(proxy, request.param, subject_key)


def as_user(user: str, reference: str | None = None) -> dict[str, str]:
    return {USER_HEADER: user, **({REFERENCE_HEADER: reference} if reference else {})}


def create_as(client: httpx.Client, headers: dict[str, str], idempotency_key: str | None = None) -> str:
    token = client.post(SESSION_TOKEN, headers=headers).json()["session_token"]
    extra = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    created = client.post(SESSIONS, headers={**headers, **extra}, json={"session_token": token})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["session_id"]
    return session_id


def listed(client: httpx.Client, setup: ErasureProxy, **params: str) -> set[str]:
    response = client.get(SESSIONS, params=params, headers=setup.admin)
    assert response.status_code == 200, response.text
    return {session["session_id"] for session in response.json()["sessions"]}


def erase(
    client: httpx.Client, headers: dict[str, str], subject: str, *, dry_run: bool | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"subject": subject}
    if dry_run is not None:
        body["dry_run"] = dry_run
    return client.post(ERASE, headers=headers, json=body)


def verify_chain(proxy: ProxyHarness) -> None:
    """`audit verify` with the subjects' secrets: every plain value still present matches its
    commitment, and the chain is whole."""

    async def verify() -> None:
        async with proxy.database() as engine:
            verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(
                subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
            )
        assert verdict.ok, verdict.problem

    asyncio.run(verify())


def result_schema(client: httpx.Client) -> jsonschema_rs.Validator:
    """The served document's ErasureResult: closed, every count present."""
    document = client.get("/openapi.json").json()
    schema = {"$ref": "#/components/schemas/ErasureResult", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def commitments_of(rows: list[dict[str, Any]], subject: str) -> set[str]:
    return {row["subject_commitment"] for row in rows if row["subject"] == subject}


def test_erasing_a_subject_forgets_it_everywhere_and_the_chain_still_verifies(
    erasure_proxy: ErasureProxy,
) -> None:
    setup, proxy = erasure_proxy, erasure_proxy.proxy
    erin, frank = as_user(SUBJECT, REFERENCE), as_user(OTHER, "order-frank-1")
    with proxy.client() as client:
        schema = result_schema(client)
        # Erin's sessions: two through the host's hook (one with an Idempotency-Key, and one read to
        # a verdict), one with her API key; a session token she never used; Frank's one session.
        finished = create_as(client, erin, idempotency_key="erin-create-1")
        pending = create_as(client, erin)
        by_key = proxy.create_session(client, setup.subject_key)
        assert client.post(SESSION_TOKEN, headers=erin).status_code == 200
        kept = create_as(client, frank)
        proxy.sandbox.complete_session(finished, live=True, confidence=97.0)
        read = client.get(f"{SESSIONS}/{finished}/result", headers=erin)
        assert read.status_code == 200, read.text
        assert (
            client.get(f"{SESSIONS}/{finished}", headers=setup.admin).json()["verdict"]["status"]
            == "SUCCEEDED"
        )
        erins = {finished, pending, by_key}
        assert listed(client, setup, subject=SUBJECT) == erins
        before = proxy.audit_rows()
        [commitment] = commitments_of(before, SUBJECT)
        plain_records = sum(row["subject_commitment"] == commitment for row in before)

        # A dry run counts and changes nothing.
        dry = erase(client, setup.admin, SUBJECT, dry_run=True)
        assert dry.status_code == 200, dry.text
        after_dry_run = proxy.audit_rows()
        still_listed = listed(client, setup, subject=SUBJECT)
        key_still_works = client.post(SESSION_TOKEN, headers=proxy.auth(setup.subject_key)).status_code

        erased = erase(client, setup.admin, SUBJECT)
        assert erased.status_code == 200, erased.text
        repeat = erase(client, setup.admin, SUBJECT)
        rows = proxy.audit_rows()
        proxy.access_line(repeat.headers["x-request-id"])  # the last line written: the log is whole
        log = proxy.log_text()
        verify_chain(proxy)
        listed_after = listed(client, setup)
        record_after = client.get(f"{SESSIONS}/{finished}", headers=setup.admin)
        key_after = client.post(SESSION_TOKEN, headers=proxy.auth(setup.subject_key))
        # Erin comes back (through the host; her API key is revoked): she starts with a new secret,
        # and her old session is not hers any more.
        result_after = client.get(f"{SESSIONS}/{pending}/result", headers=erin)
        returns = client.post(SESSION_TOKEN, headers=erin)
        rows_after_return = proxy.audit_rows()
    for response in (dry, erased, repeat):
        schema.validate(response.json())
    # The dry run: what the erasure then did, minus what it counts only as it goes (the session token
    # it found unused in the database or Redis, after the dry run used none of it).
    assert dry.json()["dry_run"] is True
    assert dry.json()["commitment"] == commitment
    would = dry.json()["erased"]
    assert would["sessions"] == 3
    assert would["api_keys_revoked"] == 1
    assert would["subject_secrets"] == 1
    assert would["idempotency_records"] == 1
    assert would["audit_records"] == plain_records
    assert still_listed == erins
    assert key_still_works == 200
    # Nothing was changed: the dry run's only trace is its own audit record (under the admin).
    assert after_dry_run[: len(before)] == before
    [dry_record] = after_dry_run[len(before) :]
    assert (dry_record["action"], dry_record["subject"], dry_record["status"]) == (
        "subject.erase",
        "ops",
        200,
    )

    body = erased.json()
    assert body["dry_run"] is False
    assert body["commitment"] == commitment
    counts = body["erased"]
    # +1: the session-token request that showed her key still worked after the dry run.
    assert counts["audit_records"] == plain_records + 1
    assert counts["sessions"] == 3
    assert counts["api_keys_revoked"] == 1
    assert counts["subject_secrets"] == 1
    assert counts["idempotency_records"] == 1
    # Two unused session tokens: the one obtained above, and the dry run's check.
    assert counts["session_tokens"] == 2
    if setup.backend == "postgres-redis":
        assert counts["redis_keys"] > 0  # her limit counters, named after her commitment
    else:
        assert counts["redis_keys"] == 0
    # Her sessions are gone for the admin and for her; Frank's stays.
    assert listed_after == {kept}
    assert record_after.status_code == 404
    assert result_after.status_code == 404
    assert key_after.status_code == 401
    # A repeat finds nothing.
    assert repeat.status_code == 200
    assert repeat.json() == {"commitment": None, "dry_run": False, "erased": ZEROS}

    # Her name and reference are in no audit record and no log line.
    for row in rows:
        text = orjson.dumps(row, default=str).decode()
        assert SUBJECT not in text, row
        assert REFERENCE not in text, row
    assert SUBJECT not in log
    assert REFERENCE not in log
    # Her requests were logged, under her commitment.
    logged = {line["request_id"]: line for line in proxy.log_events("request")}
    assert logged[read.headers["x-request-id"]]["subject_commitment"] == commitment
    for row in rows:
        if row["subject_commitment"] == commitment and row["action"] != "subject.erased":
            assert (row["subject"], row["personal"]) == (None, None), row
            assert row["erased_at"] is not None, row
    # Frank's records keep their plain subject.
    assert {row["subject"] for row in rows if row["session_id"] == kept} == {OTHER}
    # Each erasure request is audited under the admin, never under the subject; the chain holds one
    # `subject.erased` event with the commitment and the counts (the repeat erased nothing: none).
    requests = [row for row in rows if row["action"] == "subject.erase"]
    assert [(row["subject"], row["status"]) for row in requests] == [("ops", 200)] * 3
    assert requests[1]["request_id"] == erased.headers["x-request-id"]
    [event] = [row for row in rows if row["action"] == "subject.erased"]
    assert event["subject_commitment"] == commitment
    assert event["subject"] is None
    assert event["request_id"] == erased.headers["x-request-id"]
    assert orjson.loads(event["detail"]) == counts

    # Back again: a new secret, so a new commitment, on her new records.
    assert returns.status_code == 200, returns.text
    assert [row["status"] for row in rows_after_return if row["subject"] == SUBJECT] == [404, 200]
    new_commitments = commitments_of(rows_after_return, SUBJECT)
    assert len(new_commitments) == 1
    assert commitment not in new_commitments


def test_erasing_one_session_leaves_the_subjects_other_sessions_and_records(
    erasure_proxy: ErasureProxy,
) -> None:
    setup, proxy = erasure_proxy, erasure_proxy.proxy
    erin = as_user(SUBJECT, REFERENCE)
    with proxy.client() as client:
        schema = result_schema(client)
        gone, stays = create_as(client, erin), create_as(client, erin)
        proxy.sandbox.complete_session(gone, live=False, confidence=4.0)
        assert client.get(f"{SESSIONS}/{gone}/result", headers=erin).status_code == 200
        before = proxy.audit_rows()
        [commitment] = commitments_of(before, SUBJECT)
        of_gone = sum(row["session_id"] == gone for row in before)

        dry = client.delete(f"{SESSIONS}/{gone}", params={"dry_run": "true"}, headers=setup.admin)
        still_there = listed(client, setup)
        erased = client.delete(f"{SESSIONS}/{gone}", headers=setup.admin)
        repeat = client.delete(f"{SESSIONS}/{gone}", params={"dry_run": "false"}, headers=setup.admin)
        unknown = client.delete(f"{SESSIONS}/never-created-0001", headers=setup.admin)
        rows = proxy.audit_rows()
        verify_chain(proxy)
        listed_after = listed(client, setup)
        owner_reads = client.get(f"{SESSIONS}/{gone}/result", headers=erin)
        other_reads = client.get(f"{SESSIONS}/{stays}/result", headers=erin)
    for response in (dry, erased, repeat, unknown):
        assert response.status_code == 200, response.text
        schema.validate(response.json())
    assert dry.json() == {
        "commitment": commitment,
        "dry_run": True,
        "erased": {**ZEROS, "sessions": 1, "audit_records": of_gone},
    }
    assert still_there == {gone, stays}
    assert erased.json() == {
        "commitment": commitment,
        "dry_run": False,
        "erased": {**ZEROS, "sessions": 1, "audit_records": of_gone},
    }
    assert listed_after == {stays}
    assert owner_reads.status_code == 404
    assert other_reads.status_code == 200
    # Idempotent, and an unknown session is answered the same way.
    assert repeat.json() == {"commitment": None, "dry_run": False, "erased": ZEROS}
    assert unknown.json() == {"commitment": None, "dry_run": False, "erased": ZEROS}
    # The erased session's records lost their plain values; the subject's others kept theirs.
    # Each request is audited under the admin. Its record does not name the session (the erasure
    # would erase it too, and a repeat would not answer zeros): the chained event does, under the
    # request's id.
    requests = [row for row in rows if row["action"] == "session.erase"]
    assert [(row["subject"], row["session_id"], row["status"]) for row in requests] == [
        ("ops", None, 200)
    ] * 4
    assert requests[1]["request_id"] == erased.headers["x-request-id"]
    of_subject = [
        row for row in rows if row["subject_commitment"] == commitment and row["action"] != "session.erased"
    ]
    for row in of_subject:
        if row["session_id"] == gone:
            assert (row["subject"], row["personal"]) == (None, None), row
            assert row["erased_at"] is not None, row
        else:
            assert (row["subject"], row["erased_at"]) == (SUBJECT, None), row
    assert any(row["session_id"] == stays for row in of_subject)
    [event] = [row for row in rows if row["action"] == "session.erased"]
    assert (event["session_id"], event["subject_commitment"]) == (gone, commitment)
    assert event["request_id"] == erased.headers["x-request-id"]


BAD_BODIES: list[tuple[str, dict[str, str], bytes, int]] = [
    ("missing subject", {"Content-Type": "application/json"}, b"{}", 422),
    ("extra member", {"Content-Type": "application/json"}, b'{"subject": "x", "reason": "gdpr"}', 422),
    ("subject of the wrong type", {"Content-Type": "application/json"}, b'{"subject": 5}', 422),
    (
        "dry_run as a string",
        {"Content-Type": "application/json"},
        b'{"subject": "x", "dry_run": "true"}',
        422,
    ),
    ("empty subject", {"Content-Type": "application/json"}, b'{"subject": ""}', 422),
    ("subject too long", {"Content-Type": "application/json"}, orjson.dumps({"subject": "s" * 256}), 422),
    ("not an object", {"Content-Type": "application/json"}, b'["x"]', 422),
    ("not JSON", {"Content-Type": "application/json"}, b"subject=x", 400),
    ("no body", {"Content-Type": "application/json"}, b"", 400),
    ("form-encoded", {"Content-Type": "application/x-www-form-urlencoded"}, b"subject=x", 415),
    ("no content type", {}, b'{"subject": "x"}', 415),
]


def test_bad_bodies_and_non_admins_are_refused_and_erase_nothing(erasure_proxy: ErasureProxy) -> None:
    setup, proxy = erasure_proxy, erasure_proxy.proxy
    erin = as_user(SUBJECT, REFERENCE)
    with proxy.client() as client:
        session_id = create_as(client, erin)
        before = proxy.audit_rows()
        refused = {
            name: client.post(ERASE, headers={**setup.admin, **headers}, content=content)
            for name, headers, content, _ in BAD_BODIES
        }
        # The admin's own subject: its request's audit record would outlive the secret.
        own = erase(client, setup.admin, "ops", dry_run=False)
        # A non-admin (alice's key, and Erin herself) is refused before the body is read.
        not_admin = [
            erase(client, proxy.auth(), SUBJECT),
            erase(client, proxy.auth(setup.subject_key), SUBJECT),
            client.delete(f"{SESSIONS}/{session_id}", headers=proxy.auth()),
            client.delete(f"{SESSIONS}/{session_id}", headers=erin),
        ]
        bad_queries = [
            client.delete(f"{SESSIONS}/{session_id}?{query}", headers=setup.admin)
            for query in ("dry_run=yes", "dry_run=", "dry_run=true&dry_run=true", "dry_run=TRUE")
        ]
        malformed_id = client.delete(f"{SESSIONS}/not.a.session", headers=setup.admin)
        unauthenticated = erase(client, {}, SUBJECT)
        still_listed = listed(client, setup, subject=SUBJECT)
        rows = proxy.audit_rows()
        verify_chain(proxy)
    for name, _, _, status in BAD_BODIES:
        response = refused[name]
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert '"reason"' in refused["extra member"].json()["detail"]
    assert own.status_code == 422, own.text
    assert "its own subject" in own.json()["detail"]
    for response in not_admin:
        assert response.status_code == 403, response.text
        assert response.json()["type"] == "urn:liveness-proxy:problem:forbidden"
    for response in [*bad_queries, malformed_id]:
        assert response.status_code == 400, response.text
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert unauthenticated.status_code == 401
    # Nothing was erased: her session is listed, her records keep their plain values.
    assert still_listed == {session_id}
    assert rows[: len(before)] == before
    assert all(row["erased_at"] is None for row in rows)
    assert not [row for row in rows if row["action"] in ("subject.erased", "session.erased")]
    # Every refusal is audited (the 401 in its window's aggregate record instead), under the caller.
    erase_requests = [(row["subject"], row["status"]) for row in rows if row["action"] == "subject.erase"]
    assert erase_requests == [("ops", status) for _, _, _, status in BAD_BODIES] + [
        ("ops", 422),
        ("alice", 403),
        (SUBJECT, 403),
    ]
    session_requests = [(row["subject"], row["status"]) for row in rows if row["action"] == "session.erase"]
    assert session_requests == [("alice", 403), (SUBJECT, 403)] + [("ops", 400)] * 5


def test_the_body_stays_closed_whatever_extra_body_fields_the_operator_allows(make_proxy: MakeProxy) -> None:
    """LIVENESS_PROXY_EXTRA_BODY_FIELDS opens the bodies that go upstream; this one never does."""
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_EXTRA_BODY_FIELDS": "metadata"}) as proxy,
        proxy.client() as client,
    ):
        admin = proxy.auth(proxy.keys.admin)
        refused = client.post(ERASE, headers=admin, json={"subject": "nobody-here", "metadata": {}})
        accepted = client.post(ERASE, headers=admin, json={"subject": "nobody-here"})
        document = client.get("/openapi.json").json()
    assert refused.status_code == 422, refused.text
    assert accepted.status_code == 200
    # Never known: nothing to erase, and no secret was made for it by asking.
    assert accepted.json() == {"commitment": None, "dry_run": False, "erased": ZEROS}
    assert document["components"]["schemas"]["EraseSubjectRequest"]["additionalProperties"] is False
    assert "metadata" not in document["components"]["schemas"]["EraseSubjectRequest"]["properties"]
