"""Serving a sandbox over real HTTP with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from liveness_proxy.sandbox.app import Sandbox
from liveness_proxy.sandbox.config import SandboxConfig

# How long shutdown waits for in-flight requests (an injected hang, say) before cancelling them.
SHUTDOWN_GRACE_SECONDS = 1


async def serve_sandbox(config: SandboxConfig, host: str, port: int) -> None:
    """Serve a new sandbox on host:port until SIGINT/SIGTERM, or until this task is cancelled."""
    server = _uvicorn_server(Sandbox(config).app, host=host, port=port)
    await _serve_until_cancelled(server)


@contextlib.asynccontextmanager
async def running_sandbox(sandbox: Sandbox, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `sandbox` on a free port of `host` for the block; yields its base URL.

    The socket is bound and listening before the block starts, so requests can be sent at once:
    the kernel queues connections until uvicorn accepts them.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen()
    except OSError:
        listener.close()
        raise
    port: int = listener.getsockname()[1]
    server = _uvicorn_server(sandbox.app, host=host, port=port)
    serving = asyncio.ensure_future(server.serve(sockets=[listener]))
    try:
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{port}"
    finally:
        server.should_exit = True
        await serving
        listener.close()


def _uvicorn_server(app: Starlette, *, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    )


async def _serve_until_cancelled(server: uvicorn.Server) -> None:
    # Cancelling uvicorn's serve() directly skips its shutdown and leaves the port bound; instead
    # ask it to exit and wait for that.
    serving = asyncio.ensure_future(server.serve())
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
