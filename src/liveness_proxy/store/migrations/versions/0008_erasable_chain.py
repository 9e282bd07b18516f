"""Erasable, keyed audit chain: commitments instead of personal values, HMAC links, subject secrets.

What it does, in one transaction:
1. adds the columns and tables (`subject_secrets`, `erasure_notices`; commitments and erasure marks);
2. verifies the existing (unkeyed) chain from its anchor to its head, and refuses to go on if it
   does not hold: re-chaining would launder the tampering (`liveness-proxy audit verify` names the
   record; restore it from a backup first). `db upgrade --accept-broken-audit-chain` re-chains it
   anyway, renumbered without gaps, and lists the damage in the anchor event (4.);
3. gives every subject a secret, and re-chains the existing records in the new format (each
   subject replaced in the hash by its commitment, a failed authentication's client address moved
   from `detail` to the erasable `personal` column), keyed with the signing audit key;
4. appends one `audit.rechained` event whose detail records the old head (seq and hash) and the
   old anchor: the link an auditor who kept the old head hash follows from the old chain to the new;
5. drops the idempotency records and session-token bindings, whose subject hashes are now taken
   over commitments (both are short-lived: a token issued before the upgrade is refused once, an
   idempotent retry across the upgrade creates a new session).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import context, op

from liveness_proxy.store.audit_chain import (
    AUTH_FAILED,
    CHAIN_REKEYED,
    GENESIS_HASH,
    HEAD_ROW_ID,
    legacy_record_hash,
    personal_values,
)
from liveness_proxy.store.subjects import SECRET_BYTES, commit

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BATCH = 2000
MAX_RECORDED_PROBLEMS = 20

_records = sa.table(
    "audit_records",
    *(
        sa.column(name, kind)
        for name, kind in (
            ("id", sa.Integer()),
            ("occurred_at", sa.Float()),
            ("request_id", sa.String()),
            ("subject", sa.String()),
            ("credential_id", sa.String()),
            ("action", sa.String()),
            ("session_id", sa.String()),
            ("status", sa.Integer()),
            ("upstream_status", sa.Integer()),
            ("latency_ms", sa.Float()),
            ("problem", sa.String()),
            ("seq", sa.BigInteger()),
            ("prev_hash", sa.String()),
            ("record_hash", sa.String()),
            ("detail", sa.Text()),
            ("key_id", sa.String()),
            ("subject_commitment", sa.String()),
            ("personal", sa.Text()),
            ("personal_commitment", sa.String()),
        )
    ),
)
_head = sa.table(
    "audit_chain_head",
    sa.column("id", sa.Integer()),
    sa.column("last_seq", sa.BigInteger()),
    sa.column("last_hash", sa.String()),
    sa.column("anchor_seq", sa.BigInteger()),
    sa.column("anchor_hash", sa.String()),
)
_sessions = sa.table(
    "liveness_sessions", sa.column("session_id", sa.String()), sa.column("subject", sa.String()),
    sa.column("subject_commitment", sa.String()),
)  # fmt: skip
_secrets = sa.table(
    "subject_secrets", sa.column("lookup", sa.String()), sa.column("wrapped", sa.String()),
    sa.column("created_at", sa.Float()),
)  # fmt: skip


class OldChainBroken(RuntimeError):
    """The chain written before this version does not verify: it is not re-chained."""


def upgrade() -> None:
    op.create_table(
        "subject_secrets",
        sa.Column("lookup", sa.String(64), nullable=False),
        sa.Column("wrapped", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("lookup", name="pk_subject_secrets"),
    )
    op.create_table(
        "erasure_notices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject_commitment", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_erasure_notices"),
    )
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("subject_commitment", sa.String(64), nullable=True))
        batch.add_column(sa.Column("personal", sa.Text(), nullable=True))
        batch.add_column(sa.Column("personal_commitment", sa.String(64), nullable=True))
        batch.add_column(sa.Column("erased_at", sa.Float(), nullable=True))
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.add_column(sa.Column("subject_commitment", sa.String(64), nullable=True))
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("body", existing_type=sa.Text(), nullable=True)
        batch.add_column(sa.Column("erased_at", sa.Float(), nullable=True))

    _rechain()

    with op.batch_alter_table("audit_records") as batch:
        batch.alter_column("key_id", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_audit_records_subject_commitment", "audit_records", ["subject_commitment"])
    op.create_index("ix_audit_records_session_id", "audit_records", ["session_id"])
    op.create_index("ix_liveness_sessions_subject_commitment", "liveness_sessions", ["subject_commitment"])
    op.execute(sa.text("DELETE FROM idempotency_keys"))
    op.execute(sa.text("DELETE FROM session_token_bindings"))


def _rechain() -> None:
    bind = op.get_bind()
    head = bind.execute(sa.select(_head).where(_head.c.id == HEAD_ROW_ID)).one_or_none()
    if head is None:
        return  # 0003 always writes the head; nothing to chain without it
    anchor_seq, anchor_hash = int(head.anchor_seq), str(head.anchor_hash)
    old_head_seq, old_head_hash = int(head.last_seq), str(head.last_hash)
    has_records = bind.execute(sa.select(sa.func.count()).select_from(_records)).scalar_one() > 0
    has_sessions = bind.execute(sa.select(sa.func.count()).select_from(_sessions)).scalar_one() > 0
    if not has_records and not has_sessions and old_head_seq == 0:
        return  # a new database: nothing to verify, re-chain or anchor
    keys = context.config.attributes.get("keys")
    if keys is None:
        raise RuntimeError(
            "this database holds audit records or sessions: migrate it with `liveness-proxy db upgrade` "
            "(or `serve`), which supplies the audit and subject keys"
        )
    secrets_by_subject: dict[str, bytes] = {}
    # New secrets are inserted a batch at a time (`_flush_secrets`), not one statement each.
    new_secrets: list[dict[str, Any]] = []

    def commitment(subject: str) -> str:
        secret = secrets_by_subject.get(subject)
        if secret is None:
            secret = secrets_by_subject[subject] = os.urandom(SECRET_BYTES)
            lookup = keys.subjects.lookup(subject)
            new_secrets.append(
                {"lookup": lookup, "wrapped": keys.subjects.wrap(lookup, secret), "created_at": time.time()}
            )
        return commit(secret, "subject", subject)

    # One pass: verify each record in the old format, then write it in the new one. With
    # `accept_broken_chain` (`db upgrade --accept-broken-audit-chain`), a broken old chain is
    # re-chained anyway: the records are renumbered without gaps and the damage found is recorded
    # in the anchor event, so the new chain tells of it instead of laundering it.
    accept_broken = bool(context.config.attributes.get("accept_broken_chain"))
    problems: list[str] = []

    def broken(problem: str) -> None:
        if not accept_broken:
            raise OldChainBroken(problem)
        if len(problems) < MAX_RECORDED_PROBLEMS:
            problems.append(problem)

    expected_seq, old_prev, new_prev, last_seq = anchor_seq + 1, anchor_hash, anchor_hash, anchor_seq
    scanned = anchor_seq
    key_id = keys.audit.signing_key_id
    while True:
        rows = bind.execute(
            sa.select(_records).where(_records.c.seq > scanned).order_by(_records.c.seq).limit(BATCH)
        ).all()
        if not rows:
            break
        updates: list[dict[str, Any]] = []
        for row in rows:
            values = dict(row._mapping)
            scanned = int(values["seq"])
            if scanned != expected_seq:
                broken(f"seq {expected_seq} is missing (deleted)")
            try:
                computed = legacy_record_hash(values)
            except ValueError:
                computed = ""
            if computed != values["record_hash"] or values["prev_hash"] != old_prev:
                broken(f"seq {scanned} does not verify (altered or relinked)")
            old_prev = str(values["record_hash"])
            new_values = _new_format(values, commitment)
            new_values.update(seq=expected_seq, prev_hash=new_prev, key_id=key_id)
            new_values["record_hash"] = new_prev = keys.audit.sign(new_values)
            updates.append(
                {"row_id": values["id"], **{f"n_{name}": value for name, value in new_values.items()}}
            )
            last_seq = expected_seq
            expected_seq += 1
        # Ascending order: a renumbered record only ever moves to a lower, already vacated seq.
        _write(bind, updates)
        _flush_secrets(bind, new_secrets)
    if scanned != old_head_seq or old_prev != old_head_hash:
        broken(f"the head says seq {old_head_seq}, the chain ends at seq {scanned} (truncated)")
    # One statement per subject (its sessions found by the subject index), sent in batches: one
    # UPDATE per session took 30 s for 50,000 sessions, and a database can hold millions.
    subjects = [str(subject) for subject in bind.execute(sa.select(_sessions.c.subject).distinct()).scalars()]
    for start in range(0, len(subjects), BATCH):
        bind.execute(
            sa.update(_sessions)
            .where(_sessions.c.subject == sa.bindparam("s_subject"))
            .values(subject_commitment=sa.bindparam("s_commitment")),
            [
                {"s_subject": subject, "s_commitment": commitment(subject)}
                for subject in subjects[start : start + BATCH]
            ],
        )
        _flush_secrets(bind, new_secrets)
    _append_anchor(
        bind, keys, last_seq, new_prev, anchor_seq, anchor_hash, (old_head_seq, old_head_hash), problems
    )


def _flush_secrets(bind: sa.engine.Connection, new_secrets: list[dict[str, Any]]) -> None:
    if new_secrets:
        bind.execute(sa.insert(_secrets), new_secrets)
        new_secrets.clear()


def _new_format(values: dict[str, Any], commitment: Any) -> dict[str, Any]:
    subject = values["subject"]
    new = {
        name: values[name]
        for name in (
            "occurred_at", "request_id", "subject", "credential_id", "action", "session_id", "status",
            "upstream_status", "latency_ms", "problem", "detail",
        )
    }  # fmt: skip
    new["subject_commitment"] = None if subject is None else commitment(str(subject))
    new["personal"] = new["personal_commitment"] = None
    if values["action"] == AUTH_FAILED and values["detail"] is not None:
        facts = orjson.loads(values["detail"])
        address = facts.pop("client_address", None)
        if isinstance(address, str):
            new["detail"] = orjson.dumps(facts, option=orjson.OPT_SORT_KEYS).decode()
            new["personal"], new["personal_commitment"] = personal_values({"client_address": address})
    return new


def _write(bind: sa.engine.Connection, updates: list[dict[str, Any]]) -> None:
    if not updates:
        return
    names = [name[2:] for name in updates[0] if name.startswith("n_")]
    bind.execute(
        sa.update(_records)
        .where(_records.c.id == sa.bindparam("row_id"))
        .values({name: sa.bindparam(f"n_{name}") for name in names}),
        updates,
    )


def _append_anchor(
    bind: sa.engine.Connection,
    keys: Any,
    last_seq: int,
    last_hash: str,
    old_anchor_seq: int,
    old_anchor_hash: str,
    old_head: tuple[int, str],
    problems: list[str],
) -> None:
    detail: dict[str, object] = {
        "previous_format": "sha256-v1",
        "previous_head_seq": old_head[0],
        "previous_head_hash": old_head[1],
        "previous_anchor_seq": old_anchor_seq,
        "previous_anchor_hash": old_anchor_hash if old_anchor_seq else GENESIS_HASH,
        "records": last_seq - old_anchor_seq,
    }
    if problems:
        detail["previous_chain_problems"] = problems
    now = time.time()
    row: dict[str, Any] = {
        "occurred_at": now,
        "request_id": "migration-0008",
        "subject": None,
        "credential_id": None,
        "action": CHAIN_REKEYED,
        "session_id": None,
        "status": 200,
        "upstream_status": None,
        "latency_ms": 0.0,
        "problem": None,
        "detail": orjson.dumps(detail, option=orjson.OPT_SORT_KEYS).decode(),
        "subject_commitment": None,
        "personal": None,
        "personal_commitment": None,
        "seq": last_seq + 1,
        "prev_hash": last_hash,
        "key_id": keys.audit.signing_key_id,
    }
    row["record_hash"] = keys.audit.sign(row)
    bind.execute(sa.insert(_records).values(row))
    bind.execute(
        sa.update(_head)
        .where(_head.c.id == HEAD_ROW_ID)
        .values(last_seq=last_seq + 1, last_hash=row["record_hash"])
    )


def downgrade() -> None:
    """Back to the unkeyed format: the records are chained again with `legacy_record_hash`, from the
    anchor, each with the plain subject it still holds (an erased one stays erased: null), a client
    address moved back into `detail`. The subject secrets are dropped: erasure needs this version."""
    bind = op.get_bind()
    head = bind.execute(sa.select(_head).where(_head.c.id == HEAD_ROW_ID)).one_or_none()
    if head is not None:
        prev, last_seq, after = str(head.anchor_hash), int(head.anchor_seq), int(head.anchor_seq)
        while True:
            rows = bind.execute(
                sa.select(_records).where(_records.c.seq > after).order_by(_records.c.seq).limit(BATCH)
            ).all()
            if not rows:
                break
            updates = []
            for row in rows:
                values = dict(row._mapping)
                if values["personal"] is not None and values["detail"] is not None:
                    facts = orjson.loads(values["detail"])
                    facts.update(orjson.loads(values["personal"]).get("values", {}))
                    values["detail"] = orjson.dumps(facts, option=orjson.OPT_SORT_KEYS).decode()
                values["prev_hash"] = prev
                prev = legacy_record_hash(values)
                updates.append(
                    {
                        "row_id": values["id"],
                        "n_detail": values["detail"],
                        "n_prev_hash": values["prev_hash"],
                        "n_record_hash": prev,
                    }
                )
                last_seq = after = int(values["seq"])
            _write(bind, updates)
        bind.execute(
            sa.update(_head).where(_head.c.id == HEAD_ROW_ID).values(last_seq=last_seq, last_hash=prev)
        )
    op.drop_index("ix_liveness_sessions_subject_commitment", "liveness_sessions")
    op.drop_index("ix_audit_records_session_id", "audit_records")
    op.drop_index("ix_audit_records_subject_commitment", "audit_records")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("erased_at")
    op.execute(sa.text("UPDATE webhook_events SET body = '{}' WHERE body IS NULL"))
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("body", existing_type=sa.Text(), nullable=False)
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.drop_column("subject_commitment")
    with op.batch_alter_table("audit_records") as batch:
        for name in ("erased_at", "personal_commitment", "personal", "subject_commitment", "key_id"):
            batch.drop_column(name)
    op.drop_table("erasure_notices")
    op.drop_table("subject_secrets")
