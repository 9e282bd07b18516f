"""Persistence: SQLAlchemy Core tables, repositories and migrations (SQLite by default, PostgreSQL too)."""

from liveness_proxy.store.api_keys import ApiKeyStore, KeyNotRotatable, KeyState, StoredApiKey
from liveness_proxy.store.audit import AuditLog, AuditLogClosed
from liveness_proxy.store.audit_chain import AuditChainMissing, AuditRecord
from liveness_proxy.store.audit_verify import AuditChainBroken, ChainProblem, ChainVerdict, PurgeResult
from liveness_proxy.store.database import (
    PoolOptions,
    create_engine,
    current_revision,
    is_store_outage,
    ping,
    upgrade_database,
)
from liveness_proxy.store.deliveries import DeliveryRecorder
from liveness_proxy.store.jobs import ClaimedJob, JobQueue
from liveness_proxy.store.outbox import OutboxEvent, StoredEvent, WebhookOutbox
from liveness_proxy.store.repositories import (
    SessionAlreadyBound,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
)
from liveness_proxy.store.session_queries import (
    SESSION_STATUSES,
    SessionFilter,
    SessionPage,
    SessionPosition,
    SessionQueries,
    SessionStatus,
)
from liveness_proxy.store.verdicts import VerdictLedger

__all__ = [
    "SESSION_STATUSES",
    "ApiKeyStore",
    "AuditChainBroken",
    "AuditChainMissing",
    "AuditLog",
    "AuditLogClosed",
    "AuditRecord",
    "ChainProblem",
    "ChainVerdict",
    "ClaimedJob",
    "DeliveryRecorder",
    "JobQueue",
    "KeyNotRotatable",
    "KeyState",
    "OutboxEvent",
    "PoolOptions",
    "PurgeResult",
    "SessionAlreadyBound",
    "SessionFilter",
    "SessionOwner",
    "SessionOwnership",
    "SessionPage",
    "SessionPosition",
    "SessionQueries",
    "SessionStatus",
    "SessionVerdict",
    "StoredApiKey",
    "StoredEvent",
    "VerdictLedger",
    "WebhookOutbox",
    "create_engine",
    "current_revision",
    "is_store_outage",
    "ping",
    "upgrade_database",
]
