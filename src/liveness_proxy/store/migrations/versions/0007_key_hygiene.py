"""Key hygiene: API keys may expire, record when they were last used, and name the key they
replaced (`keys rotate`). Existing keys get no expiry, so they keep working.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("successor_of", sa.String(32), nullable=True))


def downgrade() -> None:
    # The older code cannot enforce an expiry. A key that has already expired is revoked (at its
    # expiry), so dropping the column never brings one back; a key that expires later loses its
    # expiry, which CHANGELOG.md says: revoke it after the downgrade if that is not acceptable.
    op.get_bind().execute(
        sa.text(
            "UPDATE api_keys SET revoked_at = expires_at "
            "WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= :now"
        ),
        {"now": time.time()},
    )
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("successor_of")
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
