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

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, Integer, String, Update, bindparam, func, insert, select, update
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

    Its three statements are built once: SQLAlchemy then reuses their compiled form instead of
    deriving a cache key for new statement objects on every commit."""

    keys: AuditKeys
    lock_head: Update
    insert_records: Insert
    store_head_hash: Update

    @classmethod
    def build(cls, keys: AuditKeys) -> ChainWriter:
        head = audit_chain_head.c
        return cls(
            keys=keys,
            lock_head=update(audit_chain_head)
            .where(head.id == HEAD_ROW_ID)
            .values(last_seq=head.last_seq + bindparam("batch_size", type_=Integer))
            .returning(head.last_seq, head.last_hash),
            insert_records=insert(audit_records),
            store_head_hash=update(audit_chain_head)
            .where(head.id == HEAD_ROW_ID)
            .values(last_hash=bindparam("new_hash", type_=String)),
        )

    async def append(self, connection: AsyncConnection, batch: list[dict[str, Any]]) -> None:
        """Chains `batch` (column values, see `column_values`) after the current head. The head lock
        is the first thing taken: see the module docstring."""
        locked = (await connection.execute(self.lock_head, {"batch_size": len(batch)})).one_or_none()
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
        await connection.execute(self.insert_records, rows)
        await connection.execute(self.store_head_hash, {"new_hash": prev_hash})


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
