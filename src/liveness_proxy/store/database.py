"""Engine construction and migrations."""

from __future__ import annotations

import importlib.resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 5000


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine. SQLite gets WAL and a busy timeout on every connection."""
    if database_url.startswith("sqlite"):
        engine = create_async_engine(database_url, pool_size=pool_size, max_overflow=0, pool_pre_ping=False)
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
        return engine
    return create_async_engine(database_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite_connection(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # WAL lets readers run beside the writer. synchronous=FULL syncs the WAL at every commit, so an
    # answered request's audit record survives an OS crash or power loss too (NORMAL survives only a
    # process crash); audit group commit pays that sync once per batch, not once per request.
    # busy_timeout makes concurrent writers wait instead of failing with "locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config() -> Config:
    config = Config()
    location = importlib.resources.files("liveness_proxy.store") / "migrations"
    config.set_main_option("script_location", str(location))
    return config


async def upgrade_database(engine: AsyncEngine, revision: str = "head") -> None:
    """Applies migrations up to `revision` over the engine's own connection."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
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
