"""Fixtures for the sandbox tests: a sandbox on a ManualClock and an HTTP client bound to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from liveness_proxy.sandbox import ManualClock, Sandbox, SandboxConfig

from .flows import asgi_client, bearer_headers, fetch_access_token


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def config(clock: ManualClock) -> SandboxConfig:
    return SandboxConfig(clock=clock)


@pytest.fixture
def sandbox(config: SandboxConfig) -> Sandbox:
    return Sandbox(config)


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(sandbox) as client:
        yield client


@pytest.fixture
async def auth_headers(client: httpx.AsyncClient) -> dict[str, str]:
    """Authorization and X-Domain-Id headers with a freshly issued access token."""
    return bearer_headers(await fetch_access_token(client))
