"""API keys against their store (SQLite): verified against exactly one row with the same pepper, the
cache in front of the store (known and unknown key ids), one store read for concurrent requests with
one key id, expiry, and the throttled record of each key's last use."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import Headers

from liveness_proxy.auth import ApiKeyAuthenticator, IssuedApiKey, new_api_key
from liveness_proxy.auth.api_keys import MAX_UNKNOWN_SECONDS
from liveness_proxy.errors import Unauthenticated
from liveness_proxy.sandbox import ManualClock
from liveness_proxy.store import ApiKeyStore, KeyNotRotatable, StoredApiKey, create_engine, upgrade_database
from liveness_proxy.store.database import alembic_config
from support import TEST_KEYS

PEPPER = b"k" * 48


class CountingStore(ApiKeyStore):
    """The real store, counting what reaches the database; `use_gate`, when set, holds every
    last-use write until it is opened, and `fail_uses` makes them fail."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.reads: list[str] = []  # the rows read, by key id
        self.id_set_reads = 0  # reads of every key id at once
        self.use_writes: list[dict[str, float]] = []
        self.use_gate: asyncio.Event | None = None
        self.fail_uses = False
        self.read_delay = 0.0

    async def ids(self) -> list[str]:
        self.id_set_reads += 1
        return await super().ids()

    async def get(self, key_id: str) -> StoredApiKey | None:
        self.reads.append(key_id)
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        return await super().get(key_id)

    async def record_use(self, uses: Mapping[str, float]) -> None:
        if self.use_gate is not None:
            await self.use_gate.wait()
        self.use_writes.append(dict(uses))
        if self.fail_uses:
            raise ConnectionRefusedError("database down")
        await super().record_use(uses)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}", pool_size=1)
    await upgrade_database(engine, keys=TEST_KEYS)
    yield engine
    await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> CountingStore:
    return CountingStore(engine)


@pytest.fixture
async def any_store(database_url: str) -> AsyncIterator[ApiKeyStore]:
    """The store on SQLite and on PostgreSQL, for the statements that differ between them."""
    engine = create_engine(database_url, pool_size=1)
    await upgrade_database(engine, keys=TEST_KEYS)
    yield ApiKeyStore(engine)
    await engine.dispose()


class Clocks:
    """The authenticator's monotonic clock and the wall clock, moved together."""

    def __init__(self) -> None:
        self.monotonic = ManualClock()
        self.wall = time.time()

    def now(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.monotonic.advance(seconds)
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def authenticator_on(
    store: ApiKeyStore,
    clocks: Clocks,
    *,
    cache_seconds: float = 10.0,
    unknown_cache_size: int = 10_000,
    max_known_ids: int = 200_000,
    use_interval_seconds: float = 300.0,
    on_use_not_recorded: Callable[[BaseException], None] | None = None,
) -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(
        store,
        pepper=PEPPER,
        cache_seconds=cache_seconds,
        clock=clocks.monotonic.now,
        wall_clock=clocks.now,
        unknown_cache_size=unknown_cache_size,
        max_known_ids=max_known_ids,
        use_interval_seconds=use_interval_seconds,
        on_use_not_recorded=on_use_not_recorded,
    )


async def issue(store: ApiKeyStore, *, now: float, expires_at: float | None = None) -> IssuedApiKey:
    issued = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=now, expires_at=expires_at)
    await store.add(issued.stored)
    return issued


def other_secret(key: str) -> str:
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


async def refusal(authenticator: ApiKeyAuthenticator, key: str) -> tuple[str, str | None]:
    with pytest.raises(Unauthenticated) as caught:
        await authenticator.verify(key)
    return caught.value.detail, caught.value.headers.get("WWW-Authenticate")


async def test_verification_needs_the_same_pepper_and_a_live_key(store: CountingStore) -> None:
    issued = await issue(store, now=1.0)
    right = ApiKeyAuthenticator(store, pepper=PEPPER, cache_seconds=0)
    wrong_pepper = ApiKeyAuthenticator(store, pepper=b"x" * 48, cache_seconds=0)
    try:
        caller = await right.authenticate(Headers({"x-api-key": issued.key}))
        assert caller is not None
        assert (caller.subject, caller.credential_id) == ("alice", f"key:{issued.key_id}")
        with pytest.raises(Unauthenticated):
            await wrong_pepper.verify(issued.key)
        with pytest.raises(Unauthenticated):
            await right.verify(other_secret(issued.key))
        assert await store.revoke(issued.key_id, revoked_at=2.0)
        assert not await store.revoke(issued.key_id, revoked_at=3.0)
        with pytest.raises(Unauthenticated):
            await right.verify(issued.key)
    finally:
        await right.close()
        await wrong_pepper.close()


async def test_cache_serves_verified_keys_without_the_store(store: CountingStore, clocks: Clocks) -> None:
    issued = await issue(store, now=1.0)
    authenticator = authenticator_on(store, clocks, cache_seconds=10)
    try:
        await authenticator.verify(issued.key)
        await store.revoke(issued.key_id, revoked_at=2.0)
        assert (await authenticator.verify(issued.key)).subject == "alice"  # within the cache time
        clocks.advance(11)
        with pytest.raises(Unauthenticated):
            await authenticator.verify(issued.key)
    finally:
        await authenticator.close()


async def test_concurrent_requests_with_one_key_id_share_one_store_read(store: CountingStore) -> None:
    issued = await issue(store, now=1.0)
    store.read_delay = 0.05  # a slow store: every request arrives while the read is out
    authenticator = ApiKeyAuthenticator(store, pepper=PEPPER, cache_seconds=10)
    try:
        callers = await asyncio.gather(*(authenticator.verify(issued.key) for _ in range(200)))
        refusals = await asyncio.gather(
            *(authenticator.verify(other_secret(issued.key)) for _ in range(50)), return_exceptions=True
        )
    finally:
        await authenticator.close()
    assert {caller.subject for caller in callers} == {"alice"}
    assert all(isinstance(refusal, Unauthenticated) for refusal in refusals)
    # One read for the key id: the wrong secret is compared with the cached row, not read again.
    assert store.reads == [issued.key_id]


async def test_an_expired_key_gets_the_answer_of_any_invalid_key(
    store: CountingStore, clocks: Clocks
) -> None:
    expired = await issue(store, now=clocks.now() - 100, expires_at=clocks.now() - 1)
    live = await issue(store, now=clocks.now() - 100, expires_at=clocks.now() + 3600)
    revoked = await issue(store, now=clocks.now() - 100)
    await store.revoke(revoked.key_id, revoked_at=clocks.now())
    unknown = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=1.0).key
    authenticator = authenticator_on(store, clocks)
    try:
        assert (await authenticator.verify(live.key)).subject == "alice"
        answers = {
            await refusal(authenticator, key)
            for key in (expired.key, revoked.key, unknown, other_secret(live.key))
        }
    finally:
        await authenticator.close()
    # Expired, revoked, unknown and wrong: one answer, so a caller learns nothing about which.
    assert answers == {("The API key is not valid.", 'Bearer realm="liveness-proxy", error="invalid_token"')}


async def test_the_cache_never_serves_a_key_past_its_expiry(store: CountingStore, clocks: Clocks) -> None:
    issued = await issue(store, now=clocks.now(), expires_at=clocks.now() + 5)
    authenticator = authenticator_on(store, clocks, cache_seconds=60)
    try:
        await authenticator.verify(issued.key)
        clocks.advance(4)
        await authenticator.verify(issued.key)
        clocks.advance(1.5)
        with pytest.raises(Unauthenticated):
            await authenticator.verify(issued.key)
    finally:
        await authenticator.close()
    assert store.reads == [issued.key_id]  # refused from the cache, at its expiry


async def test_unknown_key_ids_are_answered_from_memory_for_a_short_time(
    store: CountingStore, clocks: Clocks
) -> None:
    # A key made but not stored yet: its id is unknown until it is added (a lagging replica).
    pending = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=clocks.now())
    authenticator = authenticator_on(store, clocks, cache_seconds=3600)
    try:
        for _ in range(500):  # the same id with random secrets, as a flood sends them
            with pytest.raises(Unauthenticated):
                await authenticator.verify(f"lpk_{pending.key_id}_{secrets.token_urlsafe(32)}")
        for _ in range(500):  # random ids, each new
            with pytest.raises(Unauthenticated):
                await authenticator.verify(f"lpk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}")
        # One read of the ids for the whole flood, and no read of a row.
        assert (store.id_set_reads, store.reads) == (1, [])
        await store.add(pending.stored)
        with pytest.raises(Unauthenticated):
            await authenticator.verify(pending.key)  # still taken as unknown
        # However long the cache time, an unknown id is taken as such for MAX_UNKNOWN_SECONDS at most.
        clocks.advance(MAX_UNKNOWN_SECONDS)
        assert (await authenticator.verify(pending.key)).subject == "alice"
    finally:
        await authenticator.close()
    assert (store.id_set_reads, store.reads) == (2, [pending.key_id])


async def test_a_key_created_after_the_ids_were_read_is_found_within_about_a_second(
    store: CountingStore, clocks: Clocks
) -> None:
    authenticator = authenticator_on(store, clocks, cache_seconds=3600)
    try:
        with pytest.raises(Unauthenticated):  # an unknown id: the set of ids is read now
            await authenticator.verify(f"lpk_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}")
        issued = new_api_key(pepper=PEPPER, subject="bob", scopes=[], name="n", now=clocks.now())
        await store.add(issued.stored)
        clocks.advance(1.1)  # a few keys: the set is read again after about a second
        assert (await authenticator.verify(issued.key)).subject == "bob"
    finally:
        await authenticator.close()
    assert store.id_set_reads == 2


async def test_the_unknown_id_cache_stays_bounded_and_forgets_the_oldest(
    store: CountingStore, clocks: Clocks
) -> None:
    # Without the set of every id (more keys than it keeps), unknown ids are read one by one.
    authenticator = authenticator_on(store, clocks, unknown_cache_size=50, max_known_ids=0)
    ids = [secrets.token_hex(8) for _ in range(300)]
    try:
        for key_id in ids:  # random ids: each costs one read, and memory holds the last 50 only
            with pytest.raises(Unauthenticated):
                await authenticator.verify(f"lpk_{key_id}_{secrets.token_urlsafe(32)}")
        assert len(store.reads) == 300
        with pytest.raises(Unauthenticated):
            await authenticator.verify(f"lpk_{ids[-1]}_{secrets.token_urlsafe(32)}")
        assert len(store.reads) == 300  # the newest is still remembered
        with pytest.raises(Unauthenticated):
            await authenticator.verify(f"lpk_{ids[0]}_{secrets.token_urlsafe(32)}")
        assert len(store.reads) == 301  # the oldest was forgotten
        assert len(authenticator._unknown) == 50
    finally:
        await authenticator.close()


async def test_last_use_is_written_once_per_interval_off_the_request_path(
    store: CountingStore, clocks: Clocks
) -> None:
    issued = await issue(store, now=clocks.now())
    store.use_gate = asyncio.Event()  # the write hangs until opened: requests must not wait for it
    authenticator = authenticator_on(store, clocks, use_interval_seconds=300)
    try:
        used_at = clocks.now()
        for _ in range(200):
            await asyncio.wait_for(authenticator.verify(issued.key), timeout=1)
        store.use_gate.set()
        await asyncio.sleep(0.05)
        assert store.use_writes == [{issued.key_id: used_at}]
        clocks.advance(299)
        await authenticator.verify(issued.key)
        await asyncio.sleep(0.05)
        assert len(store.use_writes) == 1  # within the interval: no write
        clocks.advance(1)
        await authenticator.verify(issued.key)
        await asyncio.sleep(0.05)
        assert store.use_writes[1:] == [{issued.key_id: used_at + 300}]
    finally:
        await authenticator.close()
    stored = await store.get(issued.key_id)
    assert stored is not None
    assert stored.last_used_at == used_at + 300


async def test_a_failed_use_write_is_reported_and_never_fails_a_request(
    store: CountingStore, clocks: Clocks
) -> None:
    issued = await issue(store, now=clocks.now())
    store.fail_uses = True
    failures: list[BaseException] = []
    authenticator = authenticator_on(store, clocks, on_use_not_recorded=failures.append)
    try:
        for _ in range(20):
            assert (await authenticator.verify(issued.key)).subject == "alice"
        await asyncio.sleep(0.05)
    finally:
        await authenticator.close()
    assert [type(failure) for failure in failures] == [ConnectionRefusedError]  # one try per interval


async def test_closing_writes_the_uses_still_queued(store: CountingStore, clocks: Clocks) -> None:
    issued = await issue(store, now=clocks.now())
    authenticator = authenticator_on(store, clocks)
    await authenticator.verify(issued.key)
    await authenticator.close()  # at once: the write task has not run yet
    stored = await store.get(issued.key_id)
    assert stored is not None
    assert stored.last_used_at == clocks.now()


async def test_an_older_use_never_overwrites_a_newer_one(any_store: ApiKeyStore) -> None:
    issued = await issue(any_store, now=1.0)
    await any_store.record_use({issued.key_id: 200.0})
    await any_store.record_use({issued.key_id: 100.0})  # another process, late with an older use
    stored = await any_store.get(issued.key_id)
    assert stored is not None
    assert stored.last_used_at == 200.0


async def test_rotation_adds_a_successor_and_shortens_the_old_key_only(any_store: ApiKeyStore) -> None:
    now = 1000.0
    old = await issue(any_store, now=1.0)
    successor = new_api_key(
        pepper=PEPPER, subject="alice", scopes=["liveness:admin"], name="n", now=now, successor_of=old.key_id
    )
    assert (
        await any_store.rotate(successor.stored, old_expires_at=now + 7 * 86400, now=now) == now + 7 * 86400
    )
    rows = {key.key_id: key for key in await any_store.list()}
    assert rows[successor.key_id].successor_of == old.key_id
    assert rows[old.key_id].expires_at == now + 7 * 86400
    assert rows[old.key_id].state(now) == "active"
    # Rotating again never extends the old key: its earlier expiry stands.
    again = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=now, successor_of=old.key_id)
    assert await any_store.rotate(again.stored, old_expires_at=now + 30 * 86400, now=now) == now + 7 * 86400


@pytest.mark.parametrize("state", ["unknown", "revoked", "expired"])
async def test_only_a_usable_key_can_be_rotated(any_store: ApiKeyStore, state: str) -> None:
    now = 1000.0
    old = await issue(any_store, now=1.0, expires_at=now if state == "expired" else None)
    if state == "revoked":
        await any_store.revoke(old.key_id, revoked_at=2.0)
    old_id = old.key_id if state != "unknown" else secrets.token_hex(8)
    successor = new_api_key(pepper=PEPPER, subject="alice", scopes=[], name="n", now=now, successor_of=old_id)
    with pytest.raises(KeyNotRotatable, match=state if state != "unknown" else "no key with id"):
        await any_store.rotate(successor.stored, old_expires_at=now + 86400, now=now)
    assert await any_store.get(successor.key_id) is None  # nothing was added


async def test_a_downgrade_below_0007_never_brings_an_expired_key_back(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1)
    store = ApiKeyStore(engine)
    now = time.time()

    def downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0006")

    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        expired = await issue(store, now=now - 100, expires_at=now - 1)
        expiring = await issue(store, now=now - 100, expires_at=now + 3600)
        async with engine.begin() as connection:
            await connection.run_sync(downgrade)
            rows = {
                row.key_id: row.revoked_at
                for row in await connection.execute(text("SELECT key_id, revoked_at FROM api_keys"))
            }
        # The older schema has no expiry: the expired key is revoked at its expiry, the other works on.
        assert rows == {expired.key_id: expired.stored.expires_at, expiring.key_id: None}
        await upgrade_database(engine, keys=TEST_KEYS)  # and back up: the columns return, empty
        assert await store.get(expiring.key_id) == dataclasses.replace(expiring.stored, expires_at=None)
    finally:
        await engine.dispose()
