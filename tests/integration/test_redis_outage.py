"""Redis killed in the middle of traffic, then started again: a Redis server of the test's own (the
shared one on 6379 serves other tests), SIGKILLed under load. Callers keep being served and
limited, readiness says degraded, and once Redis is back the proxy returns to shared state by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from services import REQUIRE_SERVICES
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if REQUIRE_SERVICES:
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed: this test runs a Redis of its own")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


async def _requests(proxy: ProxyHarness, count: int, key: str) -> list[int]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        answers = await asyncio.gather(
            *(http.post(SESSION_TOKEN, headers=proxy.auth(key)) for _ in range(count))
        )
    return [answer.status_code for answer in answers]


@pytest.mark.slow
@pytest.mark.served
def test_redis_killed_under_load_and_restarted(
    private_redis: PrivateRedis, make_proxy: Callable[..., AbstractContextManager[ProxyHarness]]
) -> None:
    overrides = {
        "LIVENESS_PROXY_REDIS_URL": private_redis.url,
        "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "60/minute",
        # The limits' failover is what this measures: session-token bindings, which fail closed
        # without Redis, are tested in test_session_token_binding.py.
        "LIVENESS_PROXY_SESSION_TOKEN_BINDING": "false",
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as http:
        assert asyncio.run(_requests(proxy, 20, proxy.keys.alice)) == [200] * 20
        assert proxy.runtime.limits.shared

        private_redis.kill()
        # Served without Redis, and still limited: alice had 20 of her 60 counted in Redis, and
        # the per-process counters start from nothing, so 60 more pass and the rest are refused.
        statuses = asyncio.run(_requests(proxy, 80, proxy.keys.alice))
        assert sorted(set(statuses)) == [200, 429]
        assert statuses.count(200) == 60
        assert not proxy.runtime.limits.shared
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"

        private_redis.start()  # empty: Redis here keeps nothing on disk
        time.sleep(5.5)  # the failover period: the shared storage is tried again after it
        assert asyncio.run(_requests(proxy, 10, proxy.keys.bob)) == [200] * 10
        assert proxy.runtime.limits.shared
        assert http.get("/readyz").json()["status"] == "ready"
    log = proxy.log_text()
    assert log.count('"component":"rate_limits"') == 1  # one report for the whole outage
