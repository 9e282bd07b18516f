"""The audit chain under rotating keys, and verification's checks of the plain values beside their
commitments (store/audit_verify.py), on SQLite and PostgreSQL.

Keys: the pepper key always verifies; the last line of the keys file signs; records keep verifying
as keys are added; a key removed while records name it makes those records fail. Plain values: a
subject renamed is altered, a subject whose secret is gone is orphaned, an erased one passes, and
`personal` is held to its commitment.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store import AuditLog, AuditRecord, create_engine, upgrade_database
from liveness_proxy.store.audit_chain import AuditKeys, parse_audit_keys
from liveness_proxy.store.audit_verify import ChainVerdict
from liveness_proxy.store.subjects import SubjectRegistry
from support import TEST_KEYS, TEST_PEPPER, failed_authentication_record

KEY_2026A = "2026a:" + "a" * 40
KEY_2026B = "2026b:" + "b" * 40


def audit_keys(text_value: str = "") -> AuditKeys:
    return parse_audit_keys(text_value, pepper=TEST_PEPPER)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


@pytest.fixture
def subjects(engine: AsyncEngine) -> SubjectRegistry:
    return SubjectRegistry(engine, TEST_KEYS.subjects)


async def append(
    engine: AsyncEngine, keys: AuditKeys, subjects: SubjectRegistry, *names: str | None, **changes: Any
) -> None:
    """One request record per name (None: a record without a subject), signed under `keys`."""
    log = AuditLog(engine, keys)
    for index, name in enumerate(names):
        values: dict[str, Any] = {
            "occurred_at": time.time(),
            "request_id": f"req-{name}-{index}",
            "subject": name,
            "credential_id": None,
            "action": "result.read",
            "session_id": None,
            "status": 200,
            "upstream_status": 200,
            "latency_ms": 1.5,
            "problem": None,
            "subject_commitment": None if name is None else (await subjects.resolve(name)).commitment,
        }
        values.update(changes)
        await log.append(AuditRecord(**values))
    await log.close()


async def verify(engine: AsyncEngine, keys: AuditKeys, subjects: SubjectRegistry | None) -> ChainVerdict:
    return await AuditLog(engine, keys).verify(subjects=subjects)


async def key_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return [
            str(key_id)
            for (key_id,) in await connection.execute(text("SELECT key_id FROM audit_records ORDER BY seq"))
        ]


async def execute(engine: AsyncEngine, sql: str, **params: object) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(sql), params)


# -- keys ---------------------------------------------------------------------------------------------


async def test_keys_added_one_after_another_keep_every_record_verifiable(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await append(engine, audit_keys(), subjects, "alice")
    await append(engine, audit_keys(KEY_2026A), subjects, "alice", "bob")
    newest = audit_keys(f"{KEY_2026A}\n{KEY_2026B}")
    await append(engine, newest, subjects, "carol")

    assert await key_ids(engine) == ["pepper", "2026a", "2026a", "2026b"]  # the last line signs
    verdict = await verify(engine, newest, subjects)
    assert verdict.ok, verdict.problem
    assert verdict.records == 4
    # The pepper key verifies whatever the file says: 2026b alone still opens the pepper's record.
    only_b = await verify(engine, audit_keys(KEY_2026B), subjects)
    assert only_b.problem is not None
    assert only_b.problem.seq == 2  # the first 2026a record


async def test_a_removed_key_that_signed_records_is_named(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await append(engine, audit_keys(KEY_2026A), subjects, "alice", "bob")
    verdict = await verify(engine, audit_keys(KEY_2026B), subjects)
    assert verdict.problem is not None
    assert (verdict.problem.kind, verdict.problem.seq) == ("altered", 1)
    assert "audit key '2026a', which is not configured" in verdict.problem.detail
    assert "LIVENESS_PROXY_AUDIT_KEYS_FILE" in verdict.problem.detail


async def test_a_key_with_the_same_id_but_another_secret_does_not_verify(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await append(engine, audit_keys(KEY_2026A), subjects, "alice")
    verdict = await verify(engine, audit_keys("2026a:" + "z" * 40), subjects)
    assert verdict.problem is not None
    assert verdict.problem.kind == "altered"
    assert "does not match its record_hash" in verdict.problem.detail


async def test_a_record_relabelled_with_another_configured_key_is_altered(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    keys = audit_keys(f"{KEY_2026A}\n{KEY_2026B}")
    await append(engine, keys, subjects, "alice", "bob")
    await execute(engine, "UPDATE audit_records SET key_id = '2026a' WHERE seq = 2")
    verdict = await verify(engine, keys, subjects)
    assert verdict.problem is not None
    assert (verdict.problem.kind, verdict.problem.seq) == ("altered", 2)


# -- plain values -------------------------------------------------------------------------------------


async def test_untouched_plain_values_verify(engine: AsyncEngine, subjects: SubjectRegistry) -> None:
    await append(engine, TEST_KEYS.audit, subjects, "alice", None, "bob", "alice")
    verdict = await verify(engine, TEST_KEYS.audit, subjects)
    assert verdict.ok, verdict.problem
    assert verdict.records == 4


@pytest.mark.parametrize("renamed_to", ["bob", "mallory"], ids=["a-known-subject", "an-unknown-name"])
async def test_a_plain_subject_changed_to_another_name(
    engine: AsyncEngine, subjects: SubjectRegistry, renamed_to: str
) -> None:
    await append(engine, TEST_KEYS.audit, subjects, "alice", "bob", "alice")
    await execute(engine, "UPDATE audit_records SET subject = :s WHERE seq = 3", s=renamed_to)

    verdict = await verify(engine, TEST_KEYS.audit, subjects)
    assert verdict.problem is not None
    assert verdict.problem.seq == 3
    if renamed_to == "bob":
        assert verdict.problem.kind == "altered"
        assert "its plain subject does not match its commitment" in verdict.problem.detail
    else:  # a name with no secret at all reads as a subject whose secret is gone
        assert verdict.problem.kind == "orphaned"
    # The record's hash holds (the plain subject is not hashed): without the registry it verifies.
    assert (await verify(engine, TEST_KEYS.audit, None)).ok


async def test_a_plain_subject_whose_secret_row_was_deleted_is_orphaned(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await append(engine, TEST_KEYS.audit, subjects, "bob", "alice")
    alice = await subjects.find("alice")
    assert alice is not None
    await execute(engine, "DELETE FROM subject_secrets WHERE lookup = :l", l=alice.lookup)
    verdict = await verify(engine, TEST_KEYS.audit, subjects)
    assert verdict.problem is not None
    assert (verdict.problem.kind, verdict.problem.seq) == ("orphaned", 2)
    assert "an erasure did not finish" in verdict.problem.detail


async def test_an_erased_row_verifies(engine: AsyncEngine, subjects: SubjectRegistry) -> None:
    await append(engine, TEST_KEYS.audit, subjects, "alice", "bob")
    alice = await subjects.find("alice")
    assert alice is not None
    # What an erasure leaves: no plain subject, the time it went, no secret; the commitment stays.
    await execute(
        engine, "UPDATE audit_records SET subject = NULL, erased_at = :t WHERE seq = 1", t=time.time()
    )
    await execute(engine, "DELETE FROM subject_secrets WHERE lookup = :l", l=alice.lookup)
    verdict = await verify(engine, TEST_KEYS.audit, subjects)
    assert verdict.ok, verdict.problem
    # The commitment it left is still covered by the hash.
    await execute(engine, "UPDATE audit_records SET subject_commitment = :c WHERE seq = 1", c="0" * 64)
    altered = await verify(engine, TEST_KEYS.audit, subjects)
    assert altered.problem is not None
    assert (altered.problem.kind, altered.problem.seq) == ("altered", 1)


async def test_a_plain_subject_without_its_commitment_is_altered(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await append(engine, TEST_KEYS.audit, subjects, None, "bob")
    await execute(engine, "UPDATE audit_records SET subject = 'alice' WHERE seq = 1")
    verdict = await verify(engine, TEST_KEYS.audit, subjects)
    assert verdict.problem is not None
    assert (verdict.problem.kind, verdict.problem.seq) == ("altered", 1)
    assert "no commitment" in verdict.problem.detail


async def failed_authentication(engine: AsyncEngine, address: str) -> None:
    log = AuditLog(engine, TEST_KEYS.audit)
    await log.append(failed_authentication_record(address, occurred_at=time.time()))
    await log.close()


async def test_personal_values_are_held_to_their_commitment(
    engine: AsyncEngine, subjects: SubjectRegistry
) -> None:
    await failed_authentication(engine, "203.0.113.7")
    assert (await verify(engine, TEST_KEYS.audit, subjects)).ok
    async with engine.connect() as connection:
        stored = (await connection.execute(text("SELECT personal FROM audit_records"))).scalar_one()
    # Another address under the same salt: the commitment no longer matches. Checked with or without
    # the registry: personal values need no subject secret.
    await execute(
        engine, "UPDATE audit_records SET personal = :p", p=stored.replace("203.0.113.7", "198.51.100.9")
    )
    for registry in (subjects, None):
        verdict = await verify(engine, TEST_KEYS.audit, registry)
        assert verdict.problem is not None
        assert verdict.problem.kind == "altered"
        assert "plain personal values do not match" in verdict.problem.detail
    # Not JSON at all.
    await execute(engine, "UPDATE audit_records SET personal = 'not json'")
    assert (await verify(engine, TEST_KEYS.audit, subjects)).problem is not None
    # Erased (what the plain-text retention does): passes.
    await execute(engine, "UPDATE audit_records SET personal = NULL, erased_at = 1.0")
    assert (await verify(engine, TEST_KEYS.audit, subjects)).ok
