"""The schema, as SQLAlchemy Core tables. One schema for SQLite and PostgreSQL; Alembic migrates it.

Times are stored as UTC epoch seconds (float): comparable, sortable and identical on both engines.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Which caller created which upstream liveness session: the basis of every result-read decision.
liveness_sessions = Table(
    "liveness_sessions",
    metadata,
    Column("session_id", String(128), primary_key=True),
    Column("subject", String(255), nullable=False),
    Column("credential_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("request_id", String(128), nullable=False),
    # The terminal verdict as the proxy itself read it from Cynopsis: the customer's backend can
    # trust this record without trusting anything the frontend reports.
    Column("verdict_status", String(32), nullable=True),
    Column("verdict_confidence", Float, nullable=True),
    Column("verdict_at", Float, nullable=True),
)
Index("ix_liveness_sessions_subject_created_at", liveness_sessions.c.subject, liveness_sessions.c.created_at)

# API keys: only the keyed hash (HMAC-SHA256 with the server pepper) of the secret part is stored.
api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("scopes", Text, nullable=False),  # space-separated, as in OAuth2
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

# One row per liveness request, accepted or rejected. Never secrets, tokens, keys or images.
# Rows form a hash chain (store/audit_chain.py defines the encoding): `seq` is assigned by the writer
# under the chain-head lock and is contiguous, unlike `id`, which a rolled-back insert can skip.
audit_records = Table(
    "audit_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("occurred_at", Float, nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("subject", String(255), nullable=True),
    Column("credential_id", String(64), nullable=True),
    Column("action", String(64), nullable=False),
    Column("session_id", String(128), nullable=True),
    Column("status", Integer, nullable=False),
    Column("upstream_status", Integer, nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("problem", String(64), nullable=True),
    Column("seq", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("record_hash", String(64), nullable=False),
    # Also the index that verify and export walk in chain order.
    UniqueConstraint("seq"),
)
Index("ix_audit_records_occurred_at", audit_records.c.occurred_at)

# The one row that says where the audit chain ends (last_seq, last_hash) and, after a purge, where
# it now starts (anchor_seq, anchor_hash: the last purged record). It changes in the same transaction
# as the records it covers, and writers lock it first, which serialises them across processes.
audit_chain_head = Table(
    "audit_chain_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("anchor_seq", BigInteger, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
    CheckConstraint("id = 1", name="single_row"),
)

TOKEN_ROW_ID = 1

# The upstream access token shared by every process of a deployment without Redis (see
# upstream/token_store.py): sealed (AES-GCM, never the plain token), the lease that lets one process
# at a time ask the token endpoint, and the fleet-wide pause after a failed token request.
upstream_token = Table(
    "upstream_token",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sealed", Text, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("backoff_until", Float, nullable=True),
    CheckConstraint("id = 1", name="single_token_row"),
)
