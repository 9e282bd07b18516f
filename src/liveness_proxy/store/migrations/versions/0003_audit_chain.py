"""Audit chain: seq, prev_hash and record_hash on every audit record, and the one-row chain head.

Existing records are chained in the order they were inserted (by id), from the genesis hash.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The canonical encoding is defined once, in the module that writes and verifies the chain: a
# change to it would break every stored hash anyway, so a copy here could only drift.
from liveness_proxy.store.audit_chain import GENESIS_HASH, HEAD_ROW_ID, legacy_record_hash

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BACKFILL_BATCH = 5000

_records = sa.table(
    "audit_records",
    sa.column("id", sa.Integer()),
    sa.column("occurred_at", sa.Float()),
    sa.column("request_id", sa.String()),
    sa.column("subject", sa.String()),
    sa.column("credential_id", sa.String()),
    sa.column("action", sa.String()),
    sa.column("session_id", sa.String()),
    sa.column("status", sa.Integer()),
    sa.column("upstream_status", sa.Integer()),
    sa.column("latency_ms", sa.Float()),
    sa.column("problem", sa.String()),
    sa.column("seq", sa.BigInteger()),
    sa.column("prev_hash", sa.String()),
    sa.column("record_hash", sa.String()),
)


def upgrade() -> None:
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("anchor_seq", sa.BigInteger(), nullable=False),
        sa.Column("anchor_hash", sa.String(64), nullable=False),
        # op.f: the name is final, the naming convention must not prefix it a second time.
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_chain_head_single_row")),
        sa.PrimaryKeyConstraint("id", name="pk_audit_chain_head"),
    )
    # Nullable first, filled, then NOT NULL: existing rows have no value until the backfill.
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("record_hash", sa.String(64), nullable=True))
    last_seq, last_hash = _chain_existing_records()
    op.bulk_insert(
        head,
        [
            {
                "id": HEAD_ROW_ID,
                "last_seq": last_seq,
                "last_hash": last_hash,
                "anchor_seq": 0,
                "anchor_hash": GENESIS_HASH,
            }
        ],
    )
    with op.batch_alter_table("audit_records") as batch:
        batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("record_hash", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint("uq_audit_records_seq", ["seq"])


def _chain_existing_records() -> tuple[int, str]:
    bind = op.get_bind()
    seq, prev_hash, last_id = 0, GENESIS_HASH, 0
    while True:
        rows = bind.execute(
            sa.select(_records).where(_records.c.id > last_id).order_by(_records.c.id).limit(BACKFILL_BATCH)
        ).all()
        if not rows:
            return seq, prev_hash
        updates = []
        for row in rows:
            seq += 1
            values = {**row._mapping, "seq": seq, "prev_hash": prev_hash}
            prev_hash = legacy_record_hash(values)
            updates.append(
                {"row_id": row.id, "new_seq": seq, "new_prev": values["prev_hash"], "new_hash": prev_hash}
            )
        # Bind names differ from the column names: SQLAlchemy reserves those for the SET clause.
        bind.execute(
            sa.update(_records)
            .where(_records.c.id == sa.bindparam("row_id"))
            .values(
                seq=sa.bindparam("new_seq"),
                prev_hash=sa.bindparam("new_prev"),
                record_hash=sa.bindparam("new_hash"),
            ),
            updates,
        )
        last_id = rows[-1].id


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_constraint("uq_audit_records_seq", type_="unique")
        batch.drop_column("record_hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
    op.drop_table("audit_chain_head")
