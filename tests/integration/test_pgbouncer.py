"""PostgreSQL behind PgBouncer in transaction pooling mode: a real PgBouncer with a small server
pool, in front of the real PostgreSQL. Each transaction may land on another server connection, so
a prepared statement made in one is unknown, or a different one, in the next: the setting
LIVENESS_PROXY_DATABASE_PGBOUNCER=true must make everything work there, migrations included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import pytest

from liveness_proxy.settings import async_database_url
from liveness_proxy.store import AuditLog, create_engine
from services import running_pgbouncer, scratch_postgres
from support import TEST_AUDIT_KEYS, ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"


@pytest.fixture
def through_pgbouncer() -> Iterator[str]:
    with scratch_postgres() as direct, running_pgbouncer(direct) as bouncer:
        yield bouncer.url


async def _flow(proxy: ProxyHarness, flows: int) -> list[int]:
    """`flows` concurrent callers, each: session token, create, read the result."""

    async def one(http: httpx.AsyncClient) -> list[int]:
        token = await http.post(SESSION_TOKEN, headers=proxy.auth())
        if token.status_code != 200:
            return [token.status_code]
        created = await http.post(
            SESSIONS, headers=proxy.auth(), json={"session_token": token.json()["session_token"]}
        )
        if created.status_code != 201:
            return [token.status_code, created.status_code]
        result = await http.get(f"{SESSIONS}/{created.json()['session_id']}/result", headers=proxy.auth())
        return [token.status_code, created.status_code, result.status_code]

    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        answers = await asyncio.gather(*(one(http) for _ in range(flows)))
    return [status for answer in answers for status in answer]


@pytest.mark.served
def test_the_proxy_runs_behind_pgbouncer_in_transaction_mode(
    through_pgbouncer: str, make_proxy: Callable[..., AbstractContextManager[ProxyHarness]]
) -> None:
    overrides = {"LIVENESS_PROXY_DATABASE_URL": through_pgbouncer, "LIVENESS_PROXY_DATABASE_PGBOUNCER": True}
    with make_proxy(proxy_overrides=overrides) as proxy:
        # Twice as many concurrent flows as PgBouncer has server connections, so transactions of
        # one client connection are spread over several server connections.
        statuses = asyncio.run(_flow(proxy, 40))
        assert statuses == [200, 201, 200] * 40
        assert len(proxy.audit_rows()) == 120
        assert "prepared statement" not in proxy.log_text()

    async def verify() -> bool:
        engine = create_engine(async_database_url(through_pgbouncer), pool_size=1)
        try:
            return (await AuditLog(engine, TEST_AUDIT_KEYS).verify()).ok
        finally:
            await engine.dispose()

    assert asyncio.run(verify())


@pytest.mark.served
def test_without_the_setting_prepared_statements_break_behind_pgbouncer(
    through_pgbouncer: str, make_proxy: Callable[..., AbstractContextManager[ProxyHarness]]
) -> None:
    # The control: what the setting prevents is real, so the test above tests something.
    overrides = {"LIVENESS_PROXY_DATABASE_URL": through_pgbouncer}
    with make_proxy(proxy_overrides=overrides) as proxy:
        statuses = asyncio.run(_flow(proxy, 40))
        assert statuses != [200, 201, 200] * 40
        assert "PreparedStatement" in proxy.log_text() or "prepared statement" in proxy.log_text()


def test_a_database_outage_is_a_503_and_recovers_by_itself(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]],
) -> None:
    # PgBouncer stands in for the database server here: stopping it makes PostgreSQL unreachable
    # for this proxy only, and starting it again on the same port brings it back.
    with scratch_postgres() as direct, running_pgbouncer(direct) as bouncer:
        overrides = {
            "LIVENESS_PROXY_DATABASE_URL": bouncer.url,
            "LIVENESS_PROXY_DATABASE_PGBOUNCER": True,
            # Alice's key and her session's owner are then cached: her read reaches Cynopsis
            # without the database, and only its audit record cannot be written.
            "LIVENESS_PROXY_API_KEY_CACHE_SECONDS": 60,
        }
        with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as http:
            session_id = proxy.create_session(http)
            assert http.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth()).status_code == 200
            reads_before = proxy.upstream_paths().count(f"/service/liveness-v2/liveness_result/{session_id}")
            bouncer.stop()
            answers = [
                http.post(SESSION_TOKEN, headers=proxy.auth()),
                http.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth()),
                # Bob's key must be looked up (the test proxy caches no key): no key is let in unchecked.
                http.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth(proxy.keys.bob)),
            ]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["request_id"] == answer.headers["x-request-id"]
            # The upstream answered Alice, but an answer without its audit record is never sent.
            reads = proxy.upstream_paths().count(f"/service/liveness-v2/liveness_result/{session_id}")
            assert reads == reads_before + 1
            assert '"event":"audit_unavailable"' in proxy.log_text().replace(" ", "")
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["store"].startswith("failed")
            assert http.get("/healthz").status_code == 200
            bouncer.start()
            assert http.get(f"{SESSIONS}/{session_id}/result", headers=proxy.auth()).status_code == 200
            # /readyz reuses its database check for a second.
            deadline = time.monotonic() + 5
            while http.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "/readyz did not recover"
                time.sleep(0.2)
