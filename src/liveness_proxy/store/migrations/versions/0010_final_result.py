"""Final results: a session's terminal answer, as its caller received it (without the derived
`passed`, and under the fingerprint of the policy that shaped it), kept beside its verdict so that
later reads are answered without a Cynopsis call (api/result_reads.py). Existing sessions get none:
their next read goes upstream as before, and stores it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.add_column(sa.Column("final_result", sa.Text(), nullable=True))


def downgrade() -> None:
    # Only the stored copies go: each session's next read asks Cynopsis again, as before 0010.
    with op.batch_alter_table("liveness_sessions") as batch:
        batch.drop_column("final_result")
