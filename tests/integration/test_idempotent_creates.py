"""Idempotent creates (issue 17, item 5), through the running proxy and a real sandbox upstream: a
create's answer is stored per (subject, Idempotency-Key) once its Cynopsis call went out, a success or
an upstream error, and replayed with `Idempotent-Replayed: true` for the TTL without a call or an
attempt; a refusal before the call is not stored; another body is 422, a repeat in flight 409; a
crashed request's lease lapses, and an answer that outlives its lease is kept unless another request
holds the key by then; all of it fleet-wide on PostgreSQL.

The tests share one proxy per database (see `test_session_token_binding.py`: a fresh UTC day of its
wall clock per test, and `CAP` daily attempts, which show that a replay counts none).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from integration.test_session_token_binding import (
    CAP,
    Shared,
    audit_row,
    create,
    creates,
    session_token,
    shared_proxy,
    spend_the_daily_cap,
)
from liveness_proxy.api.idempotency import canonical
from liveness_proxy.sandbox import Fault
from liveness_proxy.store import create_engine, upgrade_database
from liveness_proxy.store.idempotency import Claimed, IdempotencyRecords, InFlight, Replay, StoredAnswer
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import idempotency_keys
from liveness_proxy.store.write_batch import BatchedWrites
from liveness_proxy.wiring import request_policy
from prepared import PreparedDatabases
from support import TEST_KEYS, ProxyHarness, wait_until

SESSIONS = "/v1/liveness/sessions"
PROBLEM = "urn:liveness-proxy:problem:"
ORIGIN = "https://app.example"
# A slow create (latency fault) must end well within the upstream timeout, even on a busy machine.
UPSTREAM_TIMEOUT_SECONDS = 5.0
SLOW_CREATE_SECONDS = 0.5


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_proxy(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prepared_databases: PreparedDatabases,
) -> Iterator[Shared]:
    overrides = {
        "CYNOPSIS_TIMEOUT_SECONDS": UPSTREAM_TIMEOUT_SECONDS,
        "LIVENESS_PROXY_CORS_ORIGINS": ORIGIN,
    }
    with shared_proxy(
        request, tmp_path_factory.mktemp("idempotency"), prepared_databases, **overrides
    ) as running:
        yield running


@pytest.fixture
def shared(module_proxy: Shared) -> Iterator[Shared]:
    """The module's proxy, on a fresh UTC day (`Shared.fresh`)."""
    with module_proxy.fresh() as running:
        yield running


def new_key() -> str:
    return secrets.token_urlsafe(16)


def replayed(response: httpx.Response) -> bool:
    return bool(response.headers.get("idempotent-replayed") == "true")


def without_request_id(problem: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in problem.items() if name != "request_id"}


# --- replay -------------------------------------------------------------------------------------------


def test_a_repeat_is_replayed_without_a_call_or_an_attempt(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        token = session_token(proxy, client)
        first = create(proxy, client, token, idempotency_key=key)
        # The same request, differently spelled: member order and whitespace do not make another.
        spelled = f'{{ "session_token" :  "{token}" }}'.encode()
        headers = {**proxy.auth(), "Idempotency-Key": key, "Content-Type": "application/json"}
        repeats = [client.post(SESSIONS, headers=headers, content=spelled) for _ in range(CAP + 1)]
        calls = creates(proxy)
        rows = [audit_row(proxy, repeat) for repeat in repeats]
        spend_the_daily_cap(proxy, client, spent=1)  # the first create only: no replay counted
    assert first.status_code == 201, first.text
    assert not replayed(first)
    for repeat in repeats:
        assert repeat.status_code == 201
        assert replayed(repeat)
        assert repeat.content == first.content
        assert repeat.headers["location"] == first.headers["location"]
        assert repeat.headers["content-type"] == first.headers["content-type"]
        assert repeat.headers["x-request-id"] != first.headers["x-request-id"]
    assert calls == 1
    session_id = first.json()["session_id"]
    for row in rows:
        # Audited, never forwarded, and never counted as a second session: its own action.
        assert (row["action"], row["session_id"], row["status"], row["upstream_status"]) == (
            "session.replay",
            session_id,
            201,
            None,
        )


def test_the_same_key_with_another_body_is_refused_and_leaves_that_token_alone(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        first, other = session_token(proxy, client), session_token(proxy, client)
        assert create(proxy, client, first, idempotency_key=key).status_code == 201
        reused = create(proxy, client, other, idempotency_key=key)
        calls = creates(proxy)
        with_its_own_key = create(proxy, client, other, idempotency_key=new_key())
    assert reused.status_code == 422
    assert reused.json()["type"] == PROBLEM + "idempotency-key-reused"
    assert calls == 1
    assert with_its_own_key.status_code == 201, with_its_own_key.text  # the refusal did not take it


@pytest.mark.parametrize(
    "values",
    [["k" * 65], ["has space"], ["dotted.key"], ["slash/key"], [""], ["same", "same"], ["one", "two"]],
    ids=["65-chars", "space", "dot", "slash", "empty", "twice-the-same", "two-different"],
)
def test_a_malformed_key_is_refused_before_anything(shared: Shared, values: list[str]) -> None:
    proxy = shared.proxy
    with proxy.client() as client:
        token = session_token(proxy, client)
        headers = [*proxy.auth().items(), *(("Idempotency-Key", value) for value in values)]
        refused = client.post(SESSIONS, headers=headers, json={"session_token": token})
        calls = creates(proxy)
        longest = create(proxy, client, token, idempotency_key=new_key().ljust(64, "9"))
    assert refused.status_code == 400, refused.text
    assert refused.json()["type"] == PROBLEM + "bad-request"
    assert "Idempotency-Key" in refused.json()["detail"]
    assert calls == 0
    assert longest.status_code == 201, longest.text  # 64 characters is a key; the token was untouched


@pytest.mark.parametrize(
    ("fault", "status", "slug"),
    [
        (Fault(target="liveness_session", kind="status", status=500), 502, "upstream-unavailable"),
        (Fault(target="liveness_session", kind="status", status=409), 409, "upstream-rejected"),
        (Fault(target="liveness_session", kind="malformed"), 502, "upstream-malformed"),
    ],
    ids=["500", "409", "malformed"],
)
def test_an_upstream_error_after_the_call_is_stored_and_replayed(
    shared: Shared, fault: Fault, status: int, slug: str
) -> None:
    proxy = shared.proxy
    key = new_key()
    proxy.sandbox.inject_fault(fault)
    with proxy.client() as client:
        token = session_token(proxy, client)
        failed = create(proxy, client, token, idempotency_key=key)
        repeat = create(proxy, client, token, idempotency_key=key)
    assert failed.status_code == status, failed.text
    assert failed.json()["type"] == PROBLEM + slug
    assert not replayed(failed)
    assert repeat.status_code == status
    assert replayed(repeat)
    assert repeat.headers["content-type"] == "application/problem+json"
    # The stored problem, naming the request that got it this time.
    assert without_request_id(repeat.json()) == without_request_id(failed.json())
    assert repeat.json()["request_id"] == repeat.headers["x-request-id"] != failed.headers["x-request-id"]
    assert creates(proxy) == 1


# --- refusals before the call are not stored ------------------------------------------------------------


def test_an_invalid_body_is_not_stored(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        token = session_token(proxy, client)
        headers = {**proxy.auth(), "Idempotency-Key": key}
        invalid = client.post(SESSIONS, headers=headers, json={"session_token": token, "bogus": 1})
        valid = create(proxy, client, token, idempotency_key=key)
    assert invalid.status_code == 422
    assert invalid.json()["type"] == PROBLEM + "unprocessable-content"
    assert valid.status_code == 201, valid.text  # neither "reused" nor a replay of the 422
    assert not replayed(valid)
    assert creates(proxy) == 1


def test_a_refused_session_token_is_not_stored(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        foreign = session_token(proxy, client, proxy.keys.bob)
        refusals = [create(proxy, client, foreign, idempotency_key=key) for _ in range(2)]
        own = create(proxy, client, session_token(proxy, client), idempotency_key=key)
    for refusal in refusals:
        assert refusal.status_code == 422
        assert refusal.json()["type"] == PROBLEM + "session-token-invalid"
        assert not replayed(refusal)  # each one refused afresh
    assert own.status_code == 201, own.text  # the key is free: neither "reused" nor a replay
    assert not replayed(own)
    assert creates(proxy) == 1


def test_a_daily_cap_refusal_is_not_stored(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    shared.before_midnight(60)
    with proxy.client() as client:
        for _ in range(CAP):
            assert create(proxy, client, session_token(proxy, client)).status_code == 201
        token = session_token(proxy, client)
        refused = create(proxy, client, token, idempotency_key=key)
        shared.wall.advance(120)  # the next UTC day
        retried = create(proxy, client, token, idempotency_key=key)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "daily_attempts"
    assert retried.status_code == 201, retried.text
    assert not replayed(retried)
    assert creates(proxy) == CAP + 1


# --- in flight, leases, subjects, TTL ----------------------------------------------------------------


def test_a_duplicate_while_the_first_is_in_flight_gets_409(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client, proxy.client() as other_client:
        token, other_token = session_token(proxy, client), session_token(proxy, client)
        proxy.sandbox.inject_fault(
            Fault(target="liveness_session", kind="latency", delay_seconds=SLOW_CREATE_SECONDS)
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(create, proxy, client, token, None, key)
            wait_until(lambda: creates(proxy) == 1)  # the first create's call is at the sandbox
            duplicate = create(proxy, other_client, token, idempotency_key=key)
            other_body = create(proxy, other_client, other_token, idempotency_key=key)
            first = slow.result()
        after = create(proxy, client, token, idempotency_key=key)
    assert duplicate.status_code == 409, duplicate.text
    assert duplicate.json()["type"] == PROBLEM + "idempotency-key-in-flight"
    assert duplicate.headers["retry-after"] == "1"
    assert other_body.status_code == 422
    assert other_body.json()["type"] == PROBLEM + "idempotency-key-reused"
    assert first.status_code == 201, first.text
    assert replayed(after)
    assert after.content == first.content
    assert creates(proxy) == 1


async def alice_commitment(engine: AsyncEngine) -> str:
    """What alice's idempotency records are keyed by (the hash of her commitment, never her name)."""
    found = await SubjectRegistry(engine, TEST_KEYS.subjects).resolve("alice")
    return found.commitment


async def crashed_claim(proxy: ProxyHarness, key: str, token: str) -> Claimed:
    """What a request that crashed after claiming `key` leaves behind: a record in flight, with the
    lease this proxy gives its requests (claimed through the store, on an engine of the test's own)."""
    lease = request_policy(proxy.settings).idempotency_lease_seconds
    async with proxy.database() as engine:
        writes = BatchedWrites(engine)
        claimed = await IdempotencyRecords(writes).begin(
            proxy.runtime.hashes.subject(await alice_commitment(engine)),
            key,
            proxy.runtime.hashes.fingerprint(canonical({"session_token": token})),
            now=proxy.runtime.wall_clock(),
            lease_seconds=lease,
            ttl_seconds=proxy.settings.liveness_proxy_idempotency_ttl_seconds,
        )
        await writes.close()
    assert isinstance(claimed, Claimed)
    return claimed


async def late_completion(proxy: ProxyHarness, key: str, owner: str) -> bool:
    """The crashed request's answer, arriving after its lease was taken over."""
    async with proxy.database() as engine:
        writes = BatchedWrites(engine)
        try:
            return await IdempotencyRecords(writes).complete(
                proxy.runtime.hashes.subject(await alice_commitment(engine)),
                key,
                owner,
                "fingerprint-of-the-crashed-request",
                StoredAnswer(status=502, content_type="application/problem+json", body=b"{}"),
                now=proxy.runtime.wall_clock(),
                ttl_seconds=proxy.settings.liveness_proxy_idempotency_ttl_seconds,
            )
        finally:
            await writes.close()


def test_a_crashed_requests_lease_lapses_and_the_key_is_taken_over(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    lease = request_policy(proxy.settings).idempotency_lease_seconds
    with proxy.client() as client:
        token = session_token(proxy, client)
        crashed = asyncio.run(crashed_claim(proxy, key, token))
        while_leased = create(proxy, client, token, idempotency_key=key)
        calls_while_leased = creates(proxy)
        shared.wall.advance(lease + 1)
        taken_over = create(proxy, client, token, idempotency_key=key)
        stale_completed = asyncio.run(late_completion(proxy, key, crashed.owner))
        repeat = create(proxy, client, token, idempotency_key=key)
    assert while_leased.status_code == 409
    assert while_leased.json()["type"] == PROBLEM + "idempotency-key-in-flight"
    assert calls_while_leased == 0
    assert taken_over.status_code == 201, taken_over.text
    assert not replayed(taken_over)
    assert not stale_completed  # fenced: the crashed request's lease is gone
    assert replayed(repeat)
    assert repeat.content == taken_over.content
    assert creates(proxy) == 1


NOT_STORED = "idempotency_answer_not_stored"


def test_an_answer_outliving_its_lease_is_kept_when_the_takeover_was_refused(shared: Shared) -> None:
    """The first create is still at a slow upstream when its lease lapses; a repeat takes the key
    over and is refused before its call (the token is spent), dropping the record: the first
    create's answer, arriving then, is stored all the same, and replayed for the key."""
    proxy = shared.proxy
    key = new_key()
    lease = request_policy(proxy.settings).idempotency_lease_seconds
    warnings_before = len(proxy.log_events(NOT_STORED))
    with proxy.client() as client, proxy.client() as other_client:
        token = session_token(proxy, client)
        proxy.sandbox.inject_fault(
            Fault(target="liveness_session", kind="latency", delay_seconds=SLOW_CREATE_SECONDS)
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(create, proxy, client, token, None, key)
            wait_until(lambda: creates(proxy) == 1)  # the first create's call is at the sandbox
            shared.wall.advance(lease + 1)
            taken_over = create(proxy, other_client, token, idempotency_key=key)
            first = slow.result()
        later = create(proxy, client, token, idempotency_key=key)
        warnings = len(proxy.log_events(NOT_STORED)) - warnings_before
    assert taken_over.status_code == 422, taken_over.text  # a claim, refused by the binding
    assert taken_over.json()["type"] == PROBLEM + "session-token-invalid"
    assert not replayed(taken_over)
    assert first.status_code == 201, first.text
    assert replayed(later)
    assert later.content == first.content
    assert later.headers["location"] == first.headers["location"]
    assert warnings == 0  # nothing was lost
    assert creates(proxy) == 1


def test_an_answer_outliving_its_lease_yields_to_the_request_that_took_the_key_over(shared: Shared) -> None:
    """As above, but the request that took the lapsed key over (with another token) made a session
    of its own: its answer stands for the key, and the first one's is dropped with a warning."""
    proxy = shared.proxy
    key = new_key()
    lease = request_policy(proxy.settings).idempotency_lease_seconds
    warnings_before = len(proxy.log_events(NOT_STORED))
    with proxy.client() as client, proxy.client() as other_client:
        token, other_token = session_token(proxy, client), session_token(proxy, client)
        proxy.sandbox.inject_fault(
            Fault(target="liveness_session", kind="latency", delay_seconds=SLOW_CREATE_SECONDS)
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(create, proxy, client, token, None, key)
            wait_until(lambda: creates(proxy) == 1)
            shared.wall.advance(lease + 1)
            taken_over = create(proxy, other_client, other_token, idempotency_key=key)
            first = slow.result()
        later = create(proxy, client, other_token, idempotency_key=key)
        warnings = proxy.log_events(NOT_STORED)[warnings_before:]
    assert taken_over.status_code == first.status_code == 201
    assert not replayed(taken_over)
    assert replayed(later)
    assert later.content == taken_over.content
    assert [warning["status"] for warning in warnings] == [201]
    assert creates(proxy) == 2


def test_keys_are_per_subject(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        alice = create(proxy, client, session_token(proxy, client), idempotency_key=key)
        bob_token = session_token(proxy, client, proxy.keys.bob)
        bob = create(proxy, client, bob_token, proxy.keys.bob, idempotency_key=key)
        bob_again = create(proxy, client, bob_token, proxy.keys.bob, idempotency_key=key)
    assert alice.status_code == bob.status_code == 201
    assert not replayed(bob)
    assert bob.json()["session_id"] != alice.json()["session_id"]
    assert replayed(bob_again)
    assert bob_again.content == bob.content
    assert creates(proxy) == 2


def test_an_answer_is_replayed_for_the_ttl_only(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    ttl = proxy.settings.liveness_proxy_idempotency_ttl_seconds
    with proxy.client() as client:
        token = session_token(proxy, client)
        first = create(proxy, client, token, idempotency_key=key)
        shared.wall.advance(ttl - 1)
        within = create(proxy, client, token, idempotency_key=key)
        shared.wall.advance(2)
        # Another body under the same key: after the TTL it is a new request, not "reused".
        after = create(proxy, client, session_token(proxy, client), idempotency_key=key)
    assert first.status_code == 201, first.text
    assert replayed(within)
    assert within.content == first.content
    assert after.status_code == 201, after.text
    assert not replayed(after)
    assert after.json()["session_id"] != first.json()["session_id"]
    assert creates(proxy) == 2


def test_the_record_holds_keyed_hashes_of_the_subject_and_the_request(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        token = session_token(proxy, client)
        assert create(proxy, client, token, idempotency_key=key).status_code == 201

    async def records() -> list[Any]:
        async with proxy.database() as engine, engine.connect() as connection:
            rows = await connection.execute(
                select(idempotency_keys).where(idempotency_keys.c.idempotency_key == key)
            )
            return list(rows)

    [row] = asyncio.run(records())
    assert row.subject_hash == proxy.runtime.hashes.subject(proxy.commitment_of("alice") or "")
    # Over the subject's commitment, not its name: an erasure leaves the row unlinkable to "alice".
    assert row.subject_hash != proxy.runtime.hashes.subject("alice")
    assert row.subject_hash != hashlib.sha256(b"alice").hexdigest()
    # The request holds the session token: a plain hash of it would let a reader of the table test
    # guesses of the token (or confirm one) against the fingerprint.
    request = canonical({"session_token": token})
    assert row.fingerprint == proxy.runtime.hashes.fingerprint(request)
    assert row.fingerprint != hashlib.sha256(request).hexdigest()
    for clear in ("alice", token, token.removeprefix("sst_")):
        assert clear not in repr(tuple(row))


# --- fleet-wide ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_proxy", ["postgres"], indirect=True)
def test_two_replicas_on_one_database_share_in_flight_keys_and_replays(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with shared.companion() as other, proxy.client() as here, other.client() as there:
        token = session_token(proxy, here)
        proxy.sandbox.inject_fault(
            Fault(target="liveness_session", kind="latency", delay_seconds=SLOW_CREATE_SECONDS)
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(create, proxy, here, token, None, key)
            wait_until(lambda: creates(proxy) == 1)
            in_flight_there = create(other, there, token, idempotency_key=key)
            first = slow.result()
        replayed_there = create(other, there, token, idempotency_key=key)
    assert in_flight_there.status_code == 409, in_flight_there.text
    assert in_flight_there.json()["type"] == PROBLEM + "idempotency-key-in-flight"
    assert first.status_code == 201, first.text
    assert replayed(replayed_there)
    assert replayed_there.content == first.content
    assert replayed_there.headers["location"] == first.headers["location"]
    assert creates(proxy) == 1


# --- browsers -------------------------------------------------------------------------------------------


def test_browsers_may_send_the_key_and_read_the_replay_mark(shared: Shared) -> None:
    proxy = shared.proxy
    key = new_key()
    with proxy.client() as client:
        preflight = client.options(
            SESSIONS,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        token = session_token(proxy, client)
        headers = {**proxy.auth(), "Origin": ORIGIN, "Idempotency-Key": key}
        client.post(SESSIONS, headers=headers, json={"session_token": token})
        repeat = client.post(SESSIONS, headers=headers, json={"session_token": token})
    assert preflight.status_code == 204, preflight.text
    allowed = {name.strip().lower() for name in preflight.headers["access-control-allow-headers"].split(",")}
    assert "idempotency-key" in allowed
    assert replayed(repeat)
    assert repeat.headers["access-control-allow-origin"] == ORIGIN
    exposed = {name.strip().lower() for name in repeat.headers["access-control-expose-headers"].split(",")}
    assert "idempotent-replayed" in exposed


# --- the batched writer ---------------------------------------------------------------------------------


def test_answers_settled_in_one_batch_are_each_stored_even_when_one_lease_was_lost(
    tmp_path: pathlib.Path,
) -> None:
    """Answers queued together are stored by one statement for the batch (SQLite's executemany).
    When one of them lost its lease, the batch's count falls short, and each answer is then settled
    on its own: the others are still stored (not reported lost), the lost one is not."""

    async def scenario() -> tuple[list[bool], list[Any]]:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'batch.db'}")
        await upgrade_database(engine, keys=TEST_KEYS)
        writes = BatchedWrites(engine)
        records = IdempotencyRecords(writes)
        try:
            claims = [
                await records.begin(
                    "subject", f"key-{n}", "fp", now=1000.0, lease_seconds=60, ttl_seconds=600
                )
                for n in range(4)
            ]
            owners = [claim.owner for claim in claims if isinstance(claim, Claimed)]
            assert len(owners) == 4
            # key-3's lease lapses and another request takes it over before the first answers.
            taken_over = await records.begin(
                "subject", "key-3", "fp", now=1061.0, lease_seconds=60, ttl_seconds=600
            )
            assert isinstance(taken_over, Claimed)
            answers = [StoredAnswer(201, "application/json", f'{{"n":{n}}}'.encode()) for n in range(4)]
            settled = await asyncio.gather(
                *(
                    records.complete(
                        "subject", f"key-{n}", owners[n], "fp", answers[n], now=1062.0, ttl_seconds=600
                    )
                    for n in range(4)
                )
            )
            again = [
                await records.begin(
                    "subject", f"key-{n}", "fp", now=1063.0, lease_seconds=60, ttl_seconds=600
                )
                for n in range(4)
            ]
        finally:
            await writes.close()
            await engine.dispose()
        return list(settled), again

    settled, again = asyncio.run(scenario())
    assert settled == [True, True, True, False]
    for n, outcome in enumerate(again[:3]):
        assert isinstance(outcome, Replay), outcome
        assert outcome.answer.body == f'{{"n":{n}}}'.encode()
    assert isinstance(again[3], InFlight)  # the request that took key-3 over still holds it
