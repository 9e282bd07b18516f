"""Fixtures shared by integration test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from liveness_proxy.demo.servers import RunningDemo, serving_demo
from liveness_proxy.serving.sockets import bound_sockets


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[RunningDemo]:
    """`liveness-proxy demo`'s own start-up (sandbox, proxy and page on loopback sockets), in this
    process, for the test's duration."""
    with (
        bound_sockets("127.0.0.1", 0, "--sandbox-port") as sandbox_sockets,
        bound_sockets("127.0.0.1", 0, "--port") as proxy_sockets,
    ):
        async with serving_demo(
            directory=str(tmp_path / "demo"),
            host="127.0.0.1",
            sandbox_sockets=sandbox_sockets,
            proxy_sockets=proxy_sockets,
            quiet=True,
        ) as running:
            yield running
