"""The wiring opens every part inside one exit stack: whatever fails, every connection and thread the
parts opened is closed; a start-up refused halfway raises its one error; and an app that is not
running answers only what needs no service."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import threading
from pathlib import Path

import httpx
import pytest

from liveness_proxy.app import ProxyApplication, create_app
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.metrics import ProxyMetrics
from liveness_proxy.observability import Redactor, build_logger
from liveness_proxy.sandbox.server import running_sandbox
from liveness_proxy.wiring import running_service
from services import REDIS_URL, require_redis
from support import proxy_settings, upstream_sandbox


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class Boom(Exception):
    """A failure of the code running inside the service's block."""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_a_failure_while_the_service_runs_closes_every_connection_and_thread(tmp_path: Path) -> None:
    require_redis()
    redactor = Redactor()
    logger = build_logger(level="info", log_format="json", redactor=redactor, stream=io.StringIO())
    async with running_sandbox(upstream_sandbox()) as sandbox_url:
        settings = proxy_settings(
            sandbox_url,
            tmp_path / "proxy.db",
            LIVENESS_PROXY_REDIS_URL=REDIS_URL,
            LIVENESS_PROXY_REDIS_KEY_PREFIX=f"lp-wiring-{secrets.token_hex(4)}:",
        )
        descriptors, threads = open_descriptors(), threading.active_count()

        async def use_every_part_then_fail() -> None:
            async with running_service(
                settings, logger=logger, redactor=redactor, metrics=ProxyMetrics(), migrate=True
            ) as service:
                # Every kind of live resource: a database connection (and its thread), Redis
                # connections, the token endpoint's HTTP connection.
                await service.ping_store()
                await service.ping_redis()
                await service.tokens.get()
                assert open_descriptors() > descriptors
                raise Boom

        for _ in range(2):
            with pytest.raises(Boom):
                await use_every_part_then_fail()
        await asyncio.sleep(0.05)  # the database threads end once their connections close
        assert open_descriptors() <= descriptors
        assert threading.active_count() <= threads


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_a_start_refused_halfway_raises_its_one_error_and_leaves_nothing_behind(tmp_path: Path) -> None:
    key_file = tmp_path / "idp.pem"
    key_file.write_text("not a key")
    settings = proxy_settings(
        "http://127.0.0.1:9",
        tmp_path / "proxy.db",
        # Refused only after the database, the pools and the token manager exist.
        LIVENESS_PROXY_JWT_JWKS_URL="https://idp.example/jwks",
        LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE=str(key_file),
    )
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
    redactor = Redactor()
    logger = build_logger(level="info", log_format="json", redactor=redactor, stream=io.StringIO())
    before = open_descriptors()
    for _ in range(3):
        with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_JWT_JWKS_URL"):
            async with running_service(
                settings, logger=logger, redactor=redactor, metrics=ProxyMetrics(), migrate=True
            ):
                pytest.fail("started although the JWT settings are contradictory")
    await asyncio.sleep(0)
    assert open_descriptors() <= before
    assert loop_errors == []  # e.g. "Unclosed client session" from a session nobody closed


def asgi_client(app: ProxyApplication) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")


async def test_before_it_runs_the_app_answers_what_needs_no_service(tmp_path: Path) -> None:
    app = create_app(proxy_settings("http://127.0.0.1:9", tmp_path / "proxy.db"), log_stream=io.StringIO())
    async with asgi_client(app) as client:  # the lifespan does not run
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        starting = await client.get("/v1/liveness/sessions/abc/result")
    assert starting.status_code == 503
    assert starting.headers["retry-after"] == "1"
    assert starting.json()["request_id"] == starting.headers["x-request-id"]
    with pytest.raises(RuntimeError, match="not running"):
        _ = app.service


async def test_the_running_app_serves_its_handlers_and_takes_them_out_when_it_stops(tmp_path: Path) -> None:
    app = create_app(
        proxy_settings("http://127.0.0.1:9", tmp_path / "proxy.db"), log_stream=io.StringIO(), migrate=True
    )
    async with asgi_client(app) as client:
        async with app.running() as service:
            assert app.service is service
            # Running: the handler authenticates (and refuses), instead of answering "starting".
            assert (await client.get("/v1/liveness/sessions/abc/result")).status_code == 401
        assert (await client.get("/v1/liveness/sessions/abc/result")).status_code == 503
        # And it can run again: what stopping took out, starting puts back.
        async with app.running():
            assert (await client.get("/v1/liveness/sessions/abc/result")).status_code == 401
