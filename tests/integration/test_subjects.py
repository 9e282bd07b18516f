"""Subject secrets (store/subjects.py) on SQLite and PostgreSQL: created once however many processes
ask at the same moment, found without being created, sealed to their row, and opened through a
subject-key rotation (the last key wraps, every key unwraps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store import create_engine, upgrade_database
from liveness_proxy.store.subjects import (
    SubjectKeyError,
    SubjectKeys,
    SubjectRegistry,
    SubjectSecret,
    commit,
)
from support import TEST_KEYS, TEST_PEPPER

OLD_KEY = "old:" + "o" * 40
NEW_KEY = "new:" + "n" * 40


def subject_keys(subject_key: str = "") -> SubjectKeys:
    return SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key=subject_key)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url, pool_size=2)
    await upgrade_database(made, keys=TEST_KEYS)
    yield made
    await made.dispose()


async def stored(engine: AsyncEngine) -> dict[str, str]:
    """Every row of `subject_secrets`: lookup → wrapped secret."""
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT lookup, wrapped FROM subject_secrets"))
        return {str(lookup): str(wrapped) for lookup, wrapped in rows}


async def execute(engine: AsyncEngine, sql: str, **params: object) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(sql), params)


class CountingRegistry(SubjectRegistry):
    """The real registry, counting its reads of the table; with a `barrier`, each read is held until
    the other registry has read too, so both have seen no row before either inserts one."""

    def __init__(
        self, engine: AsyncEngine, keys: SubjectKeys, barrier: asyncio.Barrier | None = None
    ) -> None:
        super().__init__(engine, keys)
        self.barrier = barrier
        self.finds = 0

    async def find(self, subject: str, connection: AsyncConnection | None = None) -> SubjectSecret | None:
        found = await super().find(subject, connection)
        self.finds += 1
        if self.barrier is not None:
            async with asyncio.timeout(10):
                await self.barrier.wait()
        return found


async def test_two_processes_resolving_a_new_subject_at_once_make_one_secret(database_url: str) -> None:
    first_engine, second_engine = create_engine(database_url), create_engine(database_url)
    try:
        await upgrade_database(first_engine, keys=TEST_KEYS)
        barrier = asyncio.Barrier(2)
        first = CountingRegistry(first_engine, subject_keys(), barrier)
        second = CountingRegistry(second_engine, subject_keys(), barrier)

        mine, theirs = await asyncio.gather(first.resolve("alice"), second.resolve("alice"))

        assert (first.finds, second.finds) == (1, 1)  # both looked, found nothing, and inserted
        assert mine == theirs
        assert mine.commitment == commit(mine.secret, "subject", "alice")
        assert len(await stored(first_engine)) == 1
        found = await SubjectRegistry(second_engine, subject_keys()).find("alice")
        assert found == mine
    finally:
        await first_engine.dispose()
        await second_engine.dispose()


async def test_concurrent_resolves_in_one_process_read_the_table_once(engine: AsyncEngine) -> None:
    registry = CountingRegistry(engine, subject_keys())
    resolved = await asyncio.gather(*(registry.resolve("alice") for _ in range(20)))
    assert len({secret.commitment for secret in resolved}) == 1
    assert registry.finds == 1
    assert await registry.resolve("alice") == resolved[0]  # cached now
    assert registry.finds == 1


async def test_find_never_creates_and_never_caches(engine: AsyncEngine) -> None:
    registry = SubjectRegistry(engine, subject_keys())
    assert await registry.find("nobody") is None
    async with engine.connect() as connection:
        assert await registry.commitments_of({"nobody"}, connection) == {"nobody": None}
    assert await stored(engine) == {}
    assert registry.cached("nobody") is None

    alice = await registry.resolve("alice")
    assert await registry.find("alice") == alice
    # An erasure elsewhere deleted the row: find sees the table, resolve its cache until forget_all.
    await execute(engine, "DELETE FROM subject_secrets")
    assert await registry.find("alice") is None
    assert await registry.resolve("alice") == alice
    registry.forget_all()
    comeback = await registry.resolve("alice")
    assert comeback.secret != alice.secret  # a subject who comes back starts clean
    assert comeback.commitment != alice.commitment


async def test_a_wrapped_secret_moved_to_another_row_does_not_open(engine: AsyncEngine) -> None:
    registry = SubjectRegistry(engine, subject_keys())
    alice, bob = await registry.resolve("alice"), await registry.resolve("bob")
    await execute(
        engine,
        "UPDATE subject_secrets SET wrapped = (SELECT wrapped FROM subject_secrets WHERE lookup = :a) "
        "WHERE lookup = :b",
        a=alice.lookup,
        b=bob.lookup,
    )
    fresh = SubjectRegistry(engine, subject_keys())
    with pytest.raises(SubjectKeyError, match="does not open with its key: altered, or a wrong key"):
        await fresh.find("bob")
    async with engine.connect() as connection:
        with pytest.raises(SubjectKeyError):
            await fresh.commitments_of({"alice", "bob"}, connection)
    assert await fresh.find("alice") == alice


async def test_an_altered_wrapped_secret_does_not_open(engine: AsyncEngine) -> None:
    alice = await SubjectRegistry(engine, subject_keys()).resolve("alice")
    wrapped = (await stored(engine))[alice.lookup]
    flipped = wrapped[:-3] + ("A" if wrapped[-3] != "A" else "B") + wrapped[-2:]
    await execute(engine, "UPDATE subject_secrets SET wrapped = :w", w=flipped)
    with pytest.raises(SubjectKeyError, match="does not open"):
        await SubjectRegistry(engine, subject_keys()).find("alice")


async def test_a_wrong_subject_key_is_named(engine: AsyncEngine) -> None:
    await SubjectRegistry(engine, subject_keys(OLD_KEY)).resolve("alice")
    with pytest.raises(SubjectKeyError, match="wrapped with key 'old', which is not configured"):
        await SubjectRegistry(engine, subject_keys(NEW_KEY)).find("alice")
    # The same key id with another secret.
    with pytest.raises(SubjectKeyError, match="does not open with its key: altered, or a wrong key"):
        await SubjectRegistry(engine, subject_keys("old:" + "x" * 40)).find("alice")


async def test_during_a_rotation_the_last_key_wraps_and_every_key_unwraps(engine: AsyncEngine) -> None:
    alice = await SubjectRegistry(engine, subject_keys(OLD_KEY)).resolve("alice")
    rotating = SubjectRegistry(engine, subject_keys(f"{OLD_KEY}\n{NEW_KEY}"))
    bob = await rotating.resolve("bob")

    wrapped = await stored(engine)
    assert wrapped[alice.lookup].startswith("old.")
    assert wrapped[bob.lookup].startswith("new.")
    assert await rotating.find("alice") == alice
    assert await rotating.find("bob") == bob
    assert await SubjectRegistry(engine, subject_keys(OLD_KEY)).find("alice") == alice


async def test_secrets_made_with_the_pepper_derived_key_open_once_a_subject_key_is_set(
    engine: AsyncEngine,
) -> None:
    """A deployment that ran without LIVENESS_PROXY_SUBJECT_KEY and then sets one keeps its
    subjects: the pepper-derived key still unwraps (like the pepper audit key still verifies), and
    `subjects rewrap` moves the secrets to the new key."""
    before = await SubjectRegistry(engine, subject_keys()).resolve("alice")
    assert (await stored(engine))[before.lookup].startswith("pepper.")
    configured = SubjectRegistry(engine, subject_keys(NEW_KEY))
    assert await configured.find("alice") == before
    later = await configured.resolve("bob")
    assert (await stored(engine))[later.lookup].startswith("new.")


async def test_the_default_key_comes_from_the_pepper(engine: AsyncEngine, tmp_path: Path) -> None:
    keys = subject_keys()
    assert keys.current_key_id == "pepper"
    alice = await SubjectRegistry(engine, keys).resolve("alice")
    # The same pepper opens it from another process; another pepper neither finds nor opens it.
    assert await SubjectRegistry(engine, subject_keys()).find("alice") == alice
    other = SubjectKeys.from_settings_values(pepper="another-pepper-" + "q" * 40, subject_key="")
    assert other.lookup("alice") != keys.lookup("alice")
    with pytest.raises(SubjectKeyError):
        other.unwrap(alice.lookup, (await stored(engine))[alice.lookup])
