"""The chain writer's driver SQL (store/audit.py `ChainWriter`): its statements bypass SQLAlchemy's
compilation and parameter processing, and must store exactly what SQLAlchemy Core stored, inside the
caller's transaction, failing the way it failed.

Every test runs on SQLite and on PostgreSQL (a scratch database per test), but the lost connection,
which only PostgreSQL has.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Integer, String, bindparam, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from liveness_proxy.settings import async_database_url
from liveness_proxy.store import AuditLog, AuditRecord, create_engine, is_store_outage, upgrade_database
from liveness_proxy.store.audit import ChainWriter
from liveness_proxy.store.audit_chain import (
    HEAD_ROW_ID,
    AuditKeys,
    column_values,
    personal_values,
    system_event,
)
from liveness_proxy.store.subjects import commit
from liveness_proxy.store.tables import audit_chain_head, audit_records
from services import scratch_postgres
from support import TEST_AUDIT_KEYS, TEST_KEYS

_INT4_MAX = 2**31 - 1


def _records() -> list[dict[str, Any]]:
    """Column values at the edges of what `column_values` lets through: longest strings, non-ASCII
    text, 32-bit integer bounds, extreme and negative floats, every nullable column null."""
    commitment = commit(b"k" * 32, "subject", "ünïcødé 🙂")
    personal, personal_commitment = personal_values({"address": "2001:db8::1", "note": "ünï"})
    edges = [
        AuditRecord(
            occurred_at=1_700_000_000.123456,
            request_id="r" * 128,
            subject="ünïcødé 🙂",
            credential_id="key:" + "c" * 60,
            action="a" * 64,
            session_id="s" * 128,
            status=_INT4_MAX,
            upstream_status=-(2**31),
            latency_ms=5e-324,  # the smallest subnormal double
            problem="p" * 64,
            subject_commitment=commitment,
        ),
        AuditRecord(
            occurred_at=-0.0,
            request_id='quotes " and \\ and \n and \t',
            subject=None,
            credential_id=None,
            action="result.read",
            session_id=None,
            status=0,
            upstream_status=None,
            latency_ms=1.7976931348623157e308,
            problem=None,
            detail='{"k":"v","n":1}',
            personal=personal,
            personal_commitment=personal_commitment,
        ),
        AuditRecord(
            occurred_at=1e-3,
            request_id="r-3",
            subject="x" * 255,
            credential_id="jwt:sub",
            action="session.create",
            session_id="s-3",
            status=201,
            upstream_status=200,
            latency_ms=0.1 + 0.2,  # not a short decimal
            problem=None,
            subject_commitment=commit(b"k" * 32, "subject", "x" * 255),
        ),
    ]
    values = [column_values(record) for record in edges]
    values.append(
        system_event("verdict.record", request_id="r-4", occurred_at=2e9, facts={"verdict": "pass"})
    )
    return values


async def _core_append(connection: AsyncConnection, keys: AuditKeys, batch: list[dict[str, Any]]) -> None:
    """The writer as it was before the driver SQL (SQLAlchemy Core statements): the reference."""
    head = audit_chain_head.c
    locked = (
        await connection.execute(
            update(audit_chain_head)
            .where(head.id == HEAD_ROW_ID)
            .values(last_seq=head.last_seq + bindparam("batch_size", type_=Integer))
            .returning(head.last_seq, head.last_hash),
            {"batch_size": len(batch)},
        )
    ).one()
    seq = int(locked.last_seq) - len(batch)
    prev_hash = str(locked.last_hash)
    rows = []
    for values in batch:
        seq += 1
        row = {**values, "seq": seq, "prev_hash": prev_hash, "key_id": keys.signing_key_id}
        row["record_hash"] = prev_hash = keys.sign(row)
        rows.append(row)
    await connection.execute(insert(audit_records), rows)
    await connection.execute(
        update(audit_chain_head)
        .where(head.id == HEAD_ROW_ID)
        .values(last_hash=bindparam("new_hash", type_=String)),
        {"new_hash": prev_hash},
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


@pytest.fixture
def reference_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A second database of the same engine, for the reference writes."""
    if database_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'reference.db'}"
        return
    with scratch_postgres() as url:
        yield async_database_url(url)


def _cell(value: Any) -> tuple[str, str]:
    """A stored value, exactly: its type, and floats by their bits (0.0 == -0.0, but not as bits)."""
    if isinstance(value, float):
        return "float", struct.pack(">d", value).hex()
    return type(value).__name__, repr(value)


async def _stored(engine: AsyncEngine) -> tuple[list[list[tuple[str, str]]], list[tuple[str, str]]]:
    """Every column of every record in chain order (and on SQLite each value's storage class), and
    the head row."""
    columns = list(audit_records.c)
    async with engine.connect() as connection:
        query = select(*columns)
        if connection.dialect.name == "sqlite":
            query = query.add_columns(*(text(f"typeof({column.name})") for column in columns))
        found = (await connection.execute(query.order_by(audit_records.c.seq))).all()
        head = (await connection.execute(select(audit_chain_head))).one()
    return [[_cell(value) for value in row] for row in found], [_cell(value) for value in head]


async def test_the_driver_sql_stores_exactly_what_sqlalchemy_core_stored(
    engine: AsyncEngine, reference_url: str
) -> None:
    reference = create_engine(reference_url)
    await upgrade_database(reference, keys=TEST_KEYS)
    writer = ChainWriter.build(TEST_AUDIT_KEYS)
    records = _records()
    try:
        for batch in (records[:1], records[1:]):  # a second batch continues the chain
            async with engine.begin() as connection:
                await writer.append(connection, batch)
            async with reference.begin() as connection:
                await _core_append(connection, TEST_AUDIT_KEYS, batch)
        written, written_head = await _stored(engine)
        expected, expected_head = await _stored(reference)
    finally:
        await reference.dispose()
    assert len(written) == len(records)
    for seq, (row, wanted) in enumerate(zip(written, expected, strict=True), start=1):
        assert row == wanted, f"seq {seq}"
    assert written_head == expected_head
    assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).records == len(records)


async def _head(engine: AsyncEngine) -> tuple[int, str]:
    async with engine.connect() as connection:
        row = (await connection.execute(select(audit_chain_head))).one()
    return int(row.last_seq), str(row.last_hash)


async def _count(engine: AsyncEngine) -> int:
    return await AuditLog(engine, TEST_AUDIT_KEYS).count()


class _LaterFailure(Exception):
    pass


async def test_the_insert_is_rolled_back_with_the_callers_transaction(engine: AsyncEngine) -> None:
    writer = ChainWriter.build(TEST_AUDIT_KEYS)
    records = _records()
    async with engine.begin() as connection:
        await writer.append(connection, records[:2])
    head = await _head(engine)

    async def append_then_fail() -> None:
        async with engine.begin() as connection:
            await writer.append(connection, records[2:])
            # A verdict's transaction may fail after its chain append: nothing of it may remain.
            raise _LaterFailure

    with pytest.raises(_LaterFailure):
        await append_then_fail()
    assert await _count(engine) == 2
    assert await _head(engine) == head
    async with engine.begin() as connection:
        await writer.append(connection, records[2:])
    verdict = await AuditLog(engine, TEST_AUDIT_KEYS).verify()
    assert (verdict.ok, verdict.records) == (True, len(records))


async def test_a_row_the_database_refuses_fails_the_batch_as_a_database_error(engine: AsyncEngine) -> None:
    writer = ChainWriter.build(TEST_AUDIT_KEYS)
    async with engine.begin() as connection:
        await writer.append(connection, _records()[:2])
    # A head that lags its records makes the next seq one that exists: the unique index refuses it.
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE audit_chain_head SET last_seq = last_seq - 1"))
    head = await _head(engine)
    with pytest.raises(IntegrityError) as refused:
        async with engine.begin() as connection:
            await writer.append(connection, _records()[2:])
    assert not is_store_outage(refused.value)  # a 500 (a bug), not a 503
    assert await _count(engine) == 2
    assert await _head(engine) == head  # the head lock's update went with the insert


async def test_an_empty_batch_writes_nothing(engine: AsyncEngine) -> None:
    head = await _head(engine)
    async with engine.begin() as connection:
        await ChainWriter.build(TEST_AUDIT_KEYS).append(connection, [])
    assert await _count(engine) == 0
    assert await _head(engine) == head


async def test_a_driver_without_positional_parameters_is_refused_by_name(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'named.db'}", paramstyle="named")
    try:
        async with engine.begin() as connection:
            with pytest.raises(ValueError, match="aiosqlite and asyncpg, not paramstyle 'named'"):
                await ChainWriter.build(TEST_AUDIT_KEYS).append(connection, _records()[:1])
    finally:
        await engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with scratch_postgres() as url:
        yield async_database_url(url)


async def test_losing_the_connection_during_the_insert_is_a_store_outage(postgres_url: str) -> None:
    # PostgreSQL only: a SQLite file has no connection to lose.
    engine = create_engine(postgres_url)
    await upgrade_database(engine, keys=TEST_KEYS)
    writer = ChainWriter.build(TEST_AUDIT_KEYS)
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    locker = await asyncpg.connect(dsn)
    try:
        head = await _head(engine)
        # The records' table is locked, the head is not: the writer takes the head lock, then waits
        # in its insert, where the test ends its server connection.
        await locker.execute("BEGIN; LOCK TABLE audit_records IN EXCLUSIVE MODE")

        async def append() -> None:
            async with engine.begin() as connection:
                await writer.append(connection, _records())

        appending = asyncio.create_task(append())
        waiting_pid = None
        for _ in range(500):
            # Only the insert touches the records' table (pg_stat_activity does not show its text
            # while it waits: asyncpg's executemany is still parsing it).
            waiting_pid = await locker.fetchval(
                "SELECT pid FROM pg_locks WHERE relation = 'audit_records'::regclass AND NOT granted"
            )
            if waiting_pid is not None or appending.done():
                break
            await asyncio.sleep(0.01)
        assert waiting_pid is not None, "the writer never waited in its insert"
        await locker.fetchval("SELECT pg_terminate_backend($1)", waiting_pid)
        with pytest.raises(DBAPIError) as lost:
            await appending
        assert is_store_outage(lost.value)
        await locker.execute("ROLLBACK")
        assert await _count(engine) == 0
        assert await _head(engine) == head
        # The pool replaced the lost connection: the next append just works.
        async with engine.begin() as connection:
            await writer.append(connection, _records())
        assert (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).records == len(_records())
    finally:
        await locker.close()
        await engine.dispose()


def test_the_edge_records_are_what_they_claim() -> None:
    # The comparison above is only as good as its edges: they must survive `column_values` as given.
    values = _records()
    assert values[0]["status"] == _INT4_MAX
    assert values[1]["occurred_at"] == 0.0
    assert math.copysign(1.0, values[1]["occurred_at"]) == 1.0  # -0.0 is stored as 0.0
    assert values[1]["latency_ms"] == 1.7976931348623157e308
    assert values[3]["action"] == "verdict.record"
