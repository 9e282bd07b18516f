"""Persistence: SQLAlchemy Core tables, repositories and migrations (SQLite by default, PostgreSQL too)."""

from liveness_proxy.store.audit import AuditLog, AuditRecord
from liveness_proxy.store.database import create_engine, current_revision, ping, upgrade_database
from liveness_proxy.store.repositories import (
    ApiKeyStore,
    SessionAlreadyBound,
    SessionOwner,
    SessionOwnership,
    StoredApiKey,
)

__all__ = [
    "ApiKeyStore",
    "AuditLog",
    "AuditRecord",
    "SessionAlreadyBound",
    "SessionOwner",
    "SessionOwnership",
    "StoredApiKey",
    "create_engine",
    "current_revision",
    "ping",
    "upgrade_database",
]
