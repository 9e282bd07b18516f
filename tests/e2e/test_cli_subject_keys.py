"""A subject-key rotation as an operator runs it, on SQLite and PostgreSQL: add a key as the last line
of LIVENESS_PROXY_SUBJECT_KEY, run `liveness-proxy subjects rewrap`, remove the older lines; every
subject's secret (and so every commitment) is the same afterwards."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from e2e.test_cli import run
from liveness_proxy.store import create_engine, upgrade_database
from liveness_proxy.store.database import MigrationKeys
from liveness_proxy.store.subjects import SubjectKeyError, SubjectKeys, SubjectRegistry, commit
from liveness_proxy.store.tables import subject_secrets
from support import TEST_AUDIT_KEYS, TEST_PEPPER, subprocess_env

OLD_KEY = "old:" + "o" * 40
NEW_KEY = "new:" + "n" * 40


def subject_keys(subject_key: str) -> SubjectKeys:
    return SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key=subject_key)


async def wrapped_key_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT wrapped FROM subject_secrets ORDER BY lookup"))
        return sorted(str(wrapped).partition(".")[0] for (wrapped,) in rows)


@pytest.mark.slow
def test_rewrap_moves_every_secret_to_the_last_key(database_url: str, tmp_path: Path) -> None:
    env = subprocess_env(
        "http://127.0.0.1:9", tmp_path / "unused.db", LIVENESS_PROXY_DATABASE_URL=database_url
    )
    subjects = [f"subject-{index}" for index in range(1203)]  # more than one batch of the command

    async def prepare() -> dict[str, str]:
        """Secrets from three eras: the pepper-derived key, then `old`, then `old` and `new` (the
        bulk written as the registry writes them, in one statement per era)."""
        engine = create_engine(database_url)
        try:
            await upgrade_database(engine, keys=MigrationKeys(TEST_AUDIT_KEYS, subject_keys("")))
            commitments = {}
            eras = (
                ("", subjects[:1000]),
                (OLD_KEY, subjects[1000:1200]),
                (f"{OLD_KEY}\n{NEW_KEY}", subjects[1200:]),
            )
            for key_value, names in eras:
                keys, rows = subject_keys(key_value), []
                for name in names:
                    secret, lookup = os.urandom(32), keys.lookup(name)
                    rows.append({"lookup": lookup, "wrapped": keys.wrap(lookup, secret), "created_at": 1.0})
                    commitments[name] = commit(secret, "subject", name)
                async with engine.begin() as connection:
                    await connection.execute(insert(subject_secrets), rows)
            # The registry opens them as it would have made them.
            resolved = await SubjectRegistry(engine, subject_keys(f"{OLD_KEY}\n{NEW_KEY}")).resolve(
                subjects[0]
            )
            assert resolved.commitment == commitments[subjects[0]]
            assert await wrapped_key_ids(engine) == ["new"] * 3 + ["old"] * 200 + ["pepper"] * 1000
            return commitments
        finally:
            await engine.dispose()

    async def after(key_value: str) -> tuple[list[str], dict[str, str | None]]:
        engine = create_engine(database_url)
        try:
            registry = SubjectRegistry(engine, subject_keys(key_value))
            async with engine.connect() as connection:
                found = await registry.commitments_of(set(subjects), connection)
            return await wrapped_key_ids(engine), found
        finally:
            await engine.dispose()

    commitments = asyncio.run(prepare())

    rotating = {**env, "LIVENESS_PROXY_SUBJECT_KEY": f"{OLD_KEY}\n{NEW_KEY}"}
    first = run(rotating, "subjects", "rewrap", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1200 subject secrets wrapped again under key new"
    again = run(rotating, "subjects", "rewrap", cwd=tmp_path)
    assert again.stdout.strip() == "0 subject secrets wrapped again under key new"

    # The older line removed: everything still opens, to the same secrets.
    key_ids, found = asyncio.run(after(NEW_KEY))
    assert key_ids == ["new"] * len(subjects)
    assert found == commitments
    for value in (OLD_KEY, f"brand-new:{'b' * 40}"):  # a set without `new` opens nothing now
        with pytest.raises(SubjectKeyError, match="wrapped with key 'new', which is not configured"):
            asyncio.run(after(value))


def test_rewrap_without_the_key_that_wrapped_a_secret_ends_with_one_line(tmp_path: Path) -> None:
    database = tmp_path / "proxy.db"
    env = subprocess_env("http://127.0.0.1:9", database)

    async def prepare() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{database}")
        try:
            await upgrade_database(engine, keys=MigrationKeys(TEST_AUDIT_KEYS, subject_keys(OLD_KEY)))
            await SubjectRegistry(engine, subject_keys(OLD_KEY)).resolve("alice")
        finally:
            await engine.dispose()

    asyncio.run(prepare())
    refused = run({**env, "LIVENESS_PROXY_SUBJECT_KEY": NEW_KEY}, "subjects", "rewrap", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "LIVENESS_PROXY_SUBJECT_KEY" in lines[0]
    assert "wrapped with key 'old', which is not configured" in lines[0]
    assert "o" * 20 not in refused.stderr + refused.stdout
