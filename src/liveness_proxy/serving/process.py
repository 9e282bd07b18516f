"""What only a server process does around the app: GC tuning and SIGHUP, inside the app's lifespan.

`ServedApp` wraps a `ProxyApplication` for uvicorn: HTTP goes straight to the app; the lifespan
enters the app's `running()` and then tunes the process. A library user who mounts the app in a
host of their own gets none of this: their process is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

from starlette.types import Receive, Scope, Send

from liveness_proxy.app import ProxyApplication
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.wiring import Service

# Allocations between collections of the youngest generation when serving (CPython's default: 700).
YOUNG_GENERATION_THRESHOLD = 10_000


def tune_gc_for_serving() -> None:
    """Moves everything alive once the service has started (modules, settings, pools) out of the
    garbage collector's scans, and collects the youngest generation every 10,000 allocations
    instead of 700: with 1000 requests in flight every collection walked their live objects, ~20% of
    the CPU per request (docs/performance.md, S3)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


@contextlib.contextmanager
def secrets_reloaded_on_sighup(service: Service) -> Iterator[None]:
    """Re-reads CYNOPSIS_CLIENT_SECRET_FILE on SIGHUP while the block runs, and nothing else: the
    cached access token keeps serving until it is due. Needs the main thread; the handler that was
    there before comes back afterwards (asyncio would leave the default, which ends the process)."""
    loop = asyncio.get_running_loop()
    previous: Callable[[int, FrameType | None], Any] | int | None = signal.getsignal(signal.SIGHUP)

    def reload() -> None:
        if service.client_secret.reloadable:
            service.client_secret.reload(trigger="sighup")
        else:
            service.logger.info(
                "client_secret_not_reloaded", reason="CYNOPSIS_CLIENT_SECRET is not read from a file"
            )

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


@contextlib.asynccontextmanager
async def served(app: ProxyApplication) -> AsyncIterator[None]:
    """The app running, and the process tuned for serving it, for the block."""
    async with app.running() as service:
        tune_gc_for_serving()
        with secrets_reloaded_on_sighup(service):
            yield


class ServedApp:
    """The ASGI app uvicorn serves: the proxy, with `served` as its lifespan."""

    def __init__(self, app: ProxyApplication) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol around `served`. The shutdown message is awaited inside
        `served`, so that however the lifespan ends (shutdown, or cancelled when uvicorn is forced
        to exit) the service is closed. A start-up that fails is reported to uvicorn as one line (it
        then exits non-zero); nothing opened before the failure stays open."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with served(self.app):
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as exc:
            phase = "shutdown" if started else "startup"
            reason = f"configuration error: {exc}" if isinstance(exc, ConfigurationError) else describe(exc)
            await send({"type": f"lifespan.{phase}.failed", "message": f"{phase} failed: {reason}"})
            return
        await send({"type": "lifespan.shutdown.complete"})


def describe(exc: BaseException) -> str:
    """An exception as one line for an operator: its class and, for OS errors, the reason (never
    the arguments of other errors, which may hold a URL with a password)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__
