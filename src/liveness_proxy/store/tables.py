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
    # Who read the verdict first: the caller's request id, or the finalizer's.
    Column("verdict_request_id", String(128), nullable=True),
    # The customer's own business id, from the caller's credential (never from a request body).
    Column("reference", String(255), nullable=True),
    # The finalizer's view: following, final or unresolved; null when the proxy does not follow it.
    Column("finalizer_state", String(16), nullable=True),
    # The subject's commitment (store/subjects.py): how an erasure finds bindings made by a replica
    # that still held the subject's secret in its cache while the erasure ran.
    Column("subject_commitment", String(64), nullable=True),
    # The terminal answer as its caller received it, under the fingerprint of the policy that shaped
    # it (api/final_results.py); written with the verdict, erased with the row. Never an image: it is
    # only written while images are stripped and none is allowed through.
    Column("final_result", Text, nullable=True),
)
Index("ix_liveness_sessions_subject_created_at", liveness_sessions.c.subject, liveness_sessions.c.created_at)
Index("ix_liveness_sessions_created_at", liveness_sessions.c.created_at, liveness_sessions.c.session_id)
Index("ix_liveness_sessions_reference", liveness_sessions.c.reference)
Index("ix_liveness_sessions_subject_commitment", liveness_sessions.c.subject_commitment)

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
    # Null: the key never expires (keys made before expiry existed, or `--expires-in never`).
    Column("expires_at", Float, nullable=True),
    # Written at most once per key per few minutes per process (auth/key_usage.py): approximate.
    Column("last_used_at", Float, nullable=True),
    # The key this one replaced (`keys rotate`); informational, nothing is decided on it.
    Column("successor_of", String(32), nullable=True),
)

# One row per liveness request, accepted or rejected, and per system event. Never secrets, tokens,
# keys or images. Rows form a keyed hash chain (store/audit_chain.py defines the encoding): `seq` is
# assigned by the writer under the chain-head lock and is contiguous, unlike `id`, which a
# rolled-back insert can skip. Personal values are kept twice: in plain (`subject`, `personal`), which
# an erasure or the plain-text retention clears, and as commitments (`subject_commitment`,
# `personal_commitment`), which the chain covers, so the chain still verifies once they are erased.
audit_records = Table(
    "audit_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("occurred_at", Float, nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("subject", String(255), nullable=True),  # plain, erasable, not hashed
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
    # Non-personal facts as canonical JSON: a system event's (verdicts, deliveries, erasures), and
    # where a result read's answer came from (`{"result_source": "shared"}`, api/result_reads.py).
    Column("detail", Text, nullable=True),
    # Which audit key (LIVENESS_PROXY_AUDIT_KEYS_FILE) the record's HMAC is keyed with.
    Column("key_id", String(64), nullable=False),
    # HMAC of the subject under the subject's own secret (store/subjects.py); hashed.
    Column("subject_commitment", String(64), nullable=True),
    # Other personal values (a failed authentication's client address) as JSON, with the random salt
    # their commitment is keyed with: plain, erasable, not hashed; the salt goes with them.
    Column("personal", Text, nullable=True),
    Column("personal_commitment", String(64), nullable=True),  # hashed
    # When the plain values were erased (an erasure or the retention); not hashed.
    Column("erased_at", Float, nullable=True),
    # Also the index that verify and export walk in chain order.
    UniqueConstraint("seq"),
)
Index("ix_audit_records_occurred_at", audit_records.c.occurred_at)
Index("ix_audit_records_subject_commitment", audit_records.c.subject_commitment)
Index("ix_audit_records_session_id", audit_records.c.session_id)

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

# Durable background work, one mechanism for every kind (store/jobs.py): a finalizer follow-up of a
# session (`finalize`, ref = session id) or a webhook delivery (`deliver`, ref = event id). A row is
# written in the same transaction as the fact it follows from, and claimed with a lease.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("ref", String(128), nullable=False),
    Column("state", String(16), nullable=False),  # queued, done or dead
    Column("due_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("last_error", String(255), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # The W3C traceparent of the span that caused the job (store/jobs.py); its run is a child of it.
    Column("trace_parent", String(55), nullable=True),
    UniqueConstraint("kind", "ref"),
)
Index("ix_jobs_state_kind_due_at", jobs.c.state, jobs.c.kind, jobs.c.due_at)

# The webhook outbox: each event's exact body, signed afresh at every attempt. Its delivery is the
# `deliver` job with ref = event_id.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("session_id", String(128), nullable=True),
    # Null once erased (an erasure or the retention): an undelivered event is then cancelled.
    Column("body", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_status", Integer, nullable=True),
    Column("delivered_at", Float, nullable=True),
    Column("erased_at", Float, nullable=True),
)
Index("ix_webhook_events_session_id", webhook_events.c.session_id)

WEBHOOK_ENDPOINT_ROW_ID = 1

# The one webhook endpoint's state: disabled after it answered 410 Gone, until an operator
# re-enables it (`liveness-proxy webhooks enable`). Deliveries wait queued meanwhile.
webhook_endpoint = Table(
    "webhook_endpoint",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("disabled_at", Float, nullable=True),
    CheckConstraint("id = 1", name="single_endpoint_row"),
)

# Session tokens the proxy handed out (auth/session_tokens.py): only keyed hashes, of the token and
# of the subject that obtained it. A row is deleted when its token is used (once) and swept after
# it expires; with Redis configured, the same facts live there instead.
session_token_bindings = Table(
    "session_token_bindings",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("subject_hash", String(64), nullable=False),
    Column("expires_at", Float, nullable=False),
)
Index("ix_session_token_bindings_expires_at", session_token_bindings.c.expires_at)

# Idempotent creates (store/idempotency.py): per (subject, Idempotency-Key), the request's
# fingerprint and, once the Cynopsis call went out, the answer to replay. While the first request is
# in flight the row holds a lease instead of an answer, so a crash never locks the key for good.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("subject_hash", String(64), primary_key=True),
    Column("idempotency_key", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("status", Integer, nullable=True),  # null while in flight
    Column("content_type", String(64), nullable=True),
    Column("location", String(512), nullable=True),
    Column("body", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)
Index("ix_idempotency_keys_expires_at", idempotency_keys.c.expires_at)

# One random secret per subject (store/subjects.py), the key of every commitment to its personal
# values. Found by a keyed hash of the subject (never the subject itself), wrapped (AES-GCM) with the
# subject key, and deleted by an erasure: afterwards no one can link the commitments to a name.
subject_secrets = Table(
    "subject_secrets",
    metadata,
    Column("lookup", String(64), primary_key=True),
    Column("wrapped", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

# One row per erasure, for a while: every process polls the highest id and empties its subject
# caches when it moves (store/erasure.py). Holds the commitment only, never a name.
erasure_notices = Table(
    "erasure_notices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject_commitment", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
)
