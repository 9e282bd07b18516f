"""Session verdict: the terminal status and confidence the proxy read from Cynopsis.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.add_column(sa.Column("verdict_status", sa.String(32), nullable=True))
        batch.add_column(sa.Column("verdict_confidence", sa.Float(), nullable=True))
        batch.add_column(sa.Column("verdict_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.drop_column("verdict_at")
        batch.drop_column("verdict_confidence")
        batch.drop_column("verdict_status")
