"""Databases prepared once per test session (per xdist worker) and copied for each test.

Migrating a database and issuing the harness's four API keys costs every proxy test 0.1-0.3 s; the
result is the same each time. So it is done once into a template, a SQLite file copied per test or
a PostgreSQL database cloned per test with `CREATE DATABASE ... TEMPLATE` (the server copies the
files; nobody else connects to a template, which cloning requires). Every test still gets a database
of its own, with the same keys in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from liveness_proxy.settings import Settings
from services import POSTGRES_ADMIN_URL, require_postgres
from support import Keys, _prepare_database, proxy_settings

SQLITE_NAME = "proxy.db"


def _admin_dsn() -> str:
    return POSTGRES_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(*statements: str) -> None:
    connection = await asyncpg.connect(_admin_dsn(), timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def _database_url(name: str) -> str:
    return urlsplit(_admin_dsn())._replace(path=f"/{name}").geturl()


def _settings(database_url: str) -> Settings:
    # Only the database and the pepper matter here; the upstream is never called.
    return proxy_settings("http://127.0.0.1:9", Path("unused.db"), LIVENESS_PROXY_DATABASE_URL=database_url)


class PreparedDatabases:
    """Templates made on first use in `folder`, dropped by `close()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sqlite: tuple[Path, Keys] | None = None
        self._postgres: tuple[str, Keys] | None = None

    def sqlite(self, destination: Path) -> Keys:
        """Copies the migrated SQLite database with its keys to `destination`; returns the keys."""
        if self._sqlite is None:
            template = self.folder / "template.db"
            keys = asyncio.run(_prepare_database(_settings(f"sqlite:///{template}")))
            self._sqlite = template, keys
        template, keys = self._sqlite
        for suffix in ("", "-wal", "-shm"):
            source = template.with_name(template.name + suffix)
            if source.exists():
                shutil.copyfile(source, destination.with_name(destination.name + suffix))
        return keys

    @contextlib.contextmanager
    def postgres(self) -> Iterator[tuple[str, Keys]]:
        """A clone of the migrated PostgreSQL database with its keys, for one test: (URL, keys);
        dropped afterwards."""
        require_postgres()
        if self._postgres is None:
            name = f"lp_template_{secrets.token_hex(6)}"
            asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
            # Recorded before it is filled, so close() drops it even if preparing it fails.
            self._postgres = name, Keys("", "", "", "", "")
            self._postgres = name, asyncio.run(_prepare_database(_settings(_database_url(name))))
        template, keys = self._postgres
        name = f"lp_test_{secrets.token_hex(6)}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        try:
            yield _database_url(name), keys
        finally:
            # WITH (FORCE): a proxy killed mid-test may leave connections behind.
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        if self._postgres is not None:
            template, _ = self._postgres
            self._postgres = None
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
