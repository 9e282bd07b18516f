"""API-key hygiene over HTTP: an expired key is refused like any invalid one, and a key's use is
recorded for `keys list` without a write per request."""

from __future__ import annotations

import asyncio
import time

import httpx

from liveness_proxy.auth import new_api_key
from liveness_proxy.store import ApiKeyStore, StoredApiKey
from support import TEST_PEPPER, ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"


def _add_key(proxy: ProxyHarness, *, expires_at: float) -> str:
    issued = new_api_key(
        pepper=TEST_PEPPER.encode(),
        subject="dave",
        scopes=[],
        name="expiring",
        now=time.time() - 3600,
        expires_at=expires_at,
    )

    async def add() -> None:
        async with proxy.database() as engine:
            await ApiKeyStore(engine).add(issued.stored)

    asyncio.run(add())
    return issued.key


def _stored(proxy: ProxyHarness, key: str) -> StoredApiKey:
    async def get() -> StoredApiKey | None:
        async with proxy.database() as engine:
            return await ApiKeyStore(engine).get(key.split("_")[1])

    stored = asyncio.run(get())
    assert stored is not None
    return stored


def _comparable(response: httpx.Response) -> tuple[int, str, dict[str, object]]:
    body = response.json()
    for varying in ("request_id", "instance"):
        body.pop(varying, None)
    return response.status_code, response.headers["www-authenticate"], body


def test_an_expired_key_gets_401_exactly_like_an_unknown_key(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    expired = _add_key(proxy, expires_at=time.time() - 1)
    live = _add_key(proxy, expires_at=time.time() + 3600)
    unknown = new_api_key(pepper=TEST_PEPPER.encode(), subject="x", scopes=[], name="n", now=1.0).key
    assert client.post(SESSION_TOKEN, headers=proxy.auth(live)).status_code == 200
    refused = client.post(SESSION_TOKEN, headers=proxy.auth(expired))
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert _comparable(refused) == _comparable(client.post(SESSION_TOKEN, headers=proxy.auth(unknown)))


def test_a_keys_last_use_is_recorded_once_not_per_request(proxy: ProxyHarness, client: httpx.Client) -> None:
    key = _add_key(proxy, expires_at=time.time() + 3600)
    assert _stored(proxy, key).last_used_at is None
    before = time.time()
    assert client.post(SESSION_TOKEN, headers=proxy.auth(key)).status_code == 200
    after_first = time.time()
    time.sleep(0.01)
    for _ in range(4):
        assert client.post(SESSION_TOKEN, headers=proxy.auth(key)).status_code == 200
    deadline = time.monotonic() + 5
    while (recorded := _stored(proxy, key).last_used_at) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # time for any later write to land
    # The first request's use: the next four fell within the interval and wrote nothing.
    assert recorded is not None
    assert before <= recorded <= after_first
    assert _stored(proxy, key).last_used_at == recorded
