"""Walking the audit chain: `verify` checks it from the purge anchor to the head, `purge` deletes
its oldest records and moves the anchor (the chain and its encoding: `store/audit_chain.py`).

Verification checks each record's HMAC under the key it names, its link to the record before, the
sequence, the head, and every plain value still present against its commitment: a subject against
the commitment under that subject's secret (looked up in `subject_secrets`), other personal values
against theirs. An erased value has nothing left to check and passes; the commitment it leaves
behind is still covered by the HMAC."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.audit_chain import (
    HEAD_ROW_ID,
    PEPPER_AUDIT_KEY_ID,
    AuditChainMissing,
    AuditKeys,
    personal_matches,
)
from liveness_proxy.store.tables import audit_chain_head, audit_records

# Rows per read while verifying or exporting, and per transaction while purging: small enough that
# a purge holds the write lock for milliseconds, large enough that round trips do not dominate.
SCAN_BATCH = 5000


ProblemKind = Literal["altered", "deleted", "relinked", "truncated", "unexpected", "orphaned"]


class PlainValueCheck(Protocol):
    """What verification asks about plain subjects (`subjects.SubjectRegistry` answers)."""

    async def commitments_of(self, subjects: set[str], connection: AsyncConnection) -> dict[str, str | None]:
        """Each subject's commitment under its secret; None for a subject that has no secret."""
        ...


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first place where the chain does not hold.

    `altered`: the record's content does not match its hash, or a plain value does not match its
    commitment. `orphaned`: a plain subject whose secret is gone (an erasure did not finish:
    run it again). `deleted`: sequence numbers are missing
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


async def verify_chain(
    engine: AsyncEngine,
    keys: AuditKeys,
    *,
    subjects: PlainValueCheck | None = None,
    batch_size: int = SCAN_BATCH,
) -> ChainVerdict:
    """Walks the chain from the anchor to the head in one read snapshot, `batch_size` rows at a
    time, and reports the first record where it breaks. Without `subjects`, plain subjects are not
    checked against their commitments (everything else is)."""
    async with read_snapshot(engine) as connection:
        head = await _read_head(connection)
        walker = _ChainWalker(keys, int(head.anchor_seq), str(head.anchor_hash))
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
            commitments: dict[str, str | None] | None = None
            if subjects is not None:
                plain = {str(row.subject) for row in rows if row.subject is not None}
                try:
                    commitments = await subjects.commitments_of(plain, connection) if plain else {}
                except ValueError as exc:  # a secret that does not open (store/subjects.py)
                    first = next(row for row in rows if row.subject is not None)
                    problem = ChainProblem(
                        "altered",
                        int(first.seq),
                        int(first.id),
                        f"a subject secret of the records from here on does not open: {exc}",
                    )
                    break
            for row in rows:
                problem = (
                    _outside_head(row, walker.anchor_seq, head_seq)
                    or walker.check(row)
                    or _plain_values(row, commitments)
                )
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


async def purge_chain(
    engine: AsyncEngine, keys: AuditKeys, *, older_than: float, batch_size: int = SCAN_BATCH
) -> PurgeResult:
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
        async with engine.begin() as connection:
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
                raise AuditChainMissing("the audit chain head is missing: run `liveness-proxy db upgrade`")
            walker = _ChainWalker(keys, int(locked.anchor_seq), str(locked.anchor_hash))
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


# -- verification -----------------------------------------------------------------------------------


class _ChainWalker:
    """Checks records one by one, in seq order, from an anchor (seq 0 and the genesis hash at first)."""

    def __init__(self, keys: AuditKeys, anchor_seq: int, anchor_hash: str) -> None:
        self.keys = keys
        self.anchor_seq = anchor_seq
        self.anchor_hash = anchor_hash
        self.next_seq = anchor_seq + 1
        self.prev_hash = anchor_hash
        self.verified = 0
        self.last_id: int | None = None
        self.last_key_id: str | None = None

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
        if self.keys.get(str(values["key_id"])) is None:
            return ChainProblem(
                "altered",
                seq,
                record_id,
                f"it names the audit key {values['key_id']!r}, which is not configured: "
                "add it to LIVENESS_PROXY_AUDIT_KEYS_FILE, or the record was altered",
            )
        try:
            computed: str | None = self.keys.sign(values)
        except ValueError:
            computed = None
        if computed is None or not hmac.compare_digest(computed, str(values["record_hash"])):
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
        self.last_key_id = str(values["key_id"])
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
        if self.last_key_id == PEPPER_AUDIT_KEY_ID and self.keys.signing_key_id != PEPPER_AUDIT_KEY_ID:
            # The pepper's key still verifies the records written before the keys file, but whoever
            # holds the pepper could re-sign a whole tail with it. With a keys file, a live chain ends
            # in a record signed by one of its keys: one that does not was re-signed, or nothing has
            # been written since the file was added.
            return ChainProblem(
                "altered",
                last_seq,
                self.last_id,
                "the last record is signed with the pepper's key although LIVENESS_PROXY_AUDIT_KEYS_FILE "
                "lists keys: records re-signed by someone who holds the pepper, or none written since the "
                "keys file was added (let the proxy write one, then verify again)",
            )
        return None


def _plain_values(row: Row[Any], commitments: dict[str, str | None] | None) -> ChainProblem | None:
    """The record's plain values against its commitments (after its hash held)."""
    seq, record_id = int(row.seq), int(row.id)
    if row.personal is not None and not personal_matches(str(row.personal), row.personal_commitment):
        return ChainProblem(
            "altered", seq, record_id, "its plain personal values do not match their commitment"
        )
    if row.subject is None or commitments is None:
        return None
    if row.subject_commitment is None:
        return ChainProblem("altered", seq, record_id, "it holds a plain subject but no commitment to it")
    expected = commitments.get(str(row.subject))
    if expected is None:
        return ChainProblem(
            "orphaned",
            seq,
            record_id,
            "it holds a plain subject whose secret is gone: an erasure did not finish (run it again)",
        )
    if not hmac.compare_digest(expected, str(row.subject_commitment)):
        return ChainProblem(
            "altered", seq, record_id, "its plain subject does not match its commitment: altered"
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
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One connection whose reads all see the same committed state, writers carrying on meanwhile
    (also used by `store/audit_checkpoints.py` to compare checkpoints with the chain)."""
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # The sqlite3 driver only opens a transaction before a write, so each SELECT would see a
            # newer database; an explicit BEGIN pins one WAL snapshot for the whole walk (a reader
            # blocks no writer in WAL mode). Leaving the block rolls it back.
            await connection.exec_driver_sql("BEGIN")
        else:
            await connection.execution_options(isolation_level="REPEATABLE READ")
        yield connection
