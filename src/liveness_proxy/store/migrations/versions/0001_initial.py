"""Initial schema: session ownership, API keys, audit records.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "liveness_sessions",
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("credential_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name="pk_liveness_sessions"),
    )
    op.create_index("ix_liveness_sessions_subject_created_at", "liveness_sessions", ["subject", "created_at"])
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
    )
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("occurred_at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("credential_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("problem", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_records"),
    )
    op.create_index("ix_audit_records_occurred_at", "audit_records", ["occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_occurred_at", table_name="audit_records")
    op.drop_table("audit_records")
    op.drop_table("api_keys")
    op.drop_index("ix_liveness_sessions_subject_created_at", table_name="liveness_sessions")
    op.drop_table("liveness_sessions")
