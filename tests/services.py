"""Real PostgreSQL and Redis for the tests: a scratch database and a scratch key prefix per use.

The servers are found at LIVENESS_PROXY_TEST_POSTGRES_URL (default postgresql://127.0.0.1:5432/test,
used only to create and drop scratch databases) and LIVENESS_PROXY_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0; every use gets its own key prefix and removes its keys afterwards).
Without them the tests that need them are skipped with a message saying how to run them; with
LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1 (set by .ci/run) they fail instead, so CI can never pass by
skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

POSTGRES_ADMIN_URL = os.environ.get("LIVENESS_PROXY_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LIVENESS_PROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("LIVENESS_PROXY_TEST_REQUIRE_SERVICES") == "1"


def _unavailable(service: str, url: str, reason: str, remedy: str = "") -> None:
    remedy = remedy or (
        "start it (see the README's Development section) or point "
        f"LIVENESS_PROXY_TEST_{service.upper()}_URL at one"
    )
    message = f"{service} is not available at {url} ({reason}): {remedy}."
    if REQUIRE_SERVICES:
        pytest.fail(message + " LIVENESS_PROXY_TEST_REQUIRE_SERVICES=1: failing instead of skipping.")
    pytest.skip(message)


@functools.cache
def postgres_problem() -> str | None:
    """Why the PostgreSQL server at POSTGRES_ADMIN_URL cannot be used (one line), or None; probed once."""

    async def probe() -> None:
        connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def redis_problem() -> str | None:
    """Why the Redis server at REDIS_URL cannot be used (one line), or None; probed once."""
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_postgres() -> None:
    problem = postgres_problem()
    if problem is not None:
        _unavailable("PostgreSQL", POSTGRES_ADMIN_URL, problem)


def require_redis() -> None:
    problem = redis_problem()
    if problem is not None:
        _unavailable("Redis", REDIS_URL, problem)


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return parts._replace(path=f"/{database}").geturl()


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new, empty database for one test; yields its postgresql:// URL and drops it afterwards."""
    require_postgres()
    name = f"lp_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(_asyncpg_dsn(POSTGRES_ADMIN_URL), name)
    finally:
        # WITH (FORCE): a proxy killed mid-test may leave connections behind.
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def scratch_redis() -> Iterator[tuple[str, str]]:
    """(Redis URL, a key prefix of this test's own); the prefix's keys are deleted afterwards."""
    require_redis()
    prefix = f"lp-test-{secrets.token_hex(6)}:"
    try:
        yield REDIS_URL, prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@contextlib.contextmanager
def shared_backend() -> Iterator[dict[str, str]]:
    """Proxy settings for PostgreSQL + Redis, on a scratch database and key prefix."""
    with scratch_postgres() as database_url, scratch_redis() as (redis_url, prefix):
        yield {
            "LIVENESS_PROXY_DATABASE_URL": database_url,
            "LIVENESS_PROXY_REDIS_URL": redis_url,
            "LIVENESS_PROXY_REDIS_KEY_PREFIX": prefix,
        }


class PgBouncer:
    """One PgBouncer in *transaction* pooling mode in front of a PostgreSQL server, on a fixed free
    port; `stop()` and `start()` make the database unreachable and reachable again for whoever
    connects through it (the server itself, shared by other tests, keeps running)."""

    def __init__(self, binary: str, folder: Path, database_url: str) -> None:
        parts = urlsplit(database_url)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        login = f"{parts.username}@" if parts.username else ""
        self.url = parts._replace(netloc=f"{login}127.0.0.1:{self.port}").geturl()
        user = parts.username or getpass.getuser()
        (folder / "users.txt").write_text(f'"{user}" ""\n')
        (folder / "pgbouncer.ini").write_text(
            textwrap.dedent(
                f"""\
                [databases]
                * = host={parts.hostname or "127.0.0.1"} port={parts.port or 5432}
                [pgbouncer]
                listen_addr = 127.0.0.1
                listen_port = {self.port}
                unix_socket_dir =
                auth_type = trust
                auth_file = {folder / "users.txt"}
                pool_mode = transaction
                default_pool_size = 4
                max_client_conn = 500
                logfile = {folder / "pgbouncer.log"}
                pidfile = {folder / "pgbouncer.pid"}
                """
            )
            # From 1.21 PgBouncer can track prepared statements in transaction mode itself; these
            # tests are about the proxy coping without that (older releases, or the default of
            # many managed services), so it stays off.
            + ("max_prepared_statements = 0\n" if _pgbouncer_version(binary) >= (1, 21) else "")
        )
        self.command = [binary, str(folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root; it switches to this user itself.
            folder.chmod(0o777)
            for path in folder.iterdir():
                path.chmod(0o666)
            self.command[1:1] = ["-u", "postgres"]
        self.process: subprocess.Popen[bytes] | None = None
        self.output = folder / "pgbouncer.out"

    def start(self) -> None:
        # Output to a file, never a pipe nobody reads: PgBouncer logs every connection, and a full
        # pipe would block it (and every query behind it).
        with self.output.open("ab") as output:
            process = self.process = subprocess.Popen(self.command, stdout=output, stderr=output)
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise AssertionError(f"pgbouncer exited: {self.output.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            assert time.monotonic() < deadline, "pgbouncer did not start listening"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # at once: clients see their connections drop, as in an outage
            self.process.wait(timeout=10)


def _pgbouncer_version(binary: str) -> tuple[int, ...]:
    answer = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"PgBouncer (\d+)\.(\d+)", answer.stdout + answer.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


@contextlib.contextmanager
def running_pgbouncer(database_url: str) -> Iterator[PgBouncer]:
    """A started `PgBouncer` in front of `database_url`'s server (its `.url` names the same
    database through it). Needs the `pgbouncer` binary (Debian package; .ci/run installs it)."""
    binary = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        _unavailable("PgBouncer", "PATH or /usr/sbin", "no pgbouncer binary", "apt-get install pgbouncer")
    assert binary is not None
    # Its own folder under /tmp: as root, PgBouncer runs as `postgres`, which cannot enter pytest's.
    with tempfile.TemporaryDirectory(prefix="lp-pgbouncer-") as name:
        bouncer = PgBouncer(binary, Path(name), database_url)
        bouncer.start()
        try:
            yield bouncer
        finally:
            bouncer.stop()
