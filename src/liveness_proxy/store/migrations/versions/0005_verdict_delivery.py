"""Verdict delivery: durable jobs (finalizer follow-ups, webhook deliveries), the webhook outbox and
endpoint state, the session's reference and finalizer state, and the detail of system audit events.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.add_column(sa.Column("verdict_request_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("reference", sa.String(255), nullable=True))
        batch.add_column(sa.Column("finalizer_state", sa.String(16), nullable=True))
    op.create_index("ix_liveness_sessions_created_at", "liveness_sessions", ["created_at", "session_id"])
    op.create_index("ix_liveness_sessions_reference", "liveness_sessions", ["reference"])
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("detail", sa.Text(), nullable=True))
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("kind", "ref", name="uq_jobs_kind"),
    )
    op.create_index("ix_jobs_state_kind_due_at", "jobs", ["state", "kind", "due_at"])
    op.create_table(
        "webhook_events",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("delivered_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_webhook_events_session_id", "webhook_events", ["session_id"])
    endpoint = op.create_table(
        "webhook_endpoint",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("disabled_at", sa.Float(), nullable=True),
        sa.CheckConstraint("id = 1", name="single_endpoint_row"),
    )
    op.bulk_insert(endpoint, [{"id": 1}])


def downgrade() -> None:
    # System events hash their `detail`: dropping the column would break `audit verify` for good.
    system_events = (
        op.get_bind()
        .execute(sa.text("SELECT count(*) FROM audit_records WHERE detail IS NOT NULL"))
        .scalar_one()
    )
    if system_events:
        raise RuntimeError(
            f"cannot downgrade below 0005: {system_events} audit records are system events whose hash "
            "covers `detail`; without the column the chain would no longer verify"
        )
    op.drop_table("webhook_endpoint")
    op.drop_index("ix_webhook_events_session_id", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_index("ix_jobs_state_kind_due_at", table_name="jobs")
    op.drop_table("jobs")
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_column("detail")
    op.drop_index("ix_liveness_sessions_reference", table_name="liveness_sessions")
    op.drop_index("ix_liveness_sessions_created_at", table_name="liveness_sessions")
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.drop_column("finalizer_state")
        batch.drop_column("reference")
        batch.drop_column("verdict_request_id")
