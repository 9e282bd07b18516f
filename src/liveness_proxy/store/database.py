"""Engine construction and migrations."""

from __future__ import annotations

import importlib.resources
import os
import uuid
from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from liveness_proxy.store.audit_chain import AuditKeys
from liveness_proxy.store.subjects import SubjectKeys

SQLITE_BUSY_TIMEOUT_MS = 5000


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Connection pool of one process. PostgreSQL only: SQLite gets `size` connections, no overflow."""

    size: int = 10
    max_overflow: int = 10
    timeout_seconds: float = 5.0
    # PgBouncer in transaction mode hands each transaction to any server connection, so a statement
    # prepared on one is unknown (or, worse, a different statement) on the next: no statement cache,
    # and unique names for the statements asyncpg still prepares for one round trip.
    pgbouncer: bool = False
    # PostgreSQL: longest a statement may run (a lock wait included) before it is cancelled and the
    # request answered 503. None: no bound (migrations and audit commands, which may run long).
    statement_timeout_seconds: float | None = None


def create_engine(database_url: str, *, pool_size: int = 10, pool: PoolOptions | None = None) -> AsyncEngine:
    """An async engine. SQLite gets WAL and a busy timeout on every connection."""
    options = pool or PoolOptions(size=pool_size)
    if database_url.startswith("sqlite"):
        engine = create_async_engine(
            database_url,
            # A database error's message must not quote its parameters: subjects, addresses and
            # other personal values travel in them, and errors are logged.
            hide_parameters=True,
            pool_size=options.size,
            max_overflow=0,
            pool_timeout=options.timeout_seconds,
            pool_pre_ping=False,
        )
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
        return engine
    connect_args: dict[str, Any] = {}
    if database_url.startswith("postgresql+asyncpg"):
        # Shown in pg_stat_activity: which process holds which connection.
        connect_args["server_settings"] = {"application_name": f"liveness-proxy:{os.getpid()}"}
        if options.statement_timeout_seconds is not None:
            # Client-side (works through PgBouncer); a lock held elsewhere then costs a request a
            # bounded wait and a 503 (asyncpg raises TimeoutError), like SQLite's busy timeout.
            connect_args["command_timeout"] = options.statement_timeout_seconds
        if options.pgbouncer:
            connect_args |= {
                "statement_cache_size": 0,
                "prepared_statement_cache_size": 0,
                "prepared_statement_name_func": _unique_statement_name,
            }
    return create_async_engine(
        database_url,
        hide_parameters=True,  # as above
        pool_size=options.size,
        max_overflow=options.max_overflow,
        pool_timeout=options.timeout_seconds,
        # A connection PostgreSQL (or a failover) closed is replaced before use, not failed on.
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def is_store_outage(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached or lost the connection (as opposed to
    a bug or a constraint violation): refused or dropped connections, pool and connect timeouts."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeout | OSError | TimeoutError)


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def _configure_sqlite_connection(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # WAL lets readers run beside the writer. synchronous=FULL syncs the WAL at every commit, so an
    # answered request's audit record survives an OS crash or power loss too (NORMAL survives only a
    # process crash); audit group commit pays that sync once per batch, not once per request.
    # busy_timeout makes concurrent writers wait instead of failing with "locked". secure_delete
    # overwrites deleted content with zeros, so an erased subject does not linger in free pages
    # (the erasure then checkpoints the WAL, which held the pages before: store/erasure.py).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclass(frozen=True, slots=True)
class MigrationKeys:
    """What a migration that writes the chain needs: the audit keys and the subject keys."""

    audit: AuditKeys
    subjects: SubjectKeys


def alembic_config() -> Config:
    config = Config()
    location = importlib.resources.files("liveness_proxy.store") / "migrations"
    config.set_main_option("script_location", str(location))
    return config


# Any constant: the key of the PostgreSQL advisory lock that serialises migrations across replicas.
_MIGRATION_LOCK_KEY = 0x6C69_7665_6E65_7373  # "liveness"


async def upgrade_database(
    engine: AsyncEngine,
    revision: str = "head",
    *,
    keys: MigrationKeys | None = None,
    accept_broken_chain: bool = False,
) -> None:
    """Applies migrations up to `revision` over the engine's own connection. Safe when several
    replicas start at once: on PostgreSQL they queue on an advisory lock held for the transaction
    (DDL is transactional there), and each one after the first finds nothing left to do.

    `keys`: the audit and subject keys, which migration 0008 needs to re-chain existing records
    (a database with none needs no keys). `accept_broken_chain`: 0008 re-chains an old chain that
    does not verify instead of refusing, and records the damage in its anchor event (an operator's
    explicit choice: `db upgrade --accept-broken-audit-chain`)."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        config.attributes["keys"] = keys
        config.attributes["accept_broken_chain"] = accept_broken_chain
        command.upgrade(config, revision)

    def at_revision(connection: Connection) -> bool:
        script = ScriptDirectory.from_config(alembic_config())
        target = script.get_current_head() if revision == "head" else revision
        return MigrationContext.configure(connection).get_current_revision() == target

    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        elif connection.dialect.name == "sqlite":
            # Nothing to do (every start of a process that migrates): read, and take no write lock.
            if await connection.run_sync(at_revision):
                return
            # The sqlite3 driver opens a transaction only before INSERT, UPDATE or DELETE, so each
            # CREATE or ALTER would commit on its own, and a migration that fails half-way (0008
            # refusing a broken chain) would leave its tables behind at the old revision. An
            # explicit BEGIN makes the whole upgrade one transaction, as on PostgreSQL; IMMEDIATE
            # takes the write lock at once, so a second process starting too waits its turn (and
            # then, reading the revision again inside the lock, finds nothing left to do).
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        await connection.run_sync(run)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        try:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
        except Exception:  # the table does not exist before the first upgrade
            return None
        row = result.first()
        return None if row is None else str(row[0])


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
