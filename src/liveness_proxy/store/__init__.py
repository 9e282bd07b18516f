"""Persistence: SQLAlchemy Core tables, repositories and migrations (SQLite by default, PostgreSQL too)."""

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
from liveness_proxy.store.repositories import (
    ApiKeyStore,
    SessionAlreadyBound,
    SessionOwner,
    SessionOwnership,
    SessionVerdict,
    StoredApiKey,
)

__all__ = [
    "ApiKeyStore",
    "AuditChainBroken",
    "AuditChainMissing",
    "AuditLog",
    "AuditLogClosed",
    "AuditRecord",
    "ChainProblem",
    "ChainVerdict",
    "PoolOptions",
    "PurgeResult",
    "SessionAlreadyBound",
    "SessionOwner",
    "SessionOwnership",
    "SessionVerdict",
    "StoredApiKey",
    "create_engine",
    "current_revision",
    "is_store_outage",
    "ping",
    "upgrade_database",
]
