"""The backend can ask: the admin's session list (filters, keyset pages, strict parameters), the
session record (reference, finalizer state, webhook deliveries), `?refresh=true`, and the webhook
events as the OpenAPI document's `webhooks` section describes them."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import jsonschema_rs
import orjson
import pytest
from starlette.requests import HTTPConnection

from liveness_proxy import ADMIN_SCOPE, Caller
from liveness_proxy.sandbox import Fault
from prepared import SQLITE_NAME, PreparedDatabases
from support import Harness, LogScan, ProxyHarness, wait_until
from webhook_receiver import WebhookReceiver

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

SESSIONS = "/v1/liveness/sessions"
# Who the host says is calling, and for which business reference (library mode's hook).
USER_HEADER = "x-test-user"
REFERENCE_HEADER = "x-test-reference"
# 2026-01-01T00:00:00Z: the sessions of the list tests are created at chosen moments after it.
EPOCH = 1_767_225_600.0


async def host_hook(connection: HTTPConnection) -> Caller | None:
    user = connection.headers.get(USER_HEADER)
    if user is None:
        return None
    scopes = frozenset({ADMIN_SCOPE}) if user == "auditor" else frozenset()
    return Caller(
        subject=user,
        scopes=scopes,
        credential_id="host",
        reference=connection.headers.get(REFERENCE_HEADER),
    )


class WallClock:
    """The proxy's wall clock, set by the test: sessions are created at exactly chosen moments."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def admin_proxy(
    request: pytest.FixtureRequest,
    tmp_path: Any,
    prepared_databases: PreparedDatabases,
    log_scan: LogScan,
) -> Iterator[tuple[ProxyHarness, WallClock]]:
    """A proxy with the host hook (for references) and a wall clock of the test's, on each engine."""
    clock = WallClock(EPOCH)
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            database_url, keys = stack.enter_context(prepared_databases.postgres())
            overrides = {"LIVENESS_PROXY_DATABASE_URL": database_url}
        else:
            keys, overrides = prepared_databases.sqlite(tmp_path / SQLITE_NAME), {}
        proxy = stack.enter_context(
            Harness(
                tmp_path,
                proxy_overrides=overrides,
                app_options={"authenticate_caller": host_hook, "wall_clock": clock},
                prepared_keys=keys,
                in_process=True,
                log_scan=log_scan,
                origin=request.node.nodeid,
            )
        )
        yield proxy, clock


def create_as(client: httpx.Client, user: str, reference: str | None = None) -> str:
    headers = {USER_HEADER: user, **({REFERENCE_HEADER: reference} if reference else {})}
    token = client.post("/v1/liveness/session-token", headers=headers).json()["session_token"]
    created = client.post(SESSIONS, headers=headers, json={"session_token": token})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["session_id"]
    return session_id


def listed(client: httpx.Client, proxy: ProxyHarness, **params: str) -> list[str]:
    """The ids of one page (the first), in the order given."""
    response = client.get(SESSIONS, params=params, headers=proxy.auth(proxy.keys.admin))
    assert response.status_code == 200, response.text
    return [session["session_id"] for session in response.json()["sessions"]]


def rfc3339(epoch_seconds: float, offset_hours: int) -> str:
    """The moment as RFC 3339 in another time zone than UTC: the offset must be honoured."""
    zone = dt.timezone(dt.timedelta(hours=offset_hours))
    return dt.datetime.fromtimestamp(epoch_seconds, zone).isoformat()


def test_the_list_filters_by_subject_reference_status_and_creation_time(
    admin_proxy: tuple[ProxyHarness, WallClock],
) -> None:
    proxy, clock = admin_proxy
    created: dict[str, str] = {}
    with proxy.client() as client:
        for name, user, reference, offset in (
            ("zoe-live", "zoe", "app-1", 1000),
            ("zoe-spoof", "zoe", "app-2", 2000),
            ("yann-expired", "yann", "app-1", 3000),
            ("yann-pending", "yann", None, 3000),  # the same moment: the session id breaks the tie
            ("alice-pending", "alice", None, 4000),
        ):
            clock.now = EPOCH + offset
            if user == "alice":
                created[name] = proxy.create_session(client)  # an API key: no reference
            else:
                created[name] = create_as(client, user, reference)
        proxy.sandbox.complete_session(created["zoe-live"], live=True, confidence=96.0)
        proxy.sandbox.complete_session(created["zoe-spoof"], live=False, confidence=3.0)
        proxy.sandbox.expire_session(created["yann-expired"])
        for name, user in (("zoe-live", "zoe"), ("zoe-spoof", "zoe"), ("yann-expired", "yann")):
            read = client.get(f"{SESSIONS}/{created[name]}/result", headers={USER_HEADER: user})
            assert read.status_code == 200, read.text

        def ids(*names: str) -> list[str]:
            return [created[name] for name in names]

        tied = sorted(ids("yann-expired", "yann-pending"), reverse=True)
        everything = listed(client, proxy)
        assert everything == [created["alice-pending"], *tied, *ids("zoe-spoof", "zoe-live")]
        assert listed(client, proxy, subject="zoe") == ids("zoe-spoof", "zoe-live")
        assert listed(client, proxy, reference="app-1") == ids("yann-expired", "zoe-live")
        assert listed(client, proxy, status="SUCCEEDED") == ids("zoe-live")
        assert listed(client, proxy, status="FAILED") == ids("zoe-spoof")
        assert listed(client, proxy, status="EXPIRED") == ids("yann-expired")
        assert listed(client, proxy, status="pending") == ids("alice-pending", "yann-pending")
        # The finalizer is off in this harness: nothing is followed, nothing is unresolved.
        assert listed(client, proxy, status="following") == []
        assert listed(client, proxy, status="unresolved") == []
        # created_after is inclusive, created_before exclusive; the offset is honoured.
        assert listed(client, proxy, created_after=rfc3339(EPOCH + 3000, 2)) == [
            created["alice-pending"],
            *tied,
        ]
        assert listed(client, proxy, created_before=rfc3339(EPOCH + 3000, -5)) == ids("zoe-spoof", "zoe-live")
        assert listed(
            client,
            proxy,
            created_after=rfc3339(EPOCH + 2000, 0).replace("+00:00", "Z"),
            created_before=rfc3339(EPOCH + 2000.001, 9),
        ) == ids("zoe-spoof")
        assert listed(client, proxy, subject="yann", status="pending") == ids("yann-pending")
        assert listed(client, proxy, subject="nobody") == []
        page = client.get(SESSIONS, headers=proxy.auth(proxy.keys.admin)).json()
    assert page["next_cursor"] is None
    records = {record["session_id"]: record for record in page["sessions"]}
    live = records[created["zoe-live"]]
    assert live["reference"] == "app-1"
    assert live["subject"] == "zoe"
    assert live["credential_id"] == "host"
    assert live["finalizer"] == "final"
    assert live["verdict"]["status"] == "SUCCEEDED"
    assert live["created_at"] == "2026-01-01T00:16:40.000+00:00"
    assert "webhooks" not in live  # only the single-session view has them
    assert records[created["alice-pending"]]["reference"] is None
    assert records[created["alice-pending"]]["finalizer"] == "off"
    assert records[created["alice-pending"]]["verdict"] is None


def test_pages_cover_every_session_once_even_while_sessions_are_created(
    admin_proxy: tuple[ProxyHarness, WallClock],
) -> None:
    proxy, clock = admin_proxy
    admin = proxy.auth(proxy.keys.admin)
    with proxy.client() as client:
        made = []
        # Seven sessions, two pairs created at the same moment (ties across a page boundary too).
        for offset in (10, 20, 20, 30, 40, 40, 50):
            clock.now = EPOCH + offset
            made.append(create_as(client, "zoe"))
        pages: list[list[dict[str, Any]]] = []
        cursor: str | None = None
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            response = client.get(SESSIONS, params=params, headers=admin)
            assert response.status_code == 200, response.text
            pages.append(response.json()["sessions"])
            cursor = response.json()["next_cursor"]
            if len(pages) == 1:
                # Created after the first page was read: newer than every page, so it never shows
                # up in one, and shifts nothing.
                clock.now = EPOCH + 60
                late = create_as(client, "zoe")
            if cursor is None:
                break
        fresh_first_page = listed(client, proxy, limit="1")
    assert [len(page) for page in pages] == [3, 3, 1]
    seen = [session["session_id"] for page in pages for session in page]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(made)
    keys = [(session["created_at"], session["session_id"]) for page in pages for session in page]
    assert keys == sorted(keys, reverse=True)
    assert fresh_first_page == [late]


BAD_LIST_QUERIES = [
    "foo=1",
    "stauts=FAILED",  # a misspelt filter must not list every session
    "subject=a&subject=b",
    "status=DONE",
    "status=succeeded",
    "status=",
    "subject=",
    "created_after=2026-01-01",
    "created_after=2026-01-01T00:00:00",  # no offset
    "created_after=2026-01-01 00:00:00Z",
    "created_before=2026-02-30T00:00:00Z",
    "created_before=2026-01-01T00:00:00%2B24:00",
    "limit=0",
    "limit=501",
    "limit=-1",
    "limit=abc",
    "limit=",
    "cursor=!!!",
    "cursor=" + base64.urlsafe_b64encode(b"not json").decode().rstrip("="),
    "cursor=" + base64.urlsafe_b64encode(b'[1.5, "a/b"]').decode().rstrip("="),
    "cursor=" + base64.urlsafe_b64encode(b'[true, "abc"]').decode().rstrip("="),
    "cursor=" + base64.urlsafe_b64encode(b'{"at": 1, "id": "abc"}').decode().rstrip("="),
]


def test_bad_list_parameters_and_non_admins_are_refused_and_every_request_is_audited(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    admin = proxy.auth(proxy.keys.admin)
    for query in BAD_LIST_QUERIES:
        response = client.get(f"{SESSIONS}?{query}", headers=admin)
        assert response.status_code == 400, (query, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == "urn:liveness-proxy:problem:bad-request"
        assert body["request_id"] == response.headers["x-request-id"]
    named = client.get(f"{SESSIONS}?stauts=FAILED", headers=admin).json()["detail"]
    assert "'stauts'" in named
    # A name that is not plainly a name is not repeated back.
    secretish = client.get(f"{SESSIONS}?lpk_0123456789abcdef_Secret1234=1", headers=admin).json()["detail"]
    assert "lpk_" not in secretish
    forbidden = client.get(SESSIONS, headers=proxy.auth())
    assert forbidden.status_code == 403
    assert forbidden.json()["type"] == "urn:liveness-proxy:problem:forbidden"
    assert client.get(SESSIONS).status_code == 401
    largest = client.get(SESSIONS, params={"limit": "500"}, headers=admin)
    assert largest.status_code == 200
    assert largest.json() == {"sessions": [], "next_cursor": None}
    rows = [row for row in proxy.audit_rows() if row["action"] == "session.list"]
    # The 401 is counted in its window's aggregate record instead (test_auth_flood.py).
    assert [row["status"] for row in rows] == [400] * (len(BAD_LIST_QUERIES) + 2) + [403, 200]
    assert {row["subject"] for row in rows if row["status"] == 400} == {"ops"}
    assert rows[-1]["request_id"] == largest.headers["x-request-id"]


def test_refresh_records_a_verdict_nobody_read_and_a_second_refresh_reads_nothing(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    admin = proxy.auth(proxy.keys.admin)
    finished = proxy.create_session(client)
    pending = proxy.create_session(client)
    proxy.sandbox.complete_session(finished, live=True, confidence=91.5)
    before = client.get(f"{SESSIONS}/{finished}", headers=admin).json()
    assert proxy.result_reads(finished) == 0  # without refresh, the record reads nothing upstream
    refreshed = client.get(f"{SESSIONS}/{finished}?refresh=true", headers=admin)
    again = client.get(f"{SESSIONS}/{finished}", params={"refresh": "true"}, headers=admin)
    reads_after_both = proxy.result_reads(finished)
    still_pending = client.get(f"{SESSIONS}/{pending}?refresh=true", headers=admin)
    not_refreshed = client.get(f"{SESSIONS}/{pending}?refresh=false", headers=admin)
    bad = [
        client.get(f"{SESSIONS}/{pending}?{query}", headers=admin)
        for query in ("refresh=yes", "refresh=", "refresh=true&refresh=true", "refresh=TRUE")
    ]
    proxy.sandbox.inject_fault(Fault(target="liveness_result", kind="status", status=500))
    upstream_down = client.get(f"{SESSIONS}/{pending}?refresh=true", headers=admin)
    owner_asks = client.get(f"{SESSIONS}/{pending}?refresh=true", headers=proxy.auth())
    audit = proxy.audit_rows()
    assert before["verdict"] is None
    assert before["finalizer"] == "off"  # the harness runs without the finalizer
    assert before["webhooks"] == []
    assert refreshed.status_code == 200, refreshed.text
    record = refreshed.json()
    assert record["verdict"]["status"] == "SUCCEEDED"
    assert record["verdict"]["confidence"] == 91.5
    assert record["verdict"]["request_id"] == refreshed.headers["x-request-id"]
    assert record["finalizer"] == "final"
    assert again.json()["verdict"] == record["verdict"]
    assert reads_after_both == 1, "a stored verdict is final: the second refresh must not read upstream"
    assert still_pending.status_code == 200
    assert still_pending.json()["verdict"] is None
    assert proxy.result_reads(pending) == 2  # the pending refresh, and the one the fault failed
    assert not_refreshed.status_code == 200
    for response in bad:
        assert response.status_code == 400, response.text
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert upstream_down.status_code == 502
    assert upstream_down.headers["content-type"] == "application/problem+json"
    assert owner_asks.status_code == 403
    [verdict_event] = [row for row in audit if row["action"] == "verdict.record"]
    assert orjson.loads(verdict_event["detail"])["read_by"] == "request"
    assert verdict_event["request_id"] == refreshed.headers["x-request-id"]
    refreshes = [row for row in audit if row["action"] == "session.refresh"]
    assert [(row["status"], row["upstream_status"]) for row in refreshes] == [
        (200, 200),
        (200, None),  # the verdict was stored: nothing was read
        (200, 200),
        (502, 500),
    ]
    # Plain reads, and requests refused before a refresh was understood or allowed.
    reads = [row["status"] for row in audit if row["action"] == "session.read"]
    assert reads == [200, 200, 400, 400, 400, 400, 403]


# The finalizer on, on a schedule of seconds (as in test_verdict_delivery.py).
FAST = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.8",
    "LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS": 3,
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
    "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2",
}


def document_validator(document: dict[str, Any], schema_name: str) -> jsonschema_rs.Validator:
    """A validator of one schema of the served document (`format` checked too)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def test_the_record_shows_the_finalizer_and_every_webhook_delivery_as_documented(
    make_proxy: MakeProxy,
) -> None:
    with (
        WebhookReceiver(always=500) as receiver,
        make_proxy(
            proxy_overrides={**FAST, **receiver.settings()}, app_options={"authenticate_caller": host_hook}
        ) as proxy,
        proxy.client() as client,
    ):
        auditor = {USER_HEADER: "auditor"}  # an admin through the host's hook

        def record(session_id: str) -> dict[str, Any]:
            response = client.get(f"{SESSIONS}/{session_id}", headers=auditor)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        dead, delivered, expired, unresolved = (
            create_as(client, "zoe", reference=f"order-{index}") for index in range(4)
        )
        following = record(dead)
        followed_list = client.get(SESSIONS, params={"status": "following"}, headers=auditor).json()
        # Refused three times (the whole retry schedule): a dead letter.
        proxy.sandbox.complete_session(dead, live=True, confidence=99.0)
        wait_until(lambda: record(dead)["webhooks"] and record(dead)["webhooks"][0]["state"] == "dead")
        receiver.always = None
        proxy.sandbox.complete_session(delivered, live=False, confidence=2.0)
        proxy.sandbox.expire_session(expired)
        # Those two are read at their next offset; nobody finishes the last one: past the deadline
        # it is unresolved, and announced.
        wait_until(lambda: len(receiver.accepted()) >= 3)
        # The receiver has answered; the proxy records the delivery just after: wait for that too.
        wait_until(
            lambda: all(
                record(session_id)["webhooks"] and record(session_id)["webhooks"][0]["state"] == "delivered"
                for session_id in (delivered, expired, unresolved)
            )
        )
        records = {session_id: record(session_id) for session_id in (dead, delivered, expired, unresolved)}
        unresolved_list = client.get(SESSIONS, params={"status": "unresolved"}, headers=auditor).json()
        document = client.get("/openapi.json").json()
    assert following["finalizer"] == "following"
    assert following["reference"] == "order-0"
    assert following["webhooks"] == []
    assert {session["session_id"] for session in followed_list["sessions"]} == {
        dead,
        delivered,
        expired,
        unresolved,
    }
    [letter] = records[dead]["webhooks"]
    assert letter["type"] == "liveness.session.completed"
    assert letter["attempts"] == 3
    assert (letter["last_status"], letter["last_error"]) == (500, "HTTP 500")
    assert letter["delivered_at"] is None
    assert letter["next_attempt_at"] is None
    assert records[dead]["finalizer"] == "final"
    assert records[dead]["verdict"]["request_id"].startswith("fin-")  # the finalizer read it
    by_id = {delivery.webhook_id: delivery for delivery in receiver.accepted()}
    for session_id, event_type in (
        (delivered, "liveness.session.completed"),
        (expired, "liveness.session.expired"),
        (unresolved, "liveness.session.unresolved"),
    ):
        [event] = records[session_id]["webhooks"]
        assert event["type"] == event_type
        assert event["state"] == "delivered"
        assert event["attempts"] == 1
        assert event["last_status"] == 200
        assert event["last_error"] is None
        assert event["delivered_at"] is not None
        assert by_id[event["event_id"]].body["data"]["session_id"] == session_id
    assert records[unresolved]["finalizer"] == "unresolved"
    assert records[unresolved]["verdict"] is None
    assert [session["session_id"] for session in unresolved_list["sessions"]] == [unresolved]
    # Every record is what the document promises.
    record_schema = document_validator(document, "SessionRecord")
    for body in records.values():
        record_schema.validate(body)
    # Every event received is what the document's `webhooks` section promises: body and headers.
    webhooks = document["webhooks"]
    assert set(webhooks) == {
        "liveness.session.completed",
        "liveness.session.expired",
        "liveness.session.unresolved",
        "liveness.ping",  # sent only by `liveness-proxy webhooks test`
    }
    for delivery in receiver.deliveries:
        operation = webhooks[delivery.body["type"]]["post"]
        body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
        schema_name = body_schema["$ref"].rsplit("/", 1)[1]
        document_validator(document, schema_name).validate(delivery.body)
        headers = {parameter["name"]: parameter["schema"]["pattern"] for parameter in operation["parameters"]}
        assert re.search(headers["webhook-id"], delivery.webhook_id)
        assert re.search(headers["webhook-timestamp"], str(delivery.timestamp))
        assert re.search(headers["webhook-signature"], delivery.signature)
