"""Migration 0008 (the erasable, keyed chain) on SQLite and PostgreSQL, against databases written the
way the 0007-era code wrote them: raw rows chained with the unkeyed SHA-256 format, the head row moved
with them, a purge anchor, sessions, idempotency records and session-token bindings.

The upgrade must verify the old chain before it re-chains it (a broken one stops it, and the database
stays at 0007), keep every record's facts, move a failed authentication's client address to the
erasable column, give every subject a secret, and anchor the new chain to the old head. The downgrade
chains the records in the old format again. The old format is computed here from its description
(`legacy_hash`), not with the code under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.auth.session_tokens import KeyedHash
from liveness_proxy.store import AuditLog, AuditRecord, create_engine, current_revision, upgrade_database
from liveness_proxy.store.audit_chain import GENESIS_HASH, personal_matches
from liveness_proxy.store.database import alembic_config
from liveness_proxy.store.erasure import Erasure
from liveness_proxy.store.subjects import SubjectRegistry
from liveness_proxy.store.tables import metadata
from support import TEST_AUDIT_KEYS, TEST_KEYS, failed_authentication_record

# -- the 0007-era format ------------------------------------------------------------------------------

LEGACY_FIELDS = (
    "action", "credential_id", "detail", "latency_ms", "occurred_at", "prev_hash", "problem",
    "request_id", "seq", "session_id", "status", "subject", "upstream_status",
)  # fmt: skip
# What a 0007-era record held besides its chain columns.
FACT_COLUMNS = (
    "occurred_at", "request_id", "subject", "credential_id", "action", "session_id", "status",
    "upstream_status", "latency_ms", "problem", "detail",
)  # fmt: skip


def legacy_hash(values: dict[str, Any]) -> str:
    """SHA-256 over the JSON object of LEGACY_FIELDS (detail left out when null), keys sorted, no
    whitespace, floats as the hex of their big-endian binary64 bits."""
    document: dict[str, Any] = {}
    for name in LEGACY_FIELDS:
        value: Any = values.get(name)
        if name == "detail" and value is None:
            continue
        if name in ("occurred_at", "latency_ms"):
            value = struct.pack(">d", float(value) + 0.0).hex()
        document[name] = value
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def old_record(index: int, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "occurred_at": 1_700_000_000.25 + index,
        "request_id": f"req-{index}",
        "subject": "alice",
        "credential_id": "key:0123456789abcdef",
        "action": "result.read",
        "session_id": f"s{index}",
        "status": 200,
        "upstream_status": 200,
        "latency_ms": 12.5 + index,
        "problem": None,
        "detail": None,
    }
    values.update(changes)
    return values


def compact(facts: dict[str, Any]) -> str:
    return json.dumps(facts, sort_keys=True, separators=(",", ":"))


ADDRESS = "203.0.113.7"
FAILED_FACTS = {
    "window_start": 1_700_000_060.0,
    "window_seconds": 60,
    "credential": "api_key",
    "client_address": ADDRESS,
    "failures": 7,
    "refused_by_limit": 2,
}


def old_records() -> list[dict[str, Any]]:
    """Twelve records of the kinds 0007 wrote: requests of several subjects (one not ASCII), a
    system event without a subject, a failed-authentication aggregate with its client address in
    `detail`, and the overflow aggregate, which has none."""
    return [
        old_record(1, subject="mallory"),  # purged in the anchored case: gets no secret
        old_record(2, subject="mallory"),
        old_record(3, action="session.create", upstream_status=201, status=201),
        old_record(4, subject="bob", action="session.create", status=201, upstream_status=201),
        old_record(5, subject="zoë", problem="upstream-timeout", status=504, upstream_status=None),
        old_record(
            6,
            subject=None,
            credential_id=None,
            action="verdict.record",
            detail=compact({"verdict": "live", "confidence": 0.97}),
        ),
        old_record(
            7,
            subject=None,
            credential_id=None,
            session_id=None,
            action="auth.failed",
            status=401,
            upstream_status=None,
            problem="unauthenticated",
            latency_ms=0.0,
            detail=compact(FAILED_FACTS),
        ),
        old_record(
            8,
            subject=None,
            credential_id=None,
            session_id=None,
            action="auth.failed.overflow",
            status=401,
            upstream_status=None,
            problem="unauthenticated",
            latency_ms=0.0,
            detail=compact({"addresses": 3, "addresses_at_least": False, "failures": 9}),
        ),
        old_record(9, subject="bob"),
        old_record(10),
        old_record(11, subject="bob", latency_ms=-0.0),
        old_record(12),
    ]


async def write_old(engine: AsyncEngine, records: list[dict[str, Any]]) -> None:
    """Appends `records` as the 0007-era writer did: head locked first, rows chained, head stored."""
    async with engine.begin() as connection:
        head = (
            await connection.execute(
                text(
                    "UPDATE audit_chain_head SET last_seq = last_seq + :n WHERE id = 1 "
                    "RETURNING last_seq, last_hash"
                ),
                {"n": len(records)},
            )
        ).one()
        seq, prev = int(head.last_seq) - len(records), str(head.last_hash)
        rows = []
        for values in records:
            seq += 1
            row = {**values, "seq": seq, "prev_hash": prev}
            row["record_hash"] = prev = legacy_hash(row)
            rows.append(row)
        names = (*FACT_COLUMNS, "seq", "prev_hash", "record_hash")
        await connection.execute(
            text(
                f"INSERT INTO audit_records ({', '.join(names)}) "  # noqa: S608 - fixed column names
                f"VALUES ({', '.join(':' + name for name in names)})"
            ),
            rows,
        )
        await connection.execute(text("UPDATE audit_chain_head SET last_hash = :h WHERE id = 1"), {"h": prev})


async def purge_old(engine: AsyncEngine, through_seq: int) -> None:
    """The 0007-era purge: the oldest records deleted, the last of them kept as the anchor."""
    async with engine.begin() as connection:
        anchor_hash = (
            await connection.execute(
                text("SELECT record_hash FROM audit_records WHERE seq = :s"), {"s": through_seq}
            )
        ).scalar_one()
        await connection.execute(text("DELETE FROM audit_records WHERE seq <= :s"), {"s": through_seq})
        await connection.execute(
            text("UPDATE audit_chain_head SET anchor_seq = :s, anchor_hash = :h WHERE id = 1"),
            {"s": through_seq, "h": anchor_hash},
        )


SESSIONS = {"s4": "bob", "s9": "bob", "s10": "alice", "s-carol": "carol"}


async def write_old_state(engine: AsyncEngine) -> None:
    """Sessions (carol's has no audit record), an idempotency record, a session-token binding."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO liveness_sessions (session_id, subject, credential_id, created_at, request_id) "
                "VALUES (:session_id, :subject, 'key:0123456789abcdef', 1700000000.0, 'req')"
            ),
            [{"session_id": session_id, "subject": subject} for session_id, subject in SESSIONS.items()],
        )
        await connection.execute(
            text(
                "INSERT INTO idempotency_keys (subject_hash, idempotency_key, fingerprint, created_at, "
                "expires_at) VALUES (:h, 'retry-1', :f, 1.0, 9999999999.0)"
            ),
            {"h": "a" * 64, "f": "b" * 64},
        )
        await connection.execute(
            text(
                "INSERT INTO session_token_bindings (token_hash, subject_hash, expires_at) "
                "VALUES (:t, :h, 9999999999.0)"
            ),
            {"t": "c" * 64, "h": "a" * 64},
        )


async def read_head(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        row = (await connection.execute(text("SELECT * FROM audit_chain_head WHERE id = 1"))).one()
    return dict(row._mapping)


async def read_records(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT * FROM audit_records ORDER BY seq"))).all()
    return [{str(name): value for name, value in row._mapping.items()} for row in rows]


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608


async def columns(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: {str(column["name"]) for column in inspect(sync).get_columns(table)}
        )


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))


async def schema_drift(engine: AsyncEngine) -> list[Any]:
    """How the migrated schema differs from tables.py (types included): nothing, after an upgrade."""

    def compare(sync: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(compare)


def legacy_problems(head: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """Every way the old-format chain does not hold, from the anchor to the head (empty: it holds)."""
    problems = []
    expected_seq, prev = int(head["anchor_seq"]) + 1, str(head["anchor_hash"])
    for values in records:
        if values["seq"] != expected_seq:
            problems.append(f"seq {values['seq']}: expected seq {expected_seq}")
        if values["prev_hash"] != prev:
            problems.append(f"seq {values['seq']}: prev_hash does not link")
        if legacy_hash(values) != values["record_hash"]:
            problems.append(f"seq {values['seq']}: record_hash does not match")
        expected_seq, prev = int(values["seq"]) + 1, str(values["record_hash"])
    if expected_seq - 1 != head["last_seq"] or prev != head["last_hash"]:
        problems.append(f"the head says seq {head['last_seq']}, the chain ends at seq {expected_seq - 1}")
    return problems


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def run_alembic(connection: Connection, action: str, revision: str, keys: Any = None) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    config.attributes["keys"] = keys
    getattr(command, action)(config, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(run_alembic, "downgrade", revision)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A database at 0007, as the 0007-era code left it: nothing written yet."""
    made = create_engine(database_url, pool_size=2)
    await upgrade_database(made, "0007")
    yield made
    await made.dispose()


def registry(engine: AsyncEngine) -> SubjectRegistry:
    return SubjectRegistry(engine, TEST_KEYS.subjects)


# -- the upgrade ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("purged", [0, 3], ids=["from-genesis", "from-a-purge-anchor"])
async def test_the_old_chain_is_rechained_keyed_and_anchored_to_its_old_head(
    engine: AsyncEngine, purged: int
) -> None:
    await write_old(engine, old_records()[:5])
    await write_old(engine, old_records()[5:])  # two commits: the head moved twice
    if purged:
        await purge_old(engine, purged)
    await write_old_state(engine)
    old_head = await read_head(engine)
    old_rows = await read_records(engine)
    assert not legacy_problems(old_head, old_rows)  # the test's own writer is the old format
    assert old_head["anchor_seq"] == purged

    await upgrade_database(engine, keys=TEST_KEYS)

    subjects = registry(engine)
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=subjects)
    assert verdict.ok, verdict.problem
    assert (verdict.anchor_seq, verdict.records) == (purged, len(old_rows) + 1)
    assert await schema_drift(engine) == []

    new_rows = await read_records(engine)
    *rechained, event = new_rows
    assert [row["seq"] for row in rechained] == [row["seq"] for row in old_rows]
    for old, new in zip(old_rows, rechained, strict=True):
        assert new["id"] == old["id"]
        assert new["key_id"] == TEST_AUDIT_KEYS.signing_key_id == "pepper"
        assert new["record_hash"] != old["record_hash"]
        assert new["erased_at"] is None
        facts = {name: new[name] for name in FACT_COLUMNS}
        if old["action"] == "auth.failed":
            # The address left the hashed detail for the erasable column, with its commitment.
            assert json.loads(new["detail"]) == {
                k: v for k, v in FAILED_FACTS.items() if k != "client_address"
            }
            assert json.loads(new["personal"])["values"] == {"client_address": ADDRESS}
            assert personal_matches(new["personal"], new["personal_commitment"])
            facts["detail"] = old["detail"]
        else:
            assert new["personal"] is new["personal_commitment"] is None
        assert facts == {name: old[name] for name in FACT_COLUMNS}, old["seq"]
        if old["subject"] is None:
            assert new["subject_commitment"] is None
        else:
            found = await subjects.find(old["subject"])
            assert found is not None
            assert new["subject_commitment"] == found.commitment

    assert event["action"] == "audit.rechained"
    assert event["seq"] == old_head["last_seq"] + 1
    assert event["prev_hash"] == rechained[-1]["record_hash"]
    assert (event["subject"], event["subject_commitment"], event["request_id"]) == (
        None,
        None,
        "migration-0008",
    )
    assert json.loads(event["detail"]) == {
        "previous_format": "sha256-v1",
        "previous_head_seq": old_head["last_seq"],
        "previous_head_hash": old_head["last_hash"],
        "previous_anchor_seq": purged,
        "previous_anchor_hash": old_head["anchor_hash"],
        "records": len(old_rows),
    }
    head = await read_head(engine)
    assert (head["last_seq"], head["last_hash"]) == (event["seq"], event["record_hash"])
    assert (head["anchor_seq"], head["anchor_hash"]) == (purged, old_head["anchor_hash"])
    if not purged:
        assert old_head["anchor_hash"] == GENESIS_HASH

    # Sessions carry their subject's commitment; the subjects of purged records got no secret.
    async with engine.connect() as connection:
        stored = {
            row.session_id: row.subject_commitment
            for row in await connection.execute(
                text("SELECT session_id, subject_commitment FROM liveness_sessions")
            )
        }
    for session_id, subject in SESSIONS.items():
        found = await subjects.find(subject)
        assert found is not None
        assert stored[session_id] == found.commitment
    expected_subjects = {"alice", "bob", "zoë", "carol"} | ({"mallory"} if purged < 2 else set())
    assert await count(engine, "subject_secrets") == len(expected_subjects)
    assert (await subjects.find("mallory") is None) == (purged >= 2)

    assert await count(engine, "idempotency_keys") == 0
    assert await count(engine, "session_token_bindings") == 0

    # The writer carries on from the new head.
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    await log.append(
        AuditRecord(
            occurred_at=time.time(),
            request_id="after",
            subject="bob",
            credential_id=None,
            action="result.read",
            session_id="s9",
            status=200,
            upstream_status=200,
            latency_ms=1.0,
            problem=None,
            subject_commitment=(await subjects.resolve("bob")).commitment,
        )
    )
    await log.close()
    after = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=subjects)
    assert after.ok, after.problem
    assert after.head_seq == event["seq"] + 1


async def test_more_records_and_subjects_than_one_batch(engine: AsyncEngine) -> None:
    total, customers = 4001, 2500  # the migration takes 2000 rows (records, subjects) at a time
    await write_old(
        engine, [old_record(index, subject=f"user-{index % 7}", session_id=None) for index in range(total)]
    )
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO liveness_sessions (session_id, subject, credential_id, created_at, request_id) "
                "VALUES (:session_id, :subject, 'key:0123456789abcdef', 1700000000.0, 'req')"
            ),
            [{"session_id": f"c{index}", "subject": f"customer-{index}"} for index in range(customers)],
        )
    old_head = await read_head(engine)

    await upgrade_database(engine, keys=TEST_KEYS)

    subjects = registry(engine)
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=subjects)
    assert verdict.ok, verdict.problem
    assert verdict.records == total + 1
    event = (await read_records(engine))[-1]
    assert json.loads(event["detail"])["previous_head_hash"] == old_head["last_hash"]
    assert await count(engine, "subject_secrets") == 7 + customers
    async with engine.connect() as connection:
        stored: dict[str, str | None] = dict(
            (
                await connection.execute(text("SELECT subject, subject_commitment FROM liveness_sessions"))
            ).all()
        )
        assert stored == await subjects.commitments_of(set(stored), connection)


async def damage(engine: AsyncEngine, how: str) -> None:
    statements = {
        "altered": "UPDATE audit_records SET status = 500 WHERE seq = 5",
        "subject-altered": "UPDATE audit_records SET subject = 'mallory' WHERE seq = 4",
        "deleted": "DELETE FROM audit_records WHERE seq = 5",
        "truncated": "DELETE FROM audit_records WHERE seq = 12",
        "relinked": "UPDATE audit_records SET prev_hash = :zeros WHERE seq = 1",
        "head-altered": "UPDATE audit_chain_head SET last_hash = :zeros WHERE id = 1",
    }
    async with engine.begin() as connection:
        await connection.execute(
            text(statements[how]), {"zeros": "f" * 64} if ":zeros" in statements[how] else {}
        )


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("altered", "seq 5 does not verify"),
        ("subject-altered", "seq 4 does not verify"),
        ("deleted", "seq 5 is missing"),
        ("truncated", "truncated"),
        ("relinked", "seq 1 does not verify"),
        ("head-altered", "truncated"),
    ],
)
async def test_a_broken_old_chain_stops_the_upgrade_and_leaves_the_database_at_0007(
    engine: AsyncEngine, how: str, message: str
) -> None:
    await write_old(engine, old_records())
    await write_old_state(engine)
    await damage(engine, how)
    before_rows, before_head = await read_records(engine), await read_head(engine)
    before_tables = await tables(engine)

    with pytest.raises(RuntimeError, match=message) as raised:
        await upgrade_database(engine, keys=TEST_KEYS)
    assert type(raised.value).__name__ == "OldChainBroken"

    # All of it rolled back: the revision, the new tables and columns, the rows.
    assert await current_revision(engine) == "0007"
    assert await tables(engine) == before_tables
    assert "key_id" not in await columns(engine, "audit_records")
    assert "subject_commitment" not in await columns(engine, "liveness_sessions")
    assert await read_records(engine) == before_rows
    assert await read_head(engine) == before_head
    assert await count(engine, "idempotency_keys") == 1
    assert await count(engine, "session_token_bindings") == 1


@pytest.mark.parametrize(
    ("how", "message"),
    [("altered", "seq 5 does not verify"), ("deleted", "seq 5 is missing"), ("truncated", "truncated")],
)
async def test_an_accepted_broken_chain_is_rechained_and_its_damage_recorded(
    engine: AsyncEngine, how: str, message: str
) -> None:
    """`db upgrade --accept-broken-audit-chain`: the way forward for a deployment whose old chain
    was damaged (purge refuses a broken chain, so it could not get past it otherwise)."""
    await write_old(engine, old_records())
    await write_old_state(engine)
    await damage(engine, how)
    kept = len(await read_records(engine))

    await upgrade_database(engine, keys=TEST_KEYS, accept_broken_chain=True)

    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=registry(engine))
    assert verdict.ok, verdict.problem
    assert verdict.records == kept + 1  # renumbered without a gap, and the anchor event
    records = await read_records(engine)
    assert [row["seq"] for row in records] == list(range(1, kept + 2))
    anchor = json.loads(records[-1]["detail"])
    assert records[-1]["action"] == "audit.rechained"
    assert any(message in problem for problem in anchor["previous_chain_problems"])


async def test_the_upgrade_goes_through_once_the_damage_is_repaired(engine: AsyncEngine) -> None:
    await write_old(engine, old_records())
    original = {row["seq"]: row["status"] for row in await read_records(engine)}
    await damage(engine, "altered")
    with pytest.raises(RuntimeError, match="seq 5 does not verify"):
        await upgrade_database(engine, keys=TEST_KEYS)
    async with engine.begin() as connection:  # a restored backup, as it were
        await connection.execute(
            text("UPDATE audit_records SET status = :s WHERE seq = 5"), {"s": original[5]}
        )

    await upgrade_database(engine, keys=TEST_KEYS)

    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=registry(engine))
    assert verdict.ok, verdict.problem
    assert verdict.records == len(original) + 1


async def test_records_without_keys_stop_the_upgrade_with_a_clear_message(engine: AsyncEngine) -> None:
    await write_old(engine, old_records()[:2])
    with pytest.raises(RuntimeError, match=r"holds audit records or sessions: .*liveness-proxy db upgrade"):
        await upgrade_database(engine)
    assert await current_revision(engine) == "0007"
    assert "subject_secrets" not in await tables(engine)


async def test_sessions_without_records_need_the_keys_too(engine: AsyncEngine) -> None:
    await write_old_state(engine)
    with pytest.raises(RuntimeError, match=r"holds audit records or sessions: .*liveness-proxy db upgrade"):
        await upgrade_database(engine)
    assert await current_revision(engine) == "0007"

    await upgrade_database(engine, keys=TEST_KEYS)
    subjects = registry(engine)
    found = await subjects.find("carol")
    assert found is not None
    async with engine.connect() as connection:
        stored = (
            await connection.execute(
                text("SELECT subject_commitment FROM liveness_sessions WHERE session_id = 's-carol'")
            )
        ).scalar_one()
    assert stored == found.commitment
    # The rechained event anchors the (empty) old chain all the same.
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=subjects)
    assert verdict.ok, verdict.problem
    assert verdict.records == 1


@pytest.mark.parametrize("via_0007", [True, False], ids=["from-0007", "from-nothing"])
async def test_an_empty_database_needs_no_keys(database_url: str, via_0007: bool) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        if via_0007:
            await upgrade_database(engine, "0007")
        await upgrade_database(engine)
        assert await current_revision(engine) == head_revision()
        assert await count(engine, "audit_records") == 0
        head = await read_head(engine)
        assert (head["last_seq"], head["last_hash"]) == (0, GENESIS_HASH)
    finally:
        await engine.dispose()


# -- the downgrade ------------------------------------------------------------------------------------


async def test_the_downgrade_chains_the_records_in_the_old_format_again(engine: AsyncEngine) -> None:
    await write_old(engine, old_records())
    await purge_old(engine, 2)
    await write_old_state(engine)
    await upgrade_database(engine, keys=TEST_KEYS)
    subjects = registry(engine)
    # New-format records: two failed authentications with their address in `personal` (the second
    # one's erased by the plain-text retention since), and a subject erased altogether.
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index, address in enumerate(("198.51.100.1", "198.51.100.2")):
        await log.append(
            failed_authentication_record(
                address, occurred_at=1_700_001_000.0 + index, request_id=f"failed-{index}", failures=1 + index
            )
        )
    await log.close()
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE audit_records SET personal = NULL, erased_at = 1.0 WHERE request_id = 'failed-1'")
        )
    erasure = Erasure(
        engine,
        subjects,
        TEST_AUDIT_KEYS,
        binding_hash=KeyedHash(b"p" * 32).subject,
        wall_clock=time.time,
    )
    await erasure.erase_subject("zoë", request_id="erase-zoe")
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=subjects)
    assert verdict.ok, verdict.problem
    before = await read_records(engine)

    await downgrade(engine, "0007")

    assert await current_revision(engine) == "0007"
    head, after = await read_head(engine), await read_records(engine)
    assert legacy_problems(head, after) == []
    assert (head["anchor_seq"], head["last_seq"]) == (2, before[-1]["seq"])
    assert [row["seq"] for row in after] == [row["seq"] for row in before]
    assert not {"key_id", "personal", "subject_commitment", "erased_at"} & set(after[0])
    assert "subject_secrets" not in await tables(engine)
    by_request = {row["request_id"]: row for row in after}
    # The address went back into the detail; the erased one stays erased; the subject too.
    assert json.loads(by_request["failed-0"]["detail"]) == {
        "credential": "api_key",
        "failures": 1,
        "client_address": "198.51.100.1",
    }
    assert json.loads(by_request["failed-1"]["detail"]) == {"credential": "api_key", "failures": 2}
    assert json.loads(by_request["req-7"]["detail"]) == FAILED_FACTS
    assert by_request["req-5"]["subject"] is None
    assert by_request["req-4"]["subject"] == "bob"
    for old in before:  # every other fact as it was
        if old["action"] != "auth.failed":
            new = by_request[old["request_id"]]
            assert {name: new[name] for name in FACT_COLUMNS} == {name: old[name] for name in FACT_COLUMNS}

    # And up again: the downgraded chain verifies as the old format, and is re-chained.
    await upgrade_database(engine, keys=TEST_KEYS)
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify(subjects=registry(engine))
    assert verdict.ok, verdict.problem
    assert verdict.head_seq == before[-1]["seq"] + 1
    assert await schema_drift(engine) == []


# -- several processes ----------------------------------------------------------------------------------


async def test_processes_migrating_one_database_at_once_all_succeed(database_url: str) -> None:
    """Replicas (or library-mode workers) that start together: one migrates, the others wait for it
    and find nothing left to do (SQLite: the write lock; PostgreSQL: the advisory lock)."""
    engines = [create_engine(database_url, pool_size=1) for _ in range(3)]
    try:
        await upgrade_database(engines[0], "0007")
        await write_old(engines[0], old_records())
        await asyncio.gather(*(upgrade_database(engine, keys=TEST_KEYS) for engine in engines))
        assert await current_revision(engines[0]) == head_revision()
        verdict = await AuditLog(engines[0], TEST_AUDIT_KEYS).verify(subjects=registry(engines[0]))
        assert verdict.ok, verdict.problem
        assert verdict.records == len(old_records()) + 1  # re-chained once
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_start_with_nothing_to_migrate_takes_no_sqlite_write_lock(tmp_path: Path) -> None:
    """A process that migrates on start (library mode) while others write: it only reads."""
    path = tmp_path / "busy.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}", pool_size=1)
    try:
        await upgrade_database(engine)
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
            started = time.monotonic()
            await upgrade_database(engine, keys=TEST_KEYS)
            assert time.monotonic() - started < 1.0  # not the 5 s busy timeout, nor "locked"
            writer.execute("ROLLBACK")
        finally:
            writer.close()
    finally:
        await engine.dispose()
