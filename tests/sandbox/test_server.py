"""The sandbox served over real HTTP on loopback by uvicorn."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from liveness_proxy.sandbox import Fault, Sandbox, SandboxConfig, running_sandbox, serve_sandbox

from .flows import RESULT_PATH_PREFIX, request_token


async def test_running_sandbox_serves_over_http() -> None:
    sandbox = Sandbox(SandboxConfig())
    async with running_sandbox(sandbox) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        response = await request_token(client)
    assert (response.status_code, sandbox.tokens_issued) == (200, 1)


async def test_raw_path_survives_a_real_server() -> None:
    sandbox = Sandbox(SandboxConfig())
    async with running_sandbox(sandbox) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        await client.get(RESULT_PATH_PREFIX + "%2e%2e/%2E%2E/oauth/token?q=%2F")
    assert sandbox.request_log[-1].raw_path == RESULT_PATH_PREFIX + "%2e%2e/%2E%2E/oauth/token?q=%2F"


async def test_a_delayed_request_goes_on_when_its_client_gives_up() -> None:
    sandbox = Sandbox(SandboxConfig())
    sandbox.inject_fault(Fault(target="token", kind="latency", delay_seconds=60))
    async with (
        running_sandbox(sandbox) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=0.2) as client,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await request_token(client)
    # Shutdown waits for in-flight requests: the token was issued once the client hung up, long
    # before the 60 s delay, and before the shutdown grace period would have cancelled it.
    assert sandbox.tokens_issued == 1


async def test_serve_sandbox_stops_and_frees_its_port_when_cancelled() -> None:
    port = _free_port()
    serving = asyncio.create_task(serve_sandbox(SandboxConfig(), "127.0.0.1", port))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await _first_answer(client, serving)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert (response.status_code, _port_is_free(port)) == (200, True)


async def _first_answer(client: httpx.AsyncClient, serving: asyncio.Task[None]) -> httpx.Response:
    # serve_sandbox gives no signal when it is listening, so retry until it answers.
    for _ in range(250):
        try:
            return await request_token(client)
        except httpx.ConnectError:
            assert not serving.done(), "serve_sandbox stopped early"
            await asyncio.sleep(0.02)
    raise AssertionError("serve_sandbox never started listening")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
