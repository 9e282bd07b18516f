"""Final results served from our own record (issue 21, item 2), through the running proxy against the
sandbox over loopback: a terminal answer is stored with its verdict (`liveness_sessions.final_result`)
and then served without a Cynopsis call (counted at the sandbox), by any process on the database;
never while images may pass; never under another answer-shaping policy; gone with an erasure."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from integration.test_declared_shapes import adding
from integration.test_result_reads import PROBLEM, SOURCE, detail_of, read, records_of, tapped_proxy
from liveness_proxy.store.tables import liveness_sessions, metadata
from support import Harness, LogScan, ProxyHarness, wait_until

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SESSIONS = "/v1/liveness/sessions"
ERASE = "/v1/subjects/erase"
# The finalizer on, on a schedule of seconds (as in test_admin_sessions.py).
FAST_FINALIZER = {
    "LIVENESS_PROXY_FINALIZER": True,
    "LIVENESS_PROXY_FINALIZER_SCHEDULE": "0.2,0.4,0.8",
    "LIVENESS_PROXY_FINALIZER_DEADLINE_SECONDS": 3,
    "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": 0.05,
}


def stored_row(proxy: ProxyHarness, session_id: str) -> dict[str, Any] | None:
    """The session's row as committed (None: there is none)."""

    async def fetch() -> dict[str, Any] | None:
        async with proxy.database() as engine, engine.connect() as connection:
            row = (
                await connection.execute(
                    select(liveness_sessions).where(liveness_sessions.c.session_id == session_id)
                )
            ).first()
        return None if row is None else dict(row._mapping)

    return asyncio.run(fetch())


def stored_copy(proxy: ProxyHarness, session_id: str) -> str | None:
    row = stored_row(proxy, session_id)
    assert row is not None, "no such session row"
    copy: str | None = row["final_result"]
    return copy


def everything_stored(proxy: ProxyHarness) -> str:
    """Every row of every table, as text: where a copy could hide."""

    async def dump() -> str:
        async with proxy.database() as engine, engine.connect() as connection:
            rows = [
                str(dict(row._mapping))
                for table in metadata.sorted_tables
                for row in (await connection.execute(select(table))).all()
            ]
        return "\n".join(rows)

    return asyncio.run(dump())


def completed_session(proxy: ProxyHarness, key: str | None = None) -> str:
    with proxy.client() as client:
        session_id = proxy.create_session(client, key)
    proxy.sandbox.complete_session(session_id, live=True, confidence=98.2)
    return session_id


@contextmanager
def another_process(
    proxy: ProxyHarness, folder: Path, log_scan: LogScan, **overrides: Any
) -> Iterator[ProxyHarness]:
    """A second proxy on the same database (and Redis), talking to the first one's sandbox: its
    caches start empty, as after a restart."""
    folder.mkdir()
    settings = proxy.settings
    shared = {
        "LIVENESS_PROXY_DATABASE_URL": settings.liveness_proxy_database_url.get_secret_value(),
        "LIVENESS_PROXY_REDIS_URL": settings.redis_url,
        "LIVENESS_PROXY_REDIS_KEY_PREFIX": settings.liveness_proxy_redis_key_prefix,
        "CYNOPSIS_TOKEN_URL": settings.cynopsis_token_url,
        "CYNOPSIS_API_BASE_URL": settings.cynopsis_api_base_url,
    }
    with Harness(
        folder,
        proxy_overrides={**shared, **overrides},
        prepared_keys=proxy.keys,
        in_process=True,
        log_scan=log_scan,
        origin="another process",
    ) as running:
        yield running


def test_a_terminal_result_is_stored_with_its_verdict_and_then_served_without_a_call(
    make_backend_proxy: MakeProxy, tmp_path: Path, log_scan: LogScan
) -> None:
    with make_backend_proxy(LIVENESS_PROXY_PASS_THRESHOLD=90) as proxy:
        session_id = completed_session(proxy)
        first = read(proxy, session_id)
        row = stored_row(proxy, session_id)
        later = [read(proxy, session_id), read(proxy, session_id, proxy.keys.admin)]
        calls = proxy.result_reads(session_id)
        records = records_of(proxy, [first, *later])
        with another_process(
            proxy, tmp_path / "restarted", log_scan, LIVENESS_PROXY_PASS_THRESHOLD=95
        ) as again:
            restarted = read(again, session_id)
        calls_after_restart = proxy.result_reads(session_id)
    assert first.status_code == 200
    assert first.headers[SOURCE] == "upstream"
    body = first.json()
    assert body == {
        "session_id": session_id,
        "status": "SUCCEEDED",
        "confidence": 98.2,
        "redacted_fields": ["audit_images", "reference_image"],
        "passed": True,
    }
    # Stored in the verdict's own UPDATE: canonical JSON, under its policy, without `passed`.
    assert row is not None
    assert (row["verdict_status"], row["verdict_confidence"]) == ("SUCCEEDED", 98.2)
    copy = orjson.loads(row["final_result"])
    assert set(copy) == {"policy", "result"}
    assert len(copy["policy"]) == 32
    assert copy["result"] == {name: value for name, value in body.items() if name != "passed"}
    assert row["final_result"] == orjson.dumps(copy, option=orjson.OPT_SORT_KEYS).decode()
    # Then served from the record: no call, the same answer, `passed` derived as it is served.
    for response in later:
        assert (response.status_code, response.headers[SOURCE]) == (200, "stored")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"] == "application/json"
        assert response.json() == body
    assert calls == 1
    assert [(row["upstream_status"], detail_of(row)) for row in records] == [
        (200, {"result_source": "upstream"}),
        (None, {"result_source": "stored"}),
        (None, {"result_source": "stored"}),
    ]
    # Another process (a restart) serves it from the database, under its own threshold.
    assert (restarted.status_code, restarted.headers[SOURCE]) == (200, "stored")
    assert restarted.json() == {**body, "passed": True}
    assert calls_after_restart == 1


def test_a_verdict_the_finalizer_recorded_gets_its_copy_on_the_next_callers_read(
    make_proxy: MakeProxy,
) -> None:
    with make_proxy(proxy_overrides=FAST_FINALIZER) as proxy:
        session_id = completed_session(proxy)

        def recorded() -> dict[str, Any]:
            row = stored_row(proxy, session_id)
            return row if row is not None and row["verdict_status"] is not None else {}

        by_finalizer = wait_until(recorded)
        polls = proxy.result_reads(session_id)
        sources = [read(proxy, session_id).headers[SOURCE] for _ in range(3)]
        copy = stored_copy(proxy, session_id)
        calls = proxy.result_reads(session_id)
    assert by_finalizer["final_result"] is None  # the finalizer stores no answer: nobody was given one
    assert by_finalizer["verdict_request_id"].startswith("fin-")
    assert sources == ["upstream", "stored", "stored"]
    assert copy is not None
    assert orjson.loads(copy)["result"]["status"] == "SUCCEEDED"
    assert calls == polls + 1


INACTIVE = {
    "store off": ({"LIVENESS_PROXY_FINAL_RESULT_STORE": "off"}, "LIVENESS_PROXY_FINAL_RESULT_STORE is off"),
    "images not stripped": (
        {"LIVENESS_PROXY_STRIP_BIOMETRICS": False},
        "LIVENESS_PROXY_STRIP_BIOMETRICS is false",
    ),
    "an image field allowed": (
        {
            "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS": "portrait",
            "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "portrait",
        },
        "LIVENESS_PROXY_BIOMETRIC_ALLOW_FIELDS is set",
    ),
}


@pytest.mark.parametrize("case", sorted(INACTIVE))
def test_while_the_store_is_off_or_images_may_pass_nothing_is_stored_and_every_read_calls(
    make_proxy: MakeProxy, case: str
) -> None:
    overrides, reason = INACTIVE[case]
    with make_proxy(proxy_overrides=overrides) as proxy:
        session_id = completed_session(proxy)
        sources = [read(proxy, session_id).headers[SOURCE] for _ in range(3)]
        row = stored_row(proxy, session_id)
        calls = proxy.result_reads(session_id)
        [started] = proxy.log_events("started")
    assert sources == ["upstream"] * 3
    assert calls == 3
    assert row is not None
    assert row["verdict_status"] == "SUCCEEDED"
    assert row["final_result"] is None
    assert started["final_result_store"] == f"off ({reason})"


def test_a_copy_made_under_another_policy_or_read_with_the_store_off_is_not_served(
    make_proxy: MakeProxy, tmp_path: Path, log_scan: LogScan
) -> None:
    with make_proxy() as proxy:
        [started] = proxy.log_events("started")
        session_id = completed_session(proxy)
        assert read(proxy, session_id).headers[SOURCE] == "upstream"
        first_copy = stored_copy(proxy, session_id)
        with another_process(
            proxy, tmp_path / "off", log_scan, LIVENESS_PROXY_FINAL_RESULT_STORE="off"
        ) as off:
            while_off = [read(off, session_id).headers[SOURCE] for _ in range(2)]
        with another_process(
            proxy, tmp_path / "other-policy", log_scan, LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS="vendor"
        ) as other:
            under_other_policy = [read(other, session_id).headers[SOURCE] for _ in range(2)]
        replaced = stored_copy(proxy, session_id)
        calls = proxy.result_reads(session_id)
    assert started["final_result_store"] == "on"
    assert while_off == ["upstream", "upstream"]
    # Read upstream once, and replaced by a copy under the new policy, which is then served.
    assert under_other_policy == ["upstream", "stored"]
    assert first_copy is not None
    assert replaced is not None
    assert orjson.loads(replaced)["policy"] != orjson.loads(first_copy)["policy"]
    assert calls == 4


def test_no_image_is_ever_stored(make_proxy: MakeProxy) -> None:
    portrait = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8).decode()
    photo = "data:image/png;base64," + portrait
    with tapped_proxy(make_proxy, LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS="portrait,vendor") as (proxy, tap):
        session_id = completed_session(proxy)
        tap.rewrites["result"] = adding({"portrait": portrait, "vendor": {"name": "acme", "photo": photo}})
        answer = read(proxy, session_id)
        copy = stored_copy(proxy, session_id)
        faces = proxy.sandbox.face_images(session_id)
    assert answer.headers[SOURCE] == "upstream"
    assert copy is not None
    result = orjson.loads(copy)["result"]
    assert result["vendor"] == {"name": "acme"}
    assert {"portrait", "reference_image", "audit_images"} <= set(result["redacted_fields"])
    for image in (portrait, photo, *faces):
        assert image[:64] not in copy
    assert "iVBORw0KGg" not in copy


def test_an_erasure_removes_the_stored_copy(make_backend_proxy: MakeProxy) -> None:
    with make_backend_proxy() as proxy:
        admin = proxy.auth(proxy.keys.admin)
        one, other = completed_session(proxy), completed_session(proxy)
        for session_id in (one, other):
            assert read(proxy, session_id).headers[SOURCE] == "upstream"
            assert read(proxy, session_id).headers[SOURCE] == "stored"
        copies = {session_id: stored_copy(proxy, session_id) for session_id in (one, other)}
        with proxy.client() as client:
            assert client.delete(f"{SESSIONS}/{one}", headers=admin).status_code == 200
            after_session_erasure = read(proxy, one), read(proxy, one, proxy.keys.admin)
            one_gone, other_kept = stored_row(proxy, one), stored_row(proxy, other)
            erased = client.post(ERASE, headers=admin, json={"subject": "alice"})
        after_subject_erasure = read(proxy, other, proxy.keys.admin)
        other_gone = stored_row(proxy, other)
        left = everything_stored(proxy)
        calls = proxy.result_reads(one) + proxy.result_reads(other)
    assert all(copy is not None for copy in copies.values())
    assert one_gone is None
    assert other_kept is not None
    assert other_kept["final_result"] == copies[other]
    assert [response.status_code for response in after_session_erasure] == [404, 404]
    assert erased.status_code == 200, erased.text
    assert after_subject_erasure.status_code == 404
    assert after_subject_erasure.json()["type"] == PROBLEM + "not-found"
    assert other_gone is None
    for copy in copies.values():
        assert copy is not None
        assert orjson.loads(copy)["policy"] not in left
        assert orjson.dumps(orjson.loads(copy)["result"]).decode() not in left
    assert calls == 2  # the 404s were answered from the binding's absence, not by Cynopsis


def test_an_answer_holding_anything_shaped_like_a_credential_is_never_stored(
    make_proxy: MakeProxy,
) -> None:
    """An allowed member may hold another reader's credential (an admin's key the end user typed
    into a form field): the first reader's own credentials are not in it, so it is answered, but a
    copy at rest never holds an API key or a JWT; each later read goes upstream, where a reader whose
    credential it holds is refused."""
    with tapped_proxy(make_proxy, LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS="vendor") as (proxy, tap):
        admin_key = proxy.keys.admin
        session_id = completed_session(proxy)
        tap.rewrites["result"] = adding({"vendor": {"note": admin_key}})
        owner = read(proxy, session_id)
        copy_after_owner = stored_copy(proxy, session_id)
        owner_again = read(proxy, session_id)
        admin = read(proxy, session_id, admin_key)
        calls = len(tap.sent("result"))
        [record] = records_of(proxy, [admin])
    assert (owner.status_code, owner.headers[SOURCE]) == (200, "upstream")
    assert copy_after_owner is None
    assert (owner_again.status_code, owner_again.headers[SOURCE]) == (200, "upstream")
    assert admin.status_code == 502
    assert admin.json()["type"] == PROBLEM + "upstream-malformed"
    assert admin_key not in admin.text
    assert (record["problem"], detail_of(record)) == ("upstream-malformed", {"result_source": "upstream"})
    assert calls == 3


def test_an_admins_read_stores_no_copy(make_proxy: MakeProxy) -> None:
    """An answer is checked against the credentials of the read that made the call: an admin's read
    is not checked against the owner's, so only the owner's own read stores a copy."""
    with tapped_proxy(make_proxy) as (proxy, tap):
        session_id = completed_session(proxy)
        admin = read(proxy, session_id, proxy.keys.admin)
        copy_after_admin = stored_copy(proxy, session_id)
        owner = read(proxy, session_id)
        owner_again = read(proxy, session_id)
        admin_again = read(proxy, session_id, proxy.keys.admin)
        calls = len(tap.sent("result"))
    assert (admin.status_code, admin.headers[SOURCE]) == (200, "upstream")
    assert copy_after_admin is None
    assert [answer.headers[SOURCE] for answer in (owner, owner_again, admin_again)] == [
        "upstream",
        "stored",
        "stored",
    ]
    assert calls == 2
