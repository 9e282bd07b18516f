from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

# The shared helper modules assert too: rewritten like test modules, so a failure shows its values.
pytest.register_assert_rewrite("metric_samples", "properties", "rotation", "support")

# E402: these imports must come after the registration above.
from liveness_proxy.settings import async_database_url  # noqa: E402
from prepared import SQLITE_NAME, PreparedDatabases  # noqa: E402
from services import scratch_postgres, scratch_redis  # noqa: E402
from support import Harness, Keys, LogScan, ProxyHarness  # noqa: E402

LOG_SCAN = pytest.StashKey[LogScan]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LOG_SCAN] = LogScan()


# Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`, one worker per core): the tests that
# start many processes or a browser and load the machine for tens of seconds (crash, soak, fleet,
# browser, benchmark smoke) are marked `xdist_group("heavy")`, so they run one after another on one
# worker while the other worker takes the rest, and never two of them at once. They are collected
# first, so that long chain starts at once instead of ending the run. (More workers than cores was
# faster still, but starved timing-bound tests: 200 concurrent requests against a 1 s upstream
# timeout got 502s.)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every proxy log line the suite produced was scanned for secrets, tokens, keys and image
    bytes; any hit fails the run, whichever test caused it. An xdist worker hands its scan to the
    controller (its own exit status would be ignored), which reports and fails the run."""
    scan = session.config.stash.get(LOG_SCAN, None)
    if scan is None:
        return
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["log_scan"] = {"lines_scanned": scan.lines_scanned, "leaks": scan.leaks}
        return
    if not scan.leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"SECRETS IN PROXY LOGS ({len(scan.leaks)} hits):", red=True)
        for leak in scan.leaks[:50]:
            reporter.write_line(f"  {leak}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist, on the controller: a worker finished; its log scan joins the controller's."""
    output = getattr(node, "workeroutput", {}).get("log_scan")
    if output is None:
        return
    scan = node.config.stash[LOG_SCAN]
    scan.lines_scanned += output["lines_scanned"]
    scan.leaks.extend(output["leaks"])


@pytest.fixture(scope="session")
def prepared_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PreparedDatabases]:
    """Migrated databases with the harness's keys, made once per session (per xdist worker)."""
    prepared = PreparedDatabases(tmp_path_factory.mktemp("prepared"))
    try:
        yield prepared
    finally:
        prepared.close()


@contextlib.contextmanager
def _backend(name: str, prepared: PreparedDatabases, folder: Path) -> Iterator[tuple[dict[str, str], Keys]]:
    """Proxy settings and keys for a backend: a copy of the prepared SQLite file in `folder`, or a
    clone of the prepared PostgreSQL database with a Redis key prefix of the test's own."""
    if name == "postgres-redis":
        with prepared.postgres() as (database_url, keys), scratch_redis() as (redis_url, prefix):
            yield (
                {
                    "LIVENESS_PROXY_DATABASE_URL": database_url,
                    "LIVENESS_PROXY_REDIS_URL": redis_url,
                    "LIVENESS_PROXY_REDIS_KEY_PREFIX": prefix,
                },
                keys,
            )
    else:
        yield {}, prepared.sqlite(folder / SQLITE_NAME)


def _in_process(request: pytest.FixtureRequest) -> bool:
    """The proxy runs in-process (through ASGI, no socket) unless the test is marked `served`."""
    return request.node.get_closest_marker("served") is None


@pytest.fixture(params=["sqlite", "postgres-redis"])
def proxy(
    tmp_path: Path, request: pytest.FixtureRequest, prepared_databases: PreparedDatabases
) -> Iterator[ProxyHarness]:
    """A proxy in front of a sandbox upstream, with keys for alice, bob, an admin and carol; every
    test that uses it runs twice: on SQLite alone, and on PostgreSQL with Redis. In-process (its
    `client()` only) unless the test is marked `served`."""
    with (
        _backend(request.param, prepared_databases, tmp_path) as (overrides, keys),
        Harness(
            tmp_path,
            proxy_overrides=overrides,
            log_scan=request.config.stash[LOG_SCAN],
            origin=request.node.nodeid,
            in_process=_in_process(request),
            prepared_keys=keys,
        ) as running,
    ):
        yield running


@pytest.fixture(params=["sqlite", "postgres-redis"])
def make_backend_proxy(
    tmp_path: Path, request: pytest.FixtureRequest, prepared_databases: PreparedDatabases
) -> Callable[..., AbstractContextManager[ProxyHarness]]:
    """`proxy` with settings of the test's own: `with make_backend_proxy(NAME=value) as p:`, on
    each backend of `proxy` (SQLite alone; PostgreSQL with Redis). One per test."""

    @contextlib.contextmanager
    def build(**overrides: Any) -> Iterator[ProxyHarness]:
        with (
            _backend(request.param, prepared_databases, tmp_path) as (backend, keys),
            Harness(
                tmp_path,
                proxy_overrides={**backend, **overrides},
                log_scan=request.config.stash[LOG_SCAN],
                origin=request.node.nodeid,
                in_process=_in_process(request),
                prepared_keys=keys,
            ) as running,
        ):
            yield running

    return build


# Settings that make a prepared database the wrong one: another database, or keys under another pepper.
_OWN_DATABASE = ("LIVENESS_PROXY_DATABASE_URL", "LIVENESS_PROXY_API_KEY_PEPPER")


@pytest.fixture
def make_proxy(
    tmp_path: Path, request: pytest.FixtureRequest, prepared_databases: PreparedDatabases
) -> Callable[..., AbstractContextManager[ProxyHarness]]:
    """Builds a proxy with special settings: `with make_proxy(proxy_overrides={...}) as p:`.
    In-process unless the test is marked `served` (or passes `in_process=`)."""
    counter = iter(range(1000))

    def build(**kwargs: Any) -> AbstractContextManager[ProxyHarness]:
        folder = tmp_path / f"harness-{next(counter)}"
        folder.mkdir()
        kwargs.setdefault("in_process", _in_process(request))
        if not any(name in kwargs.get("proxy_overrides", {}) for name in _OWN_DATABASE):
            kwargs.setdefault("prepared_keys", prepared_databases.sqlite(folder / SQLITE_NAME))
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
