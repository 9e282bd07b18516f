"""Collapsed polls (issue 21, item 1), through the running proxy against the sandbox over loopback:
concurrent result reads of one session share one Cynopsis call (counted at the sandbox), a recent
answer is reused for LIVENESS_PROXY_RESULT_REUSE_SECONDS on the proxy's clock, and every caller is
still authenticated, checked for ownership, checked for its own credential in the answer and audited
on its own, its record saying where its answer came from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

import httpx
import orjson
import pytest

from integration.test_declared_shapes import Tap, adding
from liveness_proxy.sandbox import Fault
from liveness_proxy.store import AuditLog
from liveness_proxy.store.subjects import SubjectRegistry
from support import TEST_AUDIT_KEYS, TEST_KEYS, ProxyHarness, ServerThread, wait_until

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
SESSIONS = "/v1/liveness/sessions"
SOURCE = "x-liveness-result-source"
PROBLEM = "urn:liveness-proxy:problem:"
# Long enough for every concurrent reader to join the one call in flight.
SLOW_UPSTREAM = {"CYNOPSIS_TIMEOUT_SECONDS": 5.0}


def read(
    proxy: ProxyHarness, session_id: str, key: str | None = None, *, timeout: float = 10
) -> httpx.Response:
    with proxy.client() as client:
        return client.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(key), timeout=timeout)


def in_background(
    pool: ThreadPoolExecutor,
    proxy: ProxyHarness,
    session_id: str,
    key: str | None = None,
    *,
    timeout: float = 10,
) -> Future[httpx.Response]:
    return pool.submit(read, proxy, session_id, key, timeout=timeout)


def slow_result(proxy: ProxyHarness, seconds: float) -> None:
    """The next result read upstream answers after `seconds`."""
    proxy.sandbox.inject_fault(Fault(target="liveness_result", kind="latency", delay_seconds=seconds))


def detail_of(row: dict[str, Any]) -> Any:
    return None if row["detail"] is None else orjson.loads(row["detail"])


def records_of(proxy: ProxyHarness, responses: list[httpx.Response]) -> list[dict[str, Any]]:
    rows = {row["request_id"]: row for row in proxy.audit_rows()}
    return [rows[response.headers["x-request-id"]] for response in responses]


def verify_chain(proxy: ProxyHarness) -> None:
    async def verify() -> None:
        async with proxy.database() as engine:
            verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(
                subjects=SubjectRegistry(engine, TEST_KEYS.subjects)
            )
        assert verdict.ok, verdict.problem

    asyncio.run(verify())


def reads_counted(proxy: ProxyHarness, source: str) -> float:
    value = proxy.runtime.metrics.registry.get_sample_value(
        "liveness_proxy_result_reads_total", {"source": source}
    )
    return 0.0 if value is None else value


def test_64_concurrent_reads_of_a_pending_session_make_one_upstream_call(
    make_backend_proxy: MakeProxy,
) -> None:
    with make_backend_proxy(**SLOW_UPSTREAM) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        slow_result(proxy, 1.5)
        with ThreadPoolExecutor(max_workers=64) as pool:
            responses = list(pool.map(lambda _: read(proxy, session_id), range(64)))
        calls = proxy.result_reads(session_id)
        records = records_of(proxy, responses)
        counted = {source: reads_counted(proxy, source) for source in ("upstream", "shared", "stored")}
        verify_chain(proxy)
    assert calls == 1
    assert [response.status_code for response in responses] == [200] * 64
    assert {response.json()["status"] for response in responses} == {"CREATED"}
    assert len({response.content for response in responses}) == 1  # one answer, encoded once
    sources = sorted(response.headers[SOURCE] for response in responses)
    assert sources == ["shared"] * 63 + ["upstream"]
    assert all(response.headers["cache-control"] == "no-store" for response in responses)
    # 64 records, one each, saying what its caller was told (the shared ones name the call's status).
    assert [(row["action"], row["status"], row["session_id"]) for row in records] == [
        ("result.read", 200, session_id)
    ] * 64
    assert sorted(detail_of(row)["result_source"] for row in records) == sources
    assert {row["upstream_status"] for row in records} == {200}
    assert counted == {"upstream": 1.0, "shared": 63.0, "stored": 0.0}


def test_another_subject_is_refused_during_a_flight_and_an_admin_joins_it(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides=SLOW_UPSTREAM) as proxy, ThreadPoolExecutor(4) as pool:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        slow_result(proxy, 1.5)
        owner = in_background(pool, proxy, session_id)
        wait_until(lambda: proxy.result_reads(session_id) == 1)  # the call is out
        foreign = read(proxy, session_id, proxy.keys.bob)  # answered while the call is still out
        still_in_flight = not owner.done()
        admin = in_background(pool, proxy, session_id, proxy.keys.admin)
        answers = owner.result(), admin.result()
        calls = proxy.result_reads(session_id)
        [foreign_record] = records_of(proxy, [foreign])
    assert still_in_flight
    assert foreign.status_code == 404
    assert foreign.json()["type"] == PROBLEM + "not-found"
    assert SOURCE not in foreign.headers
    assert "CREATED" not in foreign.text
    # Refused before any sharing: its record names no source and no upstream answer.
    assert (foreign_record["status"], foreign_record["upstream_status"], foreign_record["detail"]) == (
        404,
        None,
        None,
    )
    assert [(answer.status_code, answer.headers[SOURCE]) for answer in answers] == [
        (200, "upstream"),
        (200, "shared"),
    ]
    assert calls == 1


def test_a_recent_answer_is_reused_for_the_window_on_the_proxys_clock(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_RESULT_REUSE_SECONDS": 0.5}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        sources = [read(proxy, session_id).headers[SOURCE]]
        proxy.clock.advance(0.4)
        sources.append(read(proxy, session_id, proxy.keys.admin).headers[SOURCE])
        calls_within = proxy.result_reads(session_id)
        proxy.clock.advance(0.2)  # 0.6 s after the answer arrived
        sources.append(read(proxy, session_id).headers[SOURCE])
        calls_after = proxy.result_reads(session_id)
    assert sources == ["upstream", "shared", "upstream"]
    assert (calls_within, calls_after) == (1, 2)


def test_with_a_window_of_0_every_sequential_read_calls_upstream(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_RESULT_REUSE_SECONDS": 0}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        sources = [read(proxy, session_id).headers[SOURCE] for _ in range(3)]
        calls = proxy.result_reads(session_id)
    assert sources == ["upstream"] * 3
    assert calls == 3


def test_a_starter_that_goes_away_does_not_fail_the_callers_waiting_on_its_call(
    make_proxy: MakeProxy,
) -> None:
    """The call runs in the task of the read that started it: when that read's client goes away,
    the call goes with it, and a read that was waiting on it makes the call itself."""
    with make_proxy(proxy_overrides=SLOW_UPSTREAM) as proxy, ThreadPoolExecutor(4) as pool:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        slow_result(proxy, 1.0)
        starter = in_background(pool, proxy, session_id, timeout=0.5)
        wait_until(lambda: proxy.result_reads(session_id) == 1)
        waiting = in_background(pool, proxy, session_id)
        with pytest.raises(httpx.ReadTimeout):
            starter.result()  # the starter's request is cancelled in the proxy
        follower = waiting.result()
        calls = proxy.result_reads(session_id)
        rows = proxy.audit_rows()
    assert (follower.status_code, follower.headers[SOURCE]) == (200, "upstream")
    assert follower.json()["status"] == "CREATED"
    assert calls == 2
    [cancelled] = [row for row in rows if row["action"] == "result.read" and row["status"] == 499]
    assert (cancelled["problem"], detail_of(cancelled)) == ("cancelled", {"result_source": "upstream"})
    [answered] = [row for row in rows if row["action"] == "result.read" and row["status"] == 200]
    assert detail_of(answered) == {"result_source": "upstream"}


def test_a_failed_call_is_shared_by_its_waiting_callers_only_and_never_reused(make_proxy: MakeProxy) -> None:
    # The window is long, and the clock stands still: only a failure's not being kept makes a new call.
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_RESULT_REUSE_SECONDS": 5}) as proxy,
        ThreadPoolExecutor(8) as pool,
    ):
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        # The upstream hangs; the proxy gives up after CYNOPSIS_TIMEOUT_SECONDS (1 s in tests).
        proxy.sandbox.inject_fault(Fault(target="liveness_result", kind="timeout", hang_seconds=10))
        first = in_background(pool, proxy, session_id)
        wait_until(lambda: proxy.result_reads(session_id) == 1)
        waiting = [in_background(pool, proxy, session_id, key) for key in (None, proxy.keys.admin, None)]
        failed = [first.result(), *(future.result() for future in waiting)]
        after = read(proxy, session_id)
        calls = proxy.result_reads(session_id)
        records = records_of(proxy, failed)
    assert [response.status_code for response in failed] == [504] * 4
    assert {response.json()["type"] for response in failed} == {PROBLEM + "upstream-timeout"}
    assert len({response.headers["x-request-id"] for response in failed}) == 4
    assert [(row["status"], row["problem"]) for row in records] == [(504, "upstream-timeout")] * 4
    assert sorted(detail_of(row)["result_source"] for row in records) == ["shared"] * 3 + ["upstream"]
    assert (after.status_code, after.headers[SOURCE]) == (200, "upstream")
    assert calls == 2


@contextlib.contextmanager
def tapped_proxy(make_proxy: MakeProxy, **overrides: Any) -> Iterator[tuple[ProxyHarness, Tap]]:
    """A proxy whose liveness calls go through a `Tap` (test_declared_shapes.py) to its sandbox."""
    tap = Tap()
    server = ServerThread(tap, lifespan="off").start()
    try:
        with make_proxy(proxy_overrides={"CYNOPSIS_API_BASE_URL": server.url, **overrides}) as proxy:
            tap.target = proxy.sandbox_url
            yield proxy, tap
    finally:
        server.stop()


def test_a_follower_whose_credential_is_in_the_shared_answer_is_refused(make_proxy: MakeProxy) -> None:
    """The starter's credentials are looked for by the call itself; an answer shared with an admin
    who joins it, or reuses it, is looked through for the admin's own, by the same check."""
    with tapped_proxy(make_proxy, LIVENESS_PROXY_RESULT_REUSE_SECONDS=5, **SLOW_UPSTREAM) as (proxy, tap):
        admin_key = proxy.keys.admin
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        tap.rewrites["result"] = adding({"trace": {"echo": admin_key}})
        owner = read(proxy, session_id)  # holds no credential of the owner's: answered
        admin = read(proxy, session_id, admin_key)  # reused, and refused
        owner_again = read(proxy, session_id)
        calls = len(tap.sent("result"))
        records = records_of(proxy, [owner, admin, owner_again])
        everything = b"\n".join(proxy.responses).decode() + str(proxy.audit_rows()) + proxy.log_text()
        # And one joining the call while it is in flight.
        proxy.clock.advance(10)
        slow_result(proxy, 1.0)
        with ThreadPoolExecutor(2) as pool:
            started = in_background(pool, proxy, session_id)
            wait_until(lambda: proxy.result_reads(session_id) == 2)
            joined = read(proxy, session_id, admin_key)
            started_answer = started.result()
    assert (owner.status_code, owner.headers[SOURCE]) == (200, "upstream")
    assert "trace" in owner.json()["redacted_fields"]
    assert admin.status_code == 502
    assert admin.json()["type"] == PROBLEM + "upstream-malformed"
    assert (owner_again.status_code, owner_again.headers[SOURCE]) == (200, "shared")
    assert calls == 1
    assert [(row["status"], detail_of(row)["result_source"]) for row in records] == [
        (200, "upstream"),
        (502, "shared"),
        (200, "shared"),
    ]
    assert records[1]["problem"] == "upstream-malformed"
    assert admin_key not in everything
    assert (started_answer.status_code, joined.status_code) == (200, 502)


def test_an_erasure_drops_the_reused_answers(make_proxy: MakeProxy) -> None:
    with make_proxy(proxy_overrides={"LIVENESS_PROXY_RESULT_REUSE_SECONDS": 5}) as proxy:
        with proxy.client() as client:
            kept, erased = proxy.create_session(client), proxy.create_session(client)
            first = [read(proxy, session_id).headers[SOURCE] for session_id in (kept, erased)]
            reused = read(proxy, kept).headers[SOURCE]
            assert (
                client.delete(f"{SESSIONS}/{erased}", headers=proxy.auth(proxy.keys.admin)).status_code == 200
            )
            gone = read(proxy, erased)
            after = read(proxy, kept).headers[SOURCE]
        flights = proxy.runtime.result_flights
        left = flights.reused
    assert (first, reused) == (["upstream", "upstream"], "shared")
    assert gone.status_code == 404
    # An erasure empties every reused answer of this process (the owner cache with it).
    assert after == "upstream"
    assert left == 1


def test_the_header_is_exposed_to_browsers(make_proxy: MakeProxy) -> None:
    origin = "https://app.example"
    with (
        make_proxy(proxy_overrides={"LIVENESS_PROXY_CORS_ORIGINS": origin}) as proxy,
        proxy.client() as client,
    ):
        session_id = proxy.create_session(client)
        response = client.get(f"{SESSIONS}/{session_id}/result", headers={**proxy.auth(), "Origin": origin})
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert SOURCE in exposed
    assert response.headers[SOURCE] == "upstream"
