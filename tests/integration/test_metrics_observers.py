"""Metrics: the observer hooks of the upstream client, against the sandbox over loopback."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from liveness_proxy.errors import (
    UpstreamError,
    UpstreamNotFound,
)
from liveness_proxy.http import Http1Transport
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.sandbox import Fault, Sandbox, SandboxConfig
from liveness_proxy.upstream.client import CynopsisClient, CynopsisEndpoints, UpstreamObserver
from liveness_proxy.upstream.oauth import ClientCredentialsFetcher
from liveness_proxy.upstream.tokens import TokenManager, TokenObserver
from metric_samples import RecordingObserver, value
from support import CLIENT_ID, CLIENT_SECRET, DOMAIN_ID, ServerThread

UPSTREAM_REQUESTS = "liveness_proxy_upstream_requests_total"


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics(include_process_metrics=False)


# --- Observer hooks: the upstream client against the sandbox over loopback --------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    upstream = Sandbox(SandboxConfig(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, domain_id=DOMAIN_ID))
    server = ServerThread(upstream.app, lifespan="off").start()
    try:
        yield upstream, server.url
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def observed_cynopsis(
    sandbox_url: str,
    *,
    upstream_observer: UpstreamObserver,
    token_observer: TokenObserver,
    api_base_url: str | None = None,
    max_response_bytes: int = 64 * 1024,
) -> AsyncIterator[CynopsisClient]:
    """A CynopsisClient and its TokenManager built as the runtime builds them, both observed."""
    http = Http1Transport(max_connections=10, connect_timeout_seconds=0.5)
    tokens = TokenManager(
        ClientCredentialsFetcher(
            http,
            token_url=f"{sandbox_url}/oauth/token",
            client_id=CLIENT_ID,
            client_secret=lambda: CLIENT_SECRET,
            default_lifetime_seconds=3600,
            max_lifetime_seconds=86400,
            timeout_seconds=0.5,
        ),
        refresh_margin=lambda lifetime: lifetime / 10,
        failure_backoff_seconds=1,
        observer=token_observer,
    )
    paths = SandboxConfig()
    endpoints = CynopsisEndpoints(
        api_base_url=api_base_url or sandbox_url,
        session_token_path=paths.session_token_path,
        session_path=paths.session_path,
        result_path=paths.result_path_prefix + "{session_id}",
    )
    liveness_http = Http1Transport(max_connections=10, connect_timeout_seconds=0.5)
    client = CynopsisClient(
        liveness_http,
        tokens,
        endpoints=endpoints,
        domain_id=DOMAIN_ID,
        max_response_bytes=max_response_bytes,
        timeout_seconds=0.5,
        observer=upstream_observer,
    )
    try:
        yield client
    finally:
        await tokens.close()
        await http.aclose()
        await liveness_http.aclose()


@pytest.fixture
def upstream(sandbox: tuple[Sandbox, str]) -> Sandbox:
    running, _ = sandbox
    running.clear_faults()
    return running


async def test_each_upstream_call_is_observed_with_its_endpoint_and_status(
    sandbox: tuple[Sandbox, str], upstream: Sandbox
) -> None:
    observer = RecordingObserver()
    async with observed_cynopsis(sandbox[1], upstream_observer=observer, token_observer=observer) as client:
        token = (await client.get_session_token(b"{}", "req-1")).payload["session_token"]
        body = b'{"session_token": "' + token.encode() + b'"}'
        session_id = (await client.create_session(body, "req-2")).payload["session_id"]
        await client.get_result(session_id, "req-3")
    assert observer.upstream == [("session_token", "200"), ("create_session", "200"), ("result", "200")]
    assert observer.refreshes == ["ok"]
    assert observer.cache == [False, True, True]


async def test_the_retry_after_a_rejected_token_is_observed_as_a_call_of_its_own(
    sandbox: tuple[Sandbox, str], upstream: Sandbox
) -> None:
    observer = RecordingObserver()
    async with observed_cynopsis(sandbox[1], upstream_observer=observer, token_observer=observer) as client:
        await client.get_session_token(b"{}", "req-1")
        upstream.revoke_tokens()
        await client.get_session_token(b"{}", "req-2")
    assert observer.upstream == [("session_token", "200"), ("session_token", "401"), ("session_token", "200")]
    assert observer.refreshes == ["ok", "ok"]


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (Fault(target="session_token", kind="timeout", hang_seconds=3), "timeout"),
        (Fault(target="session_token", kind="status", status=503), "503"),
        (Fault(target="session_token", kind="rate_limit"), "429"),
        (Fault(target="session_token", kind="malformed"), "malformed"),
        (Fault(target="session_token", kind="wrong_content_type"), "malformed"),
        (Fault(target="session_token", kind="oversized", size_bytes=200_000), "malformed"),
    ],
)
async def test_a_failed_upstream_call_is_observed_with_its_outcome(
    sandbox: tuple[Sandbox, str], upstream: Sandbox, fault: Fault, outcome: str
) -> None:
    observer = RecordingObserver()
    async with observed_cynopsis(sandbox[1], upstream_observer=observer, token_observer=observer) as client:
        upstream.inject_fault(fault)
        with pytest.raises(UpstreamError):
            await client.get_session_token(b"{}", "req-1")
    assert observer.upstream == [("session_token", outcome)]


async def test_an_unknown_session_is_observed_as_404(sandbox: tuple[Sandbox, str], upstream: Sandbox) -> None:
    observer = RecordingObserver()
    async with observed_cynopsis(sandbox[1], upstream_observer=observer, token_observer=observer) as client:
        with pytest.raises(UpstreamNotFound):
            await client.get_result("no-such-session", "req-1")
    assert observer.upstream == [("result", "404")]


async def test_an_unreachable_upstream_is_observed_as_connect_error(
    sandbox: tuple[Sandbox, str], upstream: Sandbox
) -> None:
    observer = RecordingObserver()
    async with observed_cynopsis(
        sandbox[1],
        upstream_observer=observer,
        token_observer=observer,
        api_base_url=f"http://127.0.0.1:{_free_port()}",
    ) as client:
        with pytest.raises(UpstreamError):
            await client.create_session(b'{"session_token": "x"}', "req-1")
    assert observer.upstream == [("create_session", "connect_error")]


async def test_proxy_metrics_is_an_observer_of_both(sandbox: tuple[Sandbox, str], upstream: Sandbox) -> None:
    metrics = ProxyMetrics(include_process_metrics=False)
    async with observed_cynopsis(sandbox[1], upstream_observer=metrics, token_observer=metrics) as client:
        await client.get_session_token(b"{}", "req-1")
        await client.get_session_token(b"{}", "req-2")
    assert value(metrics, UPSTREAM_REQUESTS, endpoint="session_token", outcome="200") == 2
    assert value(metrics, "liveness_proxy_upstream_token_refreshes_total", outcome="ok") == 1
    assert value(metrics, "liveness_proxy_upstream_token_cache_lookups_total", result="miss") == 1
    assert value(metrics, "liveness_proxy_upstream_token_cache_lookups_total", result="hit") == 1
