"""The audit chain (store/audit.py, audit_chain.py, audit_verify.py): group commit, the hash chain,
verification, tampering, purge.

Every test runs on SQLite and on PostgreSQL (a scratch database per test; see tests/services.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.store import (
    AuditChainBroken,
    AuditLog,
    AuditLogClosed,
    AuditRecord,
    create_engine,
    upgrade_database,
)
from liveness_proxy.store.audit_chain import GENESIS_HASH
from liveness_proxy.store.subjects import commit
from liveness_proxy.store.tables import audit_records
from support import TEST_AUDIT_KEYS, TEST_KEYS, TEST_PEPPER


def record(index: int = 0, *, occurred_at: float = 1_700_000_000.5, **changes: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "occurred_at": occurred_at,
        "request_id": f"req-{index}",
        "subject": "alice",
        "credential_id": "key:0123456789abcdef",
        "action": "result.read",
        "session_id": f"s{index}",
        "status": 200,
        "upstream_status": 200,
        "latency_ms": 12.345,
        "problem": None,
    }
    values.update(changes)
    if values["subject"] is not None and "subject_commitment" not in changes:
        # Any secret will do here: these tests are about the chain, not about subjects.
        values["subject_commitment"] = commit(b"s" * 32, "subject", values["subject"])
    return AuditRecord(**values)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


async def fill(engine: AsyncEngine, count: int, **kwargs: Any) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS, **kwargs)
    await asyncio.gather(*(log.append(record(index)) for index in range(count)))
    await log.close()


async def rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    return [row async for row in AuditLog(engine, TEST_AUDIT_KEYS).iterate()]


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(sql), params)


# -- writing ----------------------------------------------------------------------------------------


async def test_appends_form_a_contiguous_chain_that_verifies(engine: AsyncEngine) -> None:
    await fill(engine, 40)
    stored = await rows(engine)
    assert [row["seq"] for row in stored] == list(range(1, 41))
    assert stored[0]["prev_hash"] == GENESIS_HASH
    assert all(row["prev_hash"] == before["record_hash"] for before, row in itertools.pairwise(stored))
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok, verdict.problem
    assert (verdict.records, verdict.first_seq, verdict.head_seq) == (40, 1, 40)
    assert verdict.head_hash == stored[-1]["record_hash"]


def independent_hash(row: dict[str, Any]) -> str:
    """The documented encoding (store/audit_chain.py), rebuilt with the standard library only, from
    a row or an exported record: the fifteen members (never the plain `subject` or `personal`);
    floats as their IEEE-754 bits; HMAC-SHA256 under the key derived from the pepper (`pepper`)."""
    names = [
        "action",
        "credential_id",
        "detail",
        "key_id",
        "latency_ms",
        "occurred_at",
        "personal_commitment",
        "prev_hash",
        "problem",
        "request_id",
        "seq",
        "session_id",
        "status",
        "subject_commitment",
        "upstream_status",
    ]
    floats = {"occurred_at", "latency_ms"}
    document = {
        name: struct.pack(">d", row[name] + 0.0).hex() if name in floats else row[name] for name in names
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert row["key_id"] == "pepper"
    key = hmac.new(TEST_PEPPER.encode(), b"liveness-proxy audit chain key v1", hashlib.sha256).digest()
    return hmac.new(key, encoded.encode(), hashlib.sha256).hexdigest()


async def test_record_hash_is_the_documented_canonical_encoding(engine: AsyncEngine) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    await log.append(record(0, subject='ünï "cödé"\t\\', latency_ms=-0.0, upstream_status=None))
    await log.append(record(1, occurred_at=1e16, latency_ms=5))
    await log.append(dataclasses.replace(record(2), action="verdict.record", detail='{"status":"FAILED"}'))
    await log.close()
    stored = await rows(engine)
    assert stored[0]["latency_ms"] == 0.0  # -0.0 is stored (and hashed) as 0.0 on both engines
    assert stored[2]["detail"] == '{"status":"FAILED"}'
    for row in stored:
        assert row["record_hash"] == independent_hash(row)


@pytest.mark.parametrize(
    "bad",
    [
        {"latency_ms": float("nan")},
        {"occurred_at": float("inf")},
        {"status": True},
        {"status": 2**31},
        {"subject": "x" * 256},
        {"request_id": "nul\x00"},
        {"subject": "\ud800"},
        {"action": None},
    ],
)
async def test_a_record_that_cannot_be_stored_exactly_is_refused_alone(
    engine: AsyncEngine, bad: dict[str, Any]
) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    results = await asyncio.gather(
        log.append(record(1)), log.append(record(2, **bad)), log.append(record(3)), return_exceptions=True
    )
    await log.close()
    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert results[2] is None
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).records == 2


async def test_concurrent_appends_share_commits_up_to_batch_max(engine: AsyncEngine) -> None:
    batches: list[int] = []
    await fill(engine, 300, batch_max=64, on_commit=lambda size, seconds: batches.append(size))
    assert sum(batches) == 300
    assert max(batches) <= 64
    assert len(batches) < 300 / 4  # appends queued during a commit went into the next one
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok


async def test_on_commit_reports_size_and_duration(engine: AsyncEngine) -> None:
    reports: list[tuple[int, float]] = []
    log = AuditLog(engine, TEST_AUDIT_KEYS, on_commit=lambda size, seconds: reports.append((size, seconds)))
    await log.append(record())
    await log.close()
    assert len(reports) == 1
    assert reports[0][0] == 1
    assert 0 < reports[0][1] < 10


async def test_a_failing_batch_fails_each_of_its_records_and_the_writer_carries_on(
    engine: AsyncEngine,
) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    await log.append(record(0))
    # Without the head row the transaction cannot lock the chain: the whole batch fails.
    await execute(engine, "DELETE FROM audit_chain_head")
    results = await asyncio.gather(
        *(log.append(record(index)) for index in (1, 2, 3)), return_exceptions=True
    )
    assert all(isinstance(result, RuntimeError) and "db upgrade" in str(result) for result in results)
    stored = (await rows(engine))[0]
    await execute(
        engine,
        "INSERT INTO audit_chain_head (id, last_seq, last_hash, anchor_seq, anchor_hash) "
        "VALUES (1, 1, :last_hash, 0, :genesis)",
        last_hash=stored["record_hash"],
        genesis=GENESIS_HASH,
    )
    await log.append(record(4))
    await log.close()
    assert [row["seq"] for row in await rows(engine)] == [1, 2]  # no seq was spent on the failed batch
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok


async def test_a_failing_on_commit_hook_does_not_stop_the_writer(engine: AsyncEngine) -> None:
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))

    def broken_hook(_size: int, _seconds: float) -> None:
        raise RuntimeError("metrics are down")

    log = AuditLog(engine, TEST_AUDIT_KEYS, on_commit=broken_hook)
    await log.append(record(0))
    await log.append(record(1))
    await log.close()
    assert await AuditLog(engine, TEST_AUDIT_KEYS).count() == 2
    assert len(reported) == 2
    assert isinstance(reported[0]["exception"], RuntimeError)


async def test_close_writes_everything_queued_and_later_appends_raise(engine: AsyncEngine) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS, batch_max=8)
    appends = [asyncio.create_task(log.append(record(index))) for index in range(50)]
    await asyncio.sleep(0)  # the appends are queued, most not yet written
    await log.close()
    assert await AuditLog(engine, TEST_AUDIT_KEYS).count() == 50
    await asyncio.gather(*appends)  # and every caller was answered without an error
    with pytest.raises(AuditLogClosed):
        await log.append(record(99))


async def test_a_cancelled_caller_still_gets_its_record_written(engine: AsyncEngine) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    task = asyncio.create_task(log.append(record(7)))
    await asyncio.sleep(0)
    task.cancel()
    await log.close()
    assert [row["request_id"] for row in await rows(engine)] == ["req-7"]


def test_construction_needs_no_running_loop(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    log = AuditLog(engine, TEST_AUDIT_KEYS, batch_max=1)
    assert log is not None
    with pytest.raises(ValueError, match="batch_max"):
        AuditLog(engine, TEST_AUDIT_KEYS, batch_max=0)


async def test_two_logs_on_separate_engines_append_into_one_chain(
    engine: AsyncEngine, database_url: str
) -> None:
    # As two uvicorn workers do: separate engines (connections, threads) on one database.
    other = create_engine(database_url)
    batches: dict[str, list[int]] = {"a": [], "b": []}
    first = AuditLog(engine, TEST_AUDIT_KEYS, on_commit=lambda size, _s: batches["a"].append(size))
    second = AuditLog(other, TEST_AUDIT_KEYS, on_commit=lambda size, _s: batches["b"].append(size))
    try:
        await asyncio.gather(
            *(first.append(record(index)) for index in range(300)),
            *(second.append(record(1000 + index)) for index in range(300)),
            *(first.append(record(2000 + index)) for index in range(100)),
        )
        await first.close()
        await second.close()
    finally:
        await other.dispose()
    assert sum(batches["a"]) == 400
    assert sum(batches["b"]) == 300
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok, verdict.problem
    assert verdict.records == 700
    assert {row["request_id"] for row in await rows(engine)} == {
        *(f"req-{index}" for index in range(300)),
        *(f"req-{1000 + index}" for index in range(300)),
        *(f"req-{2000 + index}" for index in range(100)),
    }


# -- reading ----------------------------------------------------------------------------------------


async def test_iterate_since_is_inclusive_and_until_exclusive(engine: AsyncEngine) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index in range(6):
        await log.append(record(index, occurred_at=1000.0 + index))
    await log.close()
    selected = [
        row["request_id"]
        async for row in AuditLog(engine, TEST_AUDIT_KEYS).iterate(since=1001.0, until=1004.0)
    ]
    assert selected == ["req-1", "req-2", "req-3"]
    assert (
        len([row async for row in AuditLog(engine, TEST_AUDIT_KEYS).iterate(since=1004.0, batch_size=1)]) == 2
    )


async def test_verify_streams_in_small_batches(engine: AsyncEngine) -> None:
    await fill(engine, 50)
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify(batch_size=7)).records == 50
    await execute(engine, "UPDATE audit_records SET status = 500 WHERE seq = 33")
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify(batch_size=7)).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("altered", 33)


async def test_verify_reads_one_snapshot_while_a_purge_and_appends_run(
    engine: AsyncEngine, database_url: str
) -> None:
    await _fill_ages(engine, [100.0] * 200)
    other = create_engine(database_url)
    try:
        verifying = asyncio.create_task(AuditLog(engine, TEST_AUDIT_KEYS).verify(batch_size=2))
        await asyncio.sleep(0.02)  # verify is partway through its walk
        assert not verifying.done()
        # From another engine (another worker): without a snapshot, verify would meet a gap.
        assert (await AuditLog(other, TEST_AUDIT_KEYS).purge(older_than=150.0)).purged == 200
        await fill(other, 10)
        verdict = await verifying
    finally:
        await other.dispose()
    assert verdict.ok, verdict.problem
    assert (verdict.records, verdict.head_seq) == (200, 200)
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).records == 10


async def test_an_empty_log_verifies(engine: AsyncEngine) -> None:
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok
    assert (verdict.records, verdict.head_seq, verdict.head_hash) == (0, 0, GENESIS_HASH)


# -- tampering --------------------------------------------------------------------------------------


async def _id_of(engine: AsyncEngine, seq: int) -> int:
    async with engine.connect() as connection:
        found = (
            await connection.execute(text("SELECT id FROM audit_records WHERE seq = :s"), {"s": seq})
        ).scalar()
    assert found is not None
    return int(found)


_PAYLOAD = (
    "request_id",
    "subject",
    "credential_id",
    "action",
    "session_id",
    "status",
    "upstream_status",
    "latency_ms",
    "problem",
)


async def _swap_payloads(engine: AsyncEngine, seq_a: int, seq_b: int) -> None:
    """Swaps two records' contents, leaving seq and hashes where they were."""
    columns = audit_records.c
    async with engine.begin() as connection:
        found = (
            await connection.execute(
                select(columns.seq, *(columns[name] for name in _PAYLOAD)).where(
                    columns.seq.in_([seq_a, seq_b])
                )
            )
        ).all()
        by_seq = {row.seq: row._mapping for row in found}
        for target, source in ((seq_a, seq_b), (seq_b, seq_a)):
            await connection.execute(
                update(audit_records)
                .where(columns.seq == target)
                .values({name: by_seq[source][name] for name in _PAYLOAD})
            )


@pytest.mark.parametrize(
    ("tamper", "kind", "seq", "named_seq", "verified"),
    [
        # (raw SQL, problem kind, seq reported, seq whose id is reported (None: gone), records verified)
        ("UPDATE audit_records SET subject_commitment = :fake WHERE seq = 4", "altered", 4, 4, 3),
        ("UPDATE audit_records SET key_id = 'other' WHERE seq = 7", "altered", 7, 7, 6),
        ("UPDATE audit_records SET latency_ms = latency_ms + 0.001 WHERE seq = 9", "altered", 9, 9, 8),
        ("UPDATE audit_records SET record_hash = :fake WHERE seq = 5", "altered", 5, 5, 4),
        ("UPDATE audit_records SET prev_hash = :fake WHERE seq = 6", "altered", 6, 6, 5),
        ("DELETE FROM audit_records WHERE seq = 5", "deleted", 6, 6, 4),
        ("DELETE FROM audit_records WHERE seq IN (3, 4, 5)", "deleted", 6, 6, 2),
        ("DELETE FROM audit_records WHERE seq = 1", "deleted", 2, 2, 0),
        ("DELETE FROM audit_records WHERE seq = 10", "truncated", 10, None, 9),
        ("UPDATE audit_records SET seq = seq + 100 WHERE seq = 10", "unexpected", 110, 10, 9),
        ("UPDATE audit_chain_head SET last_hash = :fake", "truncated", 10, 10, 10),
    ],
)
async def test_tampering_is_found_at_the_first_bad_record(
    engine: AsyncEngine, tamper: str, kind: str, seq: int, named_seq: int | None, verified: int
) -> None:
    await fill(engine, 10)
    ids = {number: await _id_of(engine, number) for number in range(1, 11)}
    await execute(engine, tamper, **({"fake": "f" * 64} if ":fake" in tamper else {}))
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.problem is not None
    assert (verdict.problem.kind, verdict.problem.seq) == (kind, seq)
    assert verdict.problem.record_id == (None if named_seq is None else ids[named_seq])
    assert verdict.records == verified


async def test_swapping_two_records_contents_is_found(engine: AsyncEngine) -> None:
    await fill(engine, 10)
    await _swap_payloads(engine, 3, 7)
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq, problem.record_id) == ("altered", 3, await _id_of(engine, 3))


async def test_a_record_replaced_with_a_recomputed_hash_breaks_the_next_link(engine: AsyncEngine) -> None:
    # Even someone who holds the audit key and rewrites one record must rewrite every later one.
    await fill(engine, 10)
    forged = next(row for row in await rows(engine) if row["seq"] == 4)
    forged["subject_commitment"] = "e" * 64
    await execute(
        engine,
        "UPDATE audit_records SET subject_commitment = :c, record_hash = :h WHERE seq = 4",
        c="e" * 64,
        h=TEST_AUDIT_KEYS.sign(forged),
    )
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("relinked", 5)


async def test_the_reviewers_forgery_without_the_key_is_found(engine: AsyncEngine) -> None:
    """A 404 turned into a 200, every later hash recomputed with the project's own encoding (and
    the old unkeyed hash, or a guessed key), the last five records deleted and the head lowered:
    without the audit key the first forged record no longer matches its hash."""
    from liveness_proxy.store.audit_chain import canonical_bytes, legacy_record_hash, parse_audit_keys

    await fill(engine, 20)
    stored = await rows(engine)
    await execute(engine, "UPDATE audit_records SET status = 404 WHERE seq = 8")
    stored[7]["status"] = 404
    wrong_keys = parse_audit_keys("", pepper="a guess at the pepper, 32+ characters long")
    for recompute in (
        lambda row: hashlib.sha256(canonical_bytes(row)).hexdigest(),
        legacy_record_hash,
        wrong_keys.sign,
    ):
        prev = stored[6]["record_hash"]
        for row in stored[7:15]:
            row["prev_hash"] = prev
            row["record_hash"] = prev = recompute(row)
            await execute(
                engine,
                "UPDATE audit_records SET status = :s, prev_hash = :p, record_hash = :h WHERE seq = :q",
                s=row["status"],
                p=row["prev_hash"],
                h=row["record_hash"],
                q=row["seq"],
            )
        await execute(engine, "DELETE FROM audit_records WHERE seq > 15")
        await execute(engine, "UPDATE audit_chain_head SET last_seq = 15, last_hash = :h", h=prev)
        problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
        assert problem is not None
        assert (problem.kind, problem.seq) == ("altered", 8)


async def test_a_tail_re_signed_with_the_peppers_key_is_found_once_a_keys_file_is_set(
    engine: AsyncEngine,
) -> None:
    """The pepper's key still verifies the records written before a keys file existed; someone who
    holds the pepper (but not the file) must not be able to re-sign a tail with it."""
    from liveness_proxy.store.audit_chain import parse_audit_keys

    keys = parse_audit_keys("a1:" + "k" * 40, pepper=TEST_PEPPER)
    await fill(engine, 3)  # signed with the pepper's key, before the file
    log = AuditLog(engine, keys)
    await asyncio.gather(*(log.append(record(index)) for index in range(3, 8)))
    await log.close()
    assert (await AuditLog(engine, keys).verify()).ok
    stored = await rows(engine)
    assert [row["key_id"] for row in stored] == ["pepper"] * 3 + ["a1"] * 5
    prev = stored[4]["record_hash"]
    for row in stored[5:]:  # a 200 made a 404, then re-signed with the pepper's key
        row.update(status=404, key_id="pepper", prev_hash=prev)
        row["record_hash"] = prev = TEST_AUDIT_KEYS.sign(row)
        await execute(
            engine,
            "UPDATE audit_records SET status = 404, key_id = 'pepper', prev_hash = :p, record_hash = :h "
            "WHERE seq = :s",
            p=row["prev_hash"],
            h=row["record_hash"],
            s=row["seq"],
        )
    await execute(engine, "UPDATE audit_chain_head SET last_hash = :h", h=prev)
    problem = (await AuditLog(engine, keys).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("altered", 8)
    assert "signed with the pepper's key" in problem.detail


async def test_records_written_after_tampering_do_not_hide_it(engine: AsyncEngine) -> None:
    await fill(engine, 5)
    await execute(engine, "DELETE FROM audit_records WHERE seq = 3")
    await fill(engine, 5)
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("deleted", 4)


# -- purge ------------------------------------------------------------------------------------------


async def _fill_ages(engine: AsyncEngine, times: list[float]) -> None:
    log = AuditLog(engine, TEST_AUDIT_KEYS)
    for index, occurred_at in enumerate(times):
        await log.append(record(index, occurred_at=occurred_at))
    await log.close()


async def test_purge_deletes_old_records_and_the_chain_still_verifies(engine: AsyncEngine) -> None:
    await _fill_ages(engine, [100.0] * 6 + [200.0] * 4)
    result = await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=150.0, batch_size=4)  # two transactions
    assert (result.purged, result.anchor_seq) == (6, 6)
    assert [row["seq"] for row in await rows(engine)] == [7, 8, 9, 10]
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok, verdict.problem
    assert (verdict.records, verdict.first_seq, verdict.anchor_seq) == (4, 7, 6)
    assert verdict.anchor_hash == result.anchor_hash
    await fill(engine, 3)
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).records == 7
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=150.0)).purged == 0


async def test_purge_of_everything_leaves_an_empty_verifiable_chain(engine: AsyncEngine) -> None:
    await _fill_ages(engine, [100.0] * 5)
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=1e12)).purged == 5
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert verdict.ok
    assert (verdict.records, verdict.anchor_seq, verdict.head_seq) == (0, 5, 5)


async def test_purge_only_deletes_a_prefix_of_the_chain(engine: AsyncEngine) -> None:
    # seq 3 is old but follows a newer record (two workers' clocks a little apart): it stays, so
    # the chain never has a hole the anchor does not explain.
    await _fill_ages(engine, [100.0, 100.0, 300.0, 100.0, 300.0])
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=200.0)).purged == 2
    assert [row["seq"] for row in await rows(engine)] == [3, 4, 5]
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        ("DELETE FROM audit_records WHERE seq = 7", "deleted", 8),
        ("UPDATE audit_records SET status = 201 WHERE seq = 9", "altered", 9),
        ("UPDATE audit_chain_head SET anchor_hash = :fake", "relinked", 7),
    ],
)
async def test_tampering_after_a_purge_is_still_found(
    engine: AsyncEngine, tamper: str, kind: str, seq: int
) -> None:
    await _fill_ages(engine, [100.0] * 6 + [200.0] * 4)
    await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=150.0)
    await execute(engine, tamper, **({"fake": "f" * 64} if ":fake" in tamper else {}))
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (kind, seq)


async def test_purge_refuses_to_delete_records_whose_chain_is_broken(engine: AsyncEngine) -> None:
    await _fill_ages(engine, [100.0] * 10)
    await execute(engine, "UPDATE audit_records SET request_id = 'forged' WHERE seq = 7")
    with pytest.raises(AuditChainBroken) as raised:
        await AuditLog(engine, TEST_AUDIT_KEYS).purge(older_than=150.0, batch_size=4)
    assert (raised.value.problem.kind, raised.value.problem.seq) == ("altered", 7)
    # The first, intact transaction (seq 1-4) went through; the one holding the altered record did not.
    assert [row["seq"] for row in await rows(engine)] == [5, 6, 7, 8, 9, 10]
    problem = (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("altered", 7)
