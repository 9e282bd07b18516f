"""The routes around the liveness calls: health, readiness, the OpenAPI document, the JS client."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from importlib import resources

import orjson
from starlette.requests import Request
from starlette.responses import Response

from liveness_proxy.api.responses import json_response, problem_response
from liveness_proxy.api.routes import Handler
from liveness_proxy.errors import ProblemError, ServiceUnavailable
from liveness_proxy.middleware import request_id_of
from liveness_proxy.wiring import Service

READINESS_TOKEN_WAIT_SECONDS = 5.0
# How long a database (or Redis) check's outcome answers /readyz: probes from every load balancer
# and orchestrator (or anyone, it is unauthenticated) then cost at most one query per second.
READINESS_CHECK_SECONDS = 1.0
# A readiness check that passed; named, because bandit takes `checks["upstream_token"] = "ok"` for a password.
CHECK_PASSED = "ok"

# The JS client is served from the package (one copy: the file in the repo is the file served).
# By the operation that serves each: its file name and media type.
CLIENT_FILES = {
    "jsClient": ("liveness-proxy-client.js", "text/javascript; charset=utf-8"),
    "jsClientTypes": ("liveness-proxy-client.d.ts", "application/typescript; charset=utf-8"),
}
CLIENT_CACHE_CONTROL = "public, max-age=300"


async def health(_request: Request) -> Response:
    return json_response(b'{"status":"ok"}')


class CachedCheck:
    """A check of /readyz (the database ping, the Redis ping), run at most once per `seconds`;
    concurrent probes while it runs share it. Its outcome is CHECK_PASSED or the exception's class
    name after `failed_prefix`."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        *,
        seconds: float,
        failed_prefix: str = "failed",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._failed_prefix = failed_prefix
        self._seconds = seconds
        self._clock = clock
        self._outcome: tuple[float, str] | None = None
        self._running: asyncio.Task[str] | None = None

    async def outcome(self) -> str:
        cached = self._outcome
        if cached is not None and self._clock() < cached[0]:
            return cached[1]
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._check())
            self._running.add_done_callback(self._checked)
        return await asyncio.shield(self._running)

    async def _check(self) -> str:
        try:
            await self._probe()
            outcome = CHECK_PASSED
        except Exception as exc:
            outcome = f"{self._failed_prefix}: {type(exc).__name__}"
        self._outcome = (self._clock() + self._seconds, outcome)
        return outcome

    def _checked(self, _task: asyncio.Task[str]) -> None:
        self._running = None


def readiness_handler(service: Service, *, check_seconds: float = READINESS_CHECK_SECONDS) -> Handler:
    store_check = CachedCheck(service.ping_store, seconds=check_seconds)
    # Still ready when Redis fails: limits and the token fall back to this process's own state.
    # Sending traffic elsewhere would not help, every replica shares this Redis.
    redis_check = CachedCheck(service.ping_redis, seconds=check_seconds, failed_prefix="degraded")

    async def readiness(request: Request) -> Response:
        checks: dict[str, str] = {"store": await store_check.outcome()}
        if service.tokens.cached is not None:
            checks["upstream_token"] = CHECK_PASSED
        else:
            try:
                await asyncio.wait_for(service.tokens.get(), READINESS_TOKEN_WAIT_SECONDS)
                checks["upstream_token"] = CHECK_PASSED
            except (ProblemError, TimeoutError) as exc:
                checks["upstream_token"] = f"failed: {getattr(exc, 'slug', 'timeout')}"
        if all(value == CHECK_PASSED for value in checks.values()):
            status = "ready"
            if service.redis is not None:
                checks["redis"] = await redis_check.outcome()
                if checks["redis"] != CHECK_PASSED:
                    status = "degraded"
            return json_response(orjson.dumps({"status": status, "checks": checks}))
        failed = ", ".join(sorted(name for name, value in checks.items() if value != CHECK_PASSED))
        error = ServiceUnavailable(f"Not ready: {failed}.", retry_after_seconds=5)
        return problem_response(error, request_id_of(request.scope), {"checks": checks})

    return readiness


def document_handler(body: bytes) -> Handler:
    """Serves a JSON document built once (the OpenAPI document)."""

    async def document(_request: Request) -> Response:
        return Response(body, media_type="application/json")

    return document


def client_file_handler(name: str, media_type: str) -> Handler:
    """Serves one file of the JS client, read once; revalidated by its ETag."""
    body = resources.files("liveness_proxy").joinpath("static", "client", name).read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    async def serve(request: Request) -> Response:
        headers = {"Cache-Control": CLIENT_CACHE_CONTROL, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return serve
