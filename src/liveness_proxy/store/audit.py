"""The audit log: one record per liveness request, a tamper-evident hash chain, written by group commit.

Writing
-------
`AuditLog.append(record)` queues the record and returns once the transaction holding it has
committed. One writer task per `AuditLog` takes whatever is queued (at most `batch_max` records) and
writes it in one transaction; while that commit is in flight, new records queue up for the next one.
There is no timer: a lone request pays one commit, and under load a commit covers many requests.

Each transaction first locks the one-row `audit_chain_head` table by updating it
(`UPDATE … SET last_seq = last_seq + n … RETURNING last_seq, last_hash`), then inserts the records
with the sequence numbers and hashes that follow, then stores the new last hash. Taking the lock
*before* reading the head is what makes several writers safe: on SQLite an UPDATE as the first
statement takes the database write lock (other processes wait up to the busy timeout, and no
snapshot can be stale); on PostgreSQL it takes the row lock, and a writer queued behind it reads the
committed head when the lock is released (READ COMMITTED). The records and the head commit together,
so a crash leaves either both or neither.

The chain and the record format are in `store/audit_chain.py`; verification and purge, which walk
the chain, in `store/audit_verify.py`.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Dialect, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.audit_chain import (
    HEAD_ROW_ID,
    AuditChainMissing,
    AuditKeys,
    AuditRecord,
    column_values,
)
from liveness_proxy.store.audit_verify import (
    SCAN_BATCH,
    ChainVerdict,
    PlainValueCheck,
    PurgeResult,
    purge_chain,
    verify_chain,
)
from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.tables import audit_chain_head, audit_records

DEFAULT_BATCH_MAX = 256


class AuditLogClosed(RuntimeError):
    """`append` after `close()`, or a record whose writer was cancelled before it was written."""


@dataclass(frozen=True, slots=True)
class ChainWriter:
    """Appends records to the chain inside a transaction the caller holds: the audit log's group
    commit, or a system event that must commit together with the fact it records (a verdict).

    Its three statements are SQL strings in the driver's own parameter style, run with
    `exec_driver_sql`, values as tuples: SQLAlchemy neither compiles them nor processes a parameter
    of the records (which cost ~20 µs per record in the insert, more than the database's own work;
    see "The audit append" in docs/performance.md). They still run through SQLAlchemy's connection,
    so they are part of its transaction, and a driver error is wrapped as any other (a lost
    connection is a `DBAPIError` that invalidates it, and `is_store_outage` recognises it).

    The values need no conversion: `column_values` checks every value against its column's type
    (floats are floats, integers 32-bit ints, strings str), the writer adds `seq` (int), and the
    hashes and key id (str). SQLAlchemy's processing left such values as they were (its only
    processor here, SQLite's `float()` on REAL columns, is the identity on a float)."""

    keys: AuditKeys
    # By dialect and paramstyle (an engine has one; the writer may serve several): built on first use.
    _statements: dict[tuple[str, str], _DriverStatements] = field(default_factory=dict)

    @classmethod
    def build(cls, keys: AuditKeys) -> ChainWriter:
        return cls(keys=keys)

    async def append(self, connection: AsyncConnection, batch: list[dict[str, Any]]) -> None:
        """Chains `batch` (column values, see `column_values`) after the current head. The head lock
        is the first thing taken: see the module docstring."""
        if not batch:
            return
        statements = self._statements_for(connection.dialect)
        locked = (await connection.exec_driver_sql(statements.lock_head, (len(batch),))).one_or_none()
        if locked is None:
            raise AuditChainMissing("the audit chain head is missing: run `liveness-proxy db upgrade`")
        seq = int(locked.last_seq) - len(batch)
        prev_hash = str(locked.last_hash)
        key_id = self.keys.signing_key_id
        rows = []
        for values in batch:
            seq += 1
            row = {**values, "seq": seq, "prev_hash": prev_hash, "key_id": key_id}
            row["record_hash"] = prev_hash = self.keys.sign(row)
            rows.append(row)
        insert_sql, values_of = statements.insert(tuple(rows[0]))
        if any(len(row) != len(rows[0]) for row in rows):  # a missing column is a KeyError below
            raise ValueError("the records of one audit batch must have the same columns")
        await connection.exec_driver_sql(insert_sql, [values_of(row) for row in rows])
        await connection.exec_driver_sql(statements.store_head_hash, (prev_hash,))

    def _statements_for(self, dialect: Dialect) -> _DriverStatements:
        key = (dialect.name, dialect.paramstyle)
        statements = self._statements.get(key)
        if statements is None:
            statements = self._statements[key] = _DriverStatements.build(dialect)
        return statements


@dataclass(frozen=True, slots=True)
class _DriverStatements:
    """The chain writer's SQL for one dialect and paramstyle. The insert names the columns of the
    records it is given (whatever `column_values` returns, plus the chain's four), in their order;
    one string per column list, built once."""

    lock_head: str
    store_head_hash: str
    quote: Callable[[str], str]
    placeholder: Callable[[int], str]
    _inserts: dict[tuple[str, ...], tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]]

    @classmethod
    def build(cls, dialect: Dialect) -> _DriverStatements:
        # S608/B608 below: the SQL is built from our own table's names, quoted by the dialect, and the
        # constant HEAD_ROW_ID; every value is a bound parameter.
        placeholder = _positional_placeholder(dialect.paramstyle)
        quote = dialect.identifier_preparer.quote
        head = quote(audit_chain_head.name)
        last_seq, last_hash, row_id = (quote(name) for name in ("last_seq", "last_hash", "id"))
        where = f"WHERE {row_id} = {int(HEAD_ROW_ID)}"
        lock_head = f"UPDATE {head} SET {last_seq} = {last_seq} + {placeholder(1)} {where}"  # noqa: S608 # nosec B608
        return cls(
            lock_head=f"{lock_head} RETURNING {last_seq}, {last_hash}",
            store_head_hash=f"UPDATE {head} SET {last_hash} = {placeholder(1)} {where}",  # noqa: S608 # nosec B608
            quote=quote,
            placeholder=placeholder,
            _inserts={},
        )

    def insert(self, columns: tuple[str, ...]) -> tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]]]:
        """The INSERT of rows with these columns, and the function that makes a row its values."""
        known = self._inserts.get(columns)
        if known is None:
            unknown = [name for name in columns if name not in audit_records.c]
            if unknown or len(columns) < 2:  # names come from our code; itemgetter of one is no tuple
                raise ValueError(f"not columns of the audit records (or too few): {unknown or columns}")
            names = ", ".join(self.quote(name) for name in columns)
            marks = ", ".join(self.placeholder(position) for position in range(1, len(columns) + 1))
            table = self.quote(audit_records.name)
            # Our own table's names, quoted by the dialect, as in `build`; every value is bound.
            sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608 # nosec B608
            known = self._inserts[columns] = (sql, operator.itemgetter(*columns))
        return known


def _positional_placeholder(paramstyle: str) -> Callable[[int], str]:
    """The driver's marker for the n-th (1-based) positional parameter, for the two drivers the
    proxy runs (`async_database_url` maps every SQLite and PostgreSQL URL to them)."""
    match paramstyle:
        case "qmark":  # aiosqlite
            return lambda _position: "?"
        case "numeric_dollar":  # asyncpg
            return lambda position: f"${position}"
        case _:
            raise ValueError(
                f"the audit writer supports aiosqlite and asyncpg, not paramstyle {paramstyle!r}"
            )


class AuditLog:
    """Append-only, hash-chained audit records. `append` returns once the record is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        keys: AuditKeys,
        *,
        batch_max: int = DEFAULT_BATCH_MAX,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._chain = ChainWriter.build(keys)
        self._committer: GroupCommitter[dict[str, Any]] = GroupCommitter(
            self._write_values,
            batch_max=batch_max,
            name="audit writer",
            closed_error=AuditLogClosed,
            on_commit=on_commit,
        )

    # -- writing -------------------------------------------------------------------------------------

    async def append(self, record: AuditRecord) -> None:
        """Returns when the record is committed; raises what the commit raised (for the whole batch).

        A record that can never be stored (NaN, a string longer than its column, a NUL character
        PostgreSQL refuses) raises ValueError here, before it could fail a batch of other records.
        Cancelling the caller does not withdraw a queued record: it is still written."""
        if self._committer.closed:
            raise AuditLogClosed("the audit log is closed")
        await self._committer.submit(column_values(record))

    async def close(self) -> None:
        """Writes everything already queued, then stops the writer. Later appends raise."""
        await self._committer.close()

    async def _write_values(self, batch: list[dict[str, Any]]) -> list[BaseException | None]:
        # One transaction for the batch: a failure rolls it all back, so no seq is used and the
        # chain stays contiguous (the committer fails every caller of the batch with it).
        await self._write_batch(batch)
        return [None] * len(batch)

    async def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        async with self._engine.begin() as connection:
            await self._chain.append(connection, batch)

    # -- reading -------------------------------------------------------------------------------------

    def iterate(
        self, *, since: float | None = None, until: float | None = None, batch_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """See `iterate_records`."""
        return iterate_records(self._engine, since=since, until=until, batch_size=batch_size)

    async def count(self) -> int:
        async with self._engine.connect() as connection:
            total = (await connection.execute(select(func.count()).select_from(audit_records))).scalar_one()
        return int(total)

    async def verify(
        self, *, subjects: PlainValueCheck | None = None, batch_size: int = SCAN_BATCH
    ) -> ChainVerdict:
        """Walks the chain from the anchor to the head; see `audit_verify.verify_chain`."""
        return await verify_chain(self._engine, self._keys, subjects=subjects, batch_size=batch_size)

    # -- purging -------------------------------------------------------------------------------------

    async def purge(self, *, older_than: float, batch_size: int = SCAN_BATCH) -> PurgeResult:
        """Deletes the oldest records that occurred before `older_than`; see `audit_verify.purge_chain`."""
        return await purge_chain(self._engine, self._keys, older_than=older_than, batch_size=batch_size)


async def iterate_records(
    engine: AsyncEngine, *, since: float | None = None, until: float | None = None, batch_size: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Records in chain order as plain dicts (for export, which needs no key), optionally only those
    that occurred in [since, until). Each batch is its own read, so a long export holds no lock."""
    last_seq: int | None = None
    while True:
        query = select(audit_records).order_by(audit_records.c.seq).limit(batch_size)
        if last_seq is not None:
            query = query.where(audit_records.c.seq > last_seq)
        if since is not None:
            query = query.where(audit_records.c.occurred_at >= since)
        if until is not None:
            query = query.where(audit_records.c.occurred_at < until)
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        if not rows:
            return
        for row in rows:
            # Column names come back as quoted_name (a str subclass): make them plain str.
            yield {str(key): value for key, value in row._mapping.items()}
        last_seq = int(rows[-1].seq)
