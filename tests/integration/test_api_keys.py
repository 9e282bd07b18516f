"""API keys against their store (SQLite): verified against exactly one row with the same pepper, the
cache in front of the store, one store read for concurrent requests with one key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from liveness_proxy.auth import ApiKeyAuthenticator, new_api_key
from liveness_proxy.errors import Unauthenticated
from liveness_proxy.store import ApiKeyStore, StoredApiKey, create_engine, upgrade_database

PEPPER = b"k" * 48


async def test_verification_needs_the_same_pepper_and_a_live_key(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", pool_size=1)
    try:
        await upgrade_database(engine)
        store = ApiKeyStore(engine)
        issued = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=1.0)
        await store.add(issued.stored)
        right = ApiKeyAuthenticator(store, pepper=PEPPER, cache_seconds=0)
        wrong_pepper = ApiKeyAuthenticator(store, pepper=b"x" * 48, cache_seconds=0)
        caller = await right.authenticate(Headers({"x-api-key": issued.key}))
        assert caller is not None
        assert (caller.subject, caller.credential_id) == ("alice", f"key:{issued.key_id}")
        with pytest.raises(Unauthenticated):
            await wrong_pepper.verify(issued.key)
        with pytest.raises(Unauthenticated):
            await right.verify(issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B"))
        assert await store.revoke(issued.key_id, revoked_at=2.0)
        assert not await store.revoke(issued.key_id, revoked_at=3.0)
        with pytest.raises(Unauthenticated):
            await right.verify(issued.key)
    finally:
        await engine.dispose()


async def test_cache_serves_verified_keys_without_the_store(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", pool_size=1)
    now = [100.0]
    try:
        await upgrade_database(engine)
        store = ApiKeyStore(engine)
        issued = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=1.0)
        await store.add(issued.stored)
        authenticator = ApiKeyAuthenticator(store, pepper=PEPPER, cache_seconds=10, clock=lambda: now[0])
        await authenticator.verify(issued.key)
        await store.revoke(issued.key_id, revoked_at=2.0)
        assert (await authenticator.verify(issued.key)).subject == "alice"  # within the cache time
        now[0] += 11
        with pytest.raises(Unauthenticated):
            await authenticator.verify(issued.key)
    finally:
        await engine.dispose()


async def test_concurrent_requests_with_one_key_share_one_store_read(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", pool_size=1)
    try:
        await upgrade_database(engine)
        store = ApiKeyStore(engine)
        issued = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=1.0)
        wrong = issued.key[:-4] + "AAAA"
        await store.add(issued.stored)
        reads: list[str] = []
        real_get = store.get

        async def counting_get(key_id: str) -> StoredApiKey | None:
            reads.append(key_id)
            await asyncio.sleep(0.05)  # a slow store: every request arrives while the read is out
            return await real_get(key_id)

        store.get = counting_get  # type: ignore[method-assign]
        authenticator = ApiKeyAuthenticator(store, pepper=PEPPER, cache_seconds=10)
        callers = await asyncio.gather(*(authenticator.verify(issued.key) for _ in range(200)))
        refusals = await asyncio.gather(
            *(authenticator.verify(wrong) for _ in range(50)), return_exceptions=True
        )
    finally:
        await engine.dispose()
    assert {caller.subject for caller in callers} == {"alice"}
    assert all(isinstance(refusal, Unauthenticated) for refusal in refusals)
    assert len(reads) == 2  # one for the key, one for the wrong secret (a different cache key)
