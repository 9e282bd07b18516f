"""`db upgrade`, and the one-connection engine every database command opens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from liveness_proxy.settings import Settings
from liveness_proxy.store import create_engine, upgrade_database
from liveness_proxy.url_secrets import redact_url
from liveness_proxy.wiring.parts import privacy_keys


@contextlib.asynccontextmanager
async def open_database(
    settings: Settings, *, migrate: bool = True, accept_broken_chain: bool = False
) -> AsyncIterator[AsyncEngine]:
    """A one-connection engine for a command; migrated first unless the command only reads."""
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        if migrate:
            # The keys re-chain existing records (migration 0008); without a pepper there are none,
            # and a database that holds records says so.
            keys = (
                privacy_keys(settings) if settings.liveness_proxy_api_key_pepper.get_secret_value() else None
            )
            await upgrade_database(engine, keys=keys, accept_broken_chain=accept_broken_chain)
        yield engine
    finally:
        await engine.dispose()


async def upgrade_schema(settings: Settings, *, accept_broken_chain: bool = False) -> None:
    async with open_database(settings, accept_broken_chain=accept_broken_chain):
        pass


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = Settings.load()
    asyncio.run(upgrade_schema(settings, accept_broken_chain=args.accept_broken_audit_chain))
    print(f"database is at the latest schema: {redact_url(settings.database_url)}")
    return 0
