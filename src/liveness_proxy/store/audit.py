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

The chain
---------
Every record has `seq` (1, 2, 3, … with no gaps: assigned under the head lock, not the autoincrement
`id`, which a rolled-back insert can skip), `prev_hash` (the `record_hash` of seq - 1; for seq 1 the
genesis value, 64 zeros) and `record_hash`, the lowercase hex SHA-256 of its canonical encoding:

    a JSON object with exactly the twelve members action, credential_id, latency_ms, occurred_at,
    prev_hash, problem, request_id, seq, session_id, status, subject, upstream_status (every column
    but `id`, which the database assigns after hashing, and `record_hash` itself), keys in sorted
    order, no whitespace, UTF-8; null as null;
    strings as JSON strings escaping only `"`, `\\` and control characters (`\\b \\t \\n \\f \\r`,
    others as `\\u00xx`), everything else written as itself;
    integers (seq, status, upstream_status) as JSON integers;
    floats (occurred_at, latency_ms) as JSON strings of 16 lowercase hex digits, the big-endian
    IEEE-754 binary64 bit pattern, after mapping -0.0 to 0.0.

With floats carried as strings this is also the object's RFC 8785 (JCS) form, so the hash can be
recomputed from an export in any language. Floats are hashed as bits, not decimals, because both
engines store binary64 exactly (SQLite REAL, PostgreSQL double precision): what is read back is what
was hashed, whichever library formats decimals. SQLite stores -0.0 as 0 and NaN as NULL, hence the
-0.0 mapping and the refusal of NaN and infinities at `append`.

A purge deletes the oldest records and records the last deleted one as the anchor (`anchor_seq`,
`anchor_hash` in the head row): verification starts there. The chain proves that records were not
altered, removed or reordered by anyone who cannot also rewrite every later hash and the head;
someone with full write access to the database can rewrite all of it, so keep the head hash that
`verify` prints somewhere else (a ticket, a log shipper) and compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import Float, Insert, Integer, String, Update, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.group_commit import GroupCommitter
from liveness_proxy.store.tables import audit_chain_head, audit_records

GENESIS_HASH = "0" * 64
HEAD_ROW_ID = 1
DEFAULT_BATCH_MAX = 256
# Rows per read while verifying or exporting, and per transaction while purging: small enough that
# a purge holds the write lock for milliseconds, large enough that round trips do not dominate.
SCAN_BATCH = 5000


@dataclass(frozen=True, slots=True)
class AuditRecord:
    occurred_at: float
    request_id: str
    subject: str | None
    credential_id: str | None
    action: str
    session_id: str | None
    status: int
    upstream_status: int | None
    latency_ms: float
    problem: str | None


RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(AuditRecord))
HASHED_FIELDS = tuple(sorted((*RECORD_FIELDS, "seq", "prev_hash")))
_FLOAT_FIELDS = frozenset(name for name in HASHED_FIELDS if isinstance(audit_records.c[name].type, Float))
_PG_INT4 = 2**31  # PostgreSQL INTEGER is 32-bit: a larger value would fail the whole batch there


class AuditLogClosed(RuntimeError):
    """`append` after `close()`, or a record whose writer was cancelled before it was written."""


class AuditChainMissing(RuntimeError):
    """The chain-head row is not there: the database was not migrated (`liveness-proxy db upgrade`)."""


ProblemKind = Literal["altered", "deleted", "relinked", "truncated", "unexpected"]


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first place where the chain does not hold.

    `altered`: the record's content does not match its hash. `deleted`: sequence numbers are missing
    before this record. `relinked`: its prev_hash is not the previous record's hash (a record before
    it was replaced and rehashed, or records were reordered). `truncated`: the chain ends before the
    head says it does (`record_id` is None: the record is gone). `unexpected`: a record outside the
    range the head and anchor describe."""

    kind: ProblemKind
    seq: int
    record_id: int | None
    detail: str


class AuditChainBroken(Exception):
    """Raised by `purge` instead of deleting records whose chain does not verify."""

    def __init__(self, problem: ChainProblem) -> None:
        super().__init__(f"seq {problem.seq} (id {problem.record_id}): {problem.kind}: {problem.detail}")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """`records` verified, from `first_seq` (just after the anchor) to `head_seq` when `ok`."""

    records: int
    first_seq: int
    head_seq: int
    head_hash: str
    anchor_seq: int
    anchor_hash: str
    problem: ChainProblem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class PurgeResult:
    purged: int
    anchor_seq: int
    anchor_hash: str


@dataclass(frozen=True, slots=True)
class _WriterStatements:
    """The writer's three statements, built once: SQLAlchemy then reuses their compiled form instead
    of deriving a cache key for new statement objects on every commit."""

    lock_head: Update
    insert_records: Insert
    store_head_hash: Update

    @classmethod
    def build(cls) -> _WriterStatements:
        head = audit_chain_head.c
        return cls(
            lock_head=update(audit_chain_head)
            .where(head.id == HEAD_ROW_ID)
            .values(last_seq=head.last_seq + bindparam("batch_size", type_=Integer))
            .returning(head.last_seq, head.last_hash),
            insert_records=insert(audit_records),
            store_head_hash=update(audit_chain_head)
            .where(head.id == HEAD_ROW_ID)
            .values(last_hash=bindparam("new_hash", type_=String)),
        )


class AuditLog:
    """Append-only, hash-chained audit records. `append` returns once the record is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_max: int = DEFAULT_BATCH_MAX,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._engine = engine
        self._statements = _WriterStatements.build()
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
        await self._committer.submit(_column_values(record))

    async def close(self) -> None:
        """Writes everything already queued, then stops the writer. Later appends raise."""
        await self._committer.close()

    async def _write_values(self, batch: list[dict[str, Any]]) -> list[BaseException | None]:
        # One transaction for the batch: a failure rolls it all back, so no seq is used and the
        # chain stays contiguous (the committer fails every caller of the batch with it).
        await self._write_batch(batch)
        return [None] * len(batch)

    async def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        statements = self._statements
        async with self._engine.begin() as connection:
            # The lock comes first, the read with it: see the module docstring.
            locked = (
                await connection.execute(statements.lock_head, {"batch_size": len(batch)})
            ).one_or_none()
            if locked is None:
                raise AuditChainMissing("the audit chain head is missing: run `liveness-proxy db upgrade`")
            seq = int(locked.last_seq) - len(batch)
            prev_hash = str(locked.last_hash)
            rows = []
            for values in batch:
                seq += 1
                row = {**values, "seq": seq, "prev_hash": prev_hash}
                row["record_hash"] = prev_hash = record_hash(row)
                rows.append(row)
            await connection.execute(statements.insert_records, rows)
            await connection.execute(statements.store_head_hash, {"new_hash": prev_hash})

    # -- reading -------------------------------------------------------------------------------------

    async def iterate(
        self, *, since: float | None = None, until: float | None = None, batch_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Records in chain order as plain dicts (for export), optionally only those that occurred in
        [since, until). Each batch is its own read, so a long export holds no lock."""
        last_seq: int | None = None
        while True:
            query = select(audit_records).order_by(audit_records.c.seq).limit(batch_size)
            if last_seq is not None:
                query = query.where(audit_records.c.seq > last_seq)
            if since is not None:
                query = query.where(audit_records.c.occurred_at >= since)
            if until is not None:
                query = query.where(audit_records.c.occurred_at < until)
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query)).all()
            if not rows:
                return
            for row in rows:
                # Column names come back as quoted_name (a str subclass): make them plain str.
                yield {str(key): value for key, value in row._mapping.items()}
            last_seq = int(rows[-1].seq)

    async def count(self) -> int:
        async with self._engine.connect() as connection:
            total = (await connection.execute(select(func.count()).select_from(audit_records))).scalar_one()
        return int(total)

    async def verify(self, *, batch_size: int = SCAN_BATCH) -> ChainVerdict:
        """Walks the chain from the anchor to the head in one read snapshot, `batch_size` rows at a
        time, and reports the first record where it breaks."""
        async with _read_snapshot(self._engine) as connection:
            head = await _read_head(connection)
            walker = _ChainWalker(int(head.anchor_seq), str(head.anchor_hash))
            head_seq = int(head.last_seq)
            problem: ChainProblem | None = None
            last_seq: int | None = None
            while problem is None:
                query = select(audit_records).order_by(audit_records.c.seq).limit(batch_size)
                if last_seq is not None:
                    query = query.where(audit_records.c.seq > last_seq)
                rows = (await connection.execute(query)).all()
                if not rows:
                    break
                for row in rows:
                    problem = _outside_head(row, walker.anchor_seq, head_seq) or walker.check(row)
                    if problem is not None:
                        break
                last_seq = int(rows[-1].seq)
            if problem is None:
                problem = walker.check_end(head_seq, str(head.last_hash))
        return ChainVerdict(
            records=walker.verified,
            first_seq=walker.anchor_seq + 1,
            head_seq=head_seq,
            head_hash=str(head.last_hash),
            anchor_seq=walker.anchor_seq,
            anchor_hash=walker.anchor_hash,
            problem=problem,
        )

    # -- purging -------------------------------------------------------------------------------------

    async def purge(self, *, older_than: float, batch_size: int = SCAN_BATCH) -> PurgeResult:
        """Deletes the oldest records that occurred before `older_than` (epoch seconds).

        Only a prefix of the chain is deleted, so no gap is ever left that the anchor does not
        explain: a record older than the cutoff that follows a newer one (clocks of two workers a
        little apart) stays until the records before it go. Each transaction deletes at most
        `batch_size` records and moves the anchor to the last of them, so every commit leaves a
        verifiable chain and no transaction holds the write lock for long. The records are verified
        before they are deleted: a purge never launders tampering (it raises AuditChainBroken)."""
        head = audit_chain_head.c
        purged = 0
        while True:
            async with self._engine.begin() as connection:
                # Locks the head like a writer does, so two purges (or a purge and a writer's
                # read-modify-write of the head) never interleave.
                locked = (
                    await connection.execute(
                        update(audit_chain_head)
                        .where(head.id == HEAD_ROW_ID)
                        .values(anchor_seq=head.anchor_seq)
                        .returning(head.anchor_seq, head.anchor_hash)
                    )
                ).one_or_none()
                if locked is None:
                    raise AuditChainMissing(
                        "the audit chain head is missing: run `liveness-proxy db upgrade`"
                    )
                walker = _ChainWalker(int(locked.anchor_seq), str(locked.anchor_hash))
                rows = (
                    await connection.execute(
                        select(audit_records)
                        .where(audit_records.c.seq > walker.anchor_seq)
                        .order_by(audit_records.c.seq)
                        .limit(batch_size)
                    )
                ).all()
                expired = 0
                for row in rows:
                    # A non-float time can only be tampering: keep that record (and all after it).
                    if type(row.occurred_at) is not float or row.occurred_at >= older_than:
                        break
                    problem = walker.check(row)
                    if problem is not None:
                        raise AuditChainBroken(problem)
                    expired += 1
                if expired == 0:
                    return PurgeResult(purged, walker.anchor_seq, walker.anchor_hash)
                # The anchor becomes the last record deleted: its seq and hash are all verify needs.
                anchor = (walker.next_seq - 1, walker.prev_hash)
                await connection.execute(
                    delete(audit_records).where(
                        audit_records.c.seq > walker.anchor_seq, audit_records.c.seq <= anchor[0]
                    )
                )
                await connection.execute(
                    update(audit_chain_head)
                    .where(head.id == HEAD_ROW_ID)
                    .values(anchor_seq=anchor[0], anchor_hash=anchor[1])
                )
            purged += expired
            if expired < len(rows) or len(rows) < batch_size:
                return PurgeResult(purged, *anchor)


# -- the canonical encoding -------------------------------------------------------------------------


def canonical_bytes(values: Mapping[Any, Any]) -> bytes:
    """The bytes a record's hash is taken over (see the module docstring). Raises ValueError for a
    value that has no canonical form (wrong type, NaN, infinity)."""
    document: dict[str, Any] = {}
    for name in HASHED_FIELDS:
        value = values[name]
        if name in _FLOAT_FIELDS:
            document[name] = _float_bits(value)
        elif value is None or (type(value) is int) or (type(value) is str):
            document[name] = value
        else:
            raise ValueError(f"{name}: {type(value).__name__} has no canonical form")
    try:  # orjson refuses strings that are not valid Unicode (lone surrogates)
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"not encodable: {exc}") from None


def record_hash(values: Mapping[Any, Any]) -> str:
    """Lowercase hex SHA-256 of `canonical_bytes(values)`."""
    return hashlib.sha256(canonical_bytes(values)).hexdigest()


def _float_bits(value: Any) -> str:
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"{type(value).__name__} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("NaN and infinities have no canonical form")
    return struct.pack(">d", number + 0.0).hex()  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True, slots=True)
class _ColumnRule:
    """What a column of `audit_records` accepts, read from the table once (not on every append)."""

    name: str
    kind: Literal["float", "int", "str"]
    nullable: bool
    max_length: int | None


def _column_rules() -> tuple[_ColumnRule, ...]:
    rules = []
    for name in RECORD_FIELDS:
        column = audit_records.c[name]
        kind: Literal["float", "int", "str"]
        if isinstance(column.type, Float):
            kind = "float"
        elif isinstance(column.type, Integer):
            kind = "int"
        elif isinstance(column.type, String):
            kind = "str"
        else:
            raise TypeError(f"audit column {name} has a type the record rules do not know")
        length = column.type.length if isinstance(column.type, String) else None
        rules.append(_ColumnRule(name, kind, bool(column.nullable), length))
    return tuple(rules)


_COLUMN_RULES = _column_rules()


def _column_values(record: AuditRecord) -> dict[str, Any]:
    """The record as column values, checked against what both engines can store exactly."""
    values: dict[str, Any] = {}
    for rule in _COLUMN_RULES:
        name = rule.name
        value = getattr(record, name)
        if value is None:
            if not rule.nullable:
                raise ValueError(f"audit record {name}: required")
            values[name] = None
        elif rule.kind == "float":
            _float_bits(value)
            values[name] = float(value) + 0.0
        elif rule.kind == "int":
            if type(value) is not int or not -_PG_INT4 <= value < _PG_INT4:
                raise ValueError(f"audit record {name}: expected a 32-bit integer")
            values[name] = value
        else:
            if type(value) is not str:
                raise ValueError(f"audit record {name}: expected a string")
            if rule.max_length is not None and len(value) > rule.max_length:
                raise ValueError(f"audit record {name}: longer than {rule.max_length} characters")
            if "\x00" in value:
                raise ValueError(f"audit record {name}: contains NUL, which PostgreSQL cannot store")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    raise ValueError(f"audit record {name}: not valid Unicode") from None
            values[name] = value
    return values


# -- verification -----------------------------------------------------------------------------------


class _ChainWalker:
    """Checks records one by one, in seq order, from an anchor (seq 0 and the genesis hash at first)."""

    def __init__(self, anchor_seq: int, anchor_hash: str) -> None:
        self.anchor_seq = anchor_seq
        self.anchor_hash = anchor_hash
        self.next_seq = anchor_seq + 1
        self.prev_hash = anchor_hash
        self.verified = 0
        self.last_id: int | None = None

    def check(self, row: Row[Any]) -> ChainProblem | None:
        seq, record_id = int(row.seq), int(row.id)
        if seq != self.next_seq:
            if seq > self.next_seq:
                missing = (
                    f"seq {self.next_seq}" if seq == self.next_seq + 1 else f"seq {self.next_seq}..{seq - 1}"
                )
                return ChainProblem(
                    "deleted", seq, record_id, f"the records before it ({missing}) are missing: deleted"
                )
            return ChainProblem("unexpected", seq, record_id, f"expected seq {self.next_seq} here")
        values = row._mapping
        try:
            computed: str | None = record_hash(values)
        except ValueError:
            computed = None
        if computed != values["record_hash"]:
            return ChainProblem(
                "altered", seq, record_id, "its content does not match its record_hash: altered"
            )
        if values["prev_hash"] != self.prev_hash:
            if seq > self.anchor_seq + 1:
                before = f"record seq {seq - 1}"
            else:
                before = "the purge anchor" if self.anchor_seq else "the genesis value"
            return ChainProblem(
                "relinked",
                seq,
                record_id,
                f"its prev_hash is not the hash of {before}: a record before it was replaced, "
                "or records were reordered",
            )
        self.next_seq += 1
        self.prev_hash = str(values["record_hash"])
        self.verified += 1
        self.last_id = record_id
        return None

    def check_end(self, head_seq: int, head_hash: str) -> ChainProblem | None:
        last_seq = self.next_seq - 1
        if last_seq < head_seq:
            ending = f"at seq {last_seq} (id {self.last_id})" if self.verified else "before its first record"
            missing = (
                f"seq {self.next_seq}" if head_seq == self.next_seq else f"seq {self.next_seq}..{head_seq}"
            )
            return ChainProblem(
                "truncated",
                self.next_seq,
                None,
                f"the head says the chain ends at seq {head_seq}, it ends {ending}: {missing} "
                "missing (tail truncated)",
            )
        if self.prev_hash != head_hash:
            return ChainProblem(
                "truncated",
                last_seq,
                self.last_id,
                "the last record's hash is not the head's: the last record was replaced or the head altered",
            )
        return None


def _outside_head(row: Row[Any], anchor_seq: int, head_seq: int) -> ChainProblem | None:
    seq = int(row.seq)
    if seq <= anchor_seq:
        return ChainProblem(
            "unexpected", seq, int(row.id), f"a record at or before the purge anchor (seq {anchor_seq})"
        )
    if seq > head_seq:
        return ChainProblem(
            "unexpected",
            seq,
            int(row.id),
            f"a record after the head (seq {head_seq}): not written by the audit writer",
        )
    return None


async def _read_head(connection: AsyncConnection) -> Row[Any]:
    head = (
        await connection.execute(select(audit_chain_head).where(audit_chain_head.c.id == HEAD_ROW_ID))
    ).one_or_none()
    if head is None:
        raise AuditChainMissing("the audit chain head is missing: run `liveness-proxy db upgrade`")
    return head


@contextlib.asynccontextmanager
async def _read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One connection whose reads all see the same committed state, writers carrying on meanwhile."""
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # The sqlite3 driver only opens a transaction before a write, so each SELECT would see a
            # newer database; an explicit BEGIN pins one WAL snapshot for the whole walk (a reader
            # blocks no writer in WAL mode). Leaving the block rolls it back.
            await connection.exec_driver_sql("BEGIN")
        else:
            await connection.execution_options(isolation_level="REPEATABLE READ")
        yield connection
