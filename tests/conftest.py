from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from liveness_proxy.settings import async_database_url
from services import scratch_postgres, shared_backend
from support import Harness, LogScan, ProxyHarness

LOG_SCAN = pytest.StashKey[LogScan]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LOG_SCAN] = LogScan()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every proxy log line the suite produced was scanned for secrets, tokens, keys and image
    bytes; any hit fails the run, whichever test caused it."""
    scan = session.config.stash.get(LOG_SCAN, None)
    if scan is None or not scan.leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"SECRETS IN PROXY LOGS ({len(scan.leaks)} hits):", red=True)
        for leak in scan.leaks[:50]:
            reporter.write_line(f"  {leak}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@contextlib.contextmanager
def _backend(name: str) -> Iterator[dict[str, str]]:
    if name == "postgres-redis":
        with shared_backend() as overrides:
            yield overrides
    else:
        yield {}


@pytest.fixture(params=["sqlite", "postgres-redis"])
def proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyHarness]:
    """A proxy in front of a sandbox upstream, with keys for alice, bob, an admin and carol; every
    test that uses it runs twice: on SQLite alone, and on PostgreSQL with Redis."""
    with (
        _backend(request.param) as overrides,
        Harness(
            tmp_path,
            proxy_overrides=overrides,
            log_scan=request.config.stash[LOG_SCAN],
            origin=request.node.nodeid,
        ) as running,
    ):
        yield running


@pytest.fixture
def make_proxy(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., AbstractContextManager[ProxyHarness]]:
    """Builds a proxy with special settings: `with make_proxy(proxy_overrides={...}) as p:`."""
    counter = iter(range(1000))

    def build(**kwargs: Any) -> AbstractContextManager[ProxyHarness]:
        folder = tmp_path / f"harness-{next(counter)}"
        folder.mkdir()
        return Harness(folder, log_scan=request.config.stash[LOG_SCAN], origin=request.node.nodeid, **kwargs)

    return build


@pytest.fixture
def log_scan(request: pytest.FixtureRequest) -> LogScan:
    return request.config.stash[LOG_SCAN]


@pytest.fixture
def client(proxy: ProxyHarness) -> Iterator[httpx.Client]:
    with proxy.client() as http:
        yield http


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each engine (not migrated): a SQLite file, and a scratch
    PostgreSQL database dropped afterwards (async driver URLs)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
        return
    with scratch_postgres() as url:
        yield async_database_url(url)
