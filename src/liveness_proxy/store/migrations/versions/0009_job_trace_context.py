"""Job trace context: each job keeps the W3C traceparent of the span that caused it, so that its run
joins that trace (a finalizer poll the trace of the request that created the session, a webhook
delivery the trace of what recorded the verdict). Existing jobs get none: they start traces of
their own, as every job did before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("trace_parent", sa.String(55), nullable=True))


def downgrade() -> None:
    # Only tracing loses: the jobs themselves run as they did before.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trace_parent")
