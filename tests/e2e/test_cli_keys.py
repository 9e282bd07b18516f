"""`keys create --expires-in`, `keys rotate` and what `keys list` shows, run as an operator would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from e2e.test_cli import run
from support import subprocess_env

DAY = 86400


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env("http://127.0.0.1:9", tmp_path / "keys.db")  # keys never call the upstream


def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    result = run(env, "keys", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {row["id"]: row for row in map(json.loads, result.stdout.splitlines())}


@pytest.mark.slow
def test_keys_expire_by_default_rotate_with_an_overlap_and_list_their_state(env: dict[str, str]) -> None:
    start = time.time()
    default = json.loads(run(env, "keys", "create", "--subject", "alice", "--scope", "s:1", "--json").stdout)
    never = json.loads(
        run(env, "keys", "create", "--subject", "bob", "--expires-in", "never", "--json").stdout
    )
    assert start + 365 * DAY <= default["expires_at"] <= time.time() + 365 * DAY
    assert never["expires_at"] is None
    refused = run(env, "keys", "create", "--subject", "carol", "--expires-in", "0")
    assert refused.returncode == 2
    assert "'never'" in refused.stderr

    rotated = run(env, "keys", "rotate", default["id"], "--expires-in", "30")
    assert rotated.returncode == 0, rotated.stderr
    successor_key = rotated.stdout.strip().splitlines()[-1]
    assert successor_key.startswith("lpk_")
    assert f"to replace {default['id']}" in rotated.stderr
    successor_id = successor_key.split("_")[1]
    rows = listed(env)
    old, successor = rows[default["id"]], rows[successor_id]
    assert (successor["subject"], successor["scopes"], successor["successor_of"]) == (
        "alice",
        ["s:1"],
        default["id"],
    )
    assert isinstance(old["expires_at"], float)
    assert start + 7 * DAY <= old["expires_at"] <= time.time() + 7 * DAY  # the default overlap
    assert isinstance(successor["expires_at"], float)
    assert successor["expires_at"] <= time.time() + 30 * DAY
    assert {row["state"] for row in rows.values()} == {"active"}
    assert {row["last_used_at"] for row in rows.values()} == {None}
    table = run(env, "keys", "list").stdout
    assert "EXPIRES (UTC)" in table
    assert "LAST USED (UTC)" in table

    # Overlap 0: the old key stops at once, and an expired key cannot be rotated again.
    now_rotated = json.loads(run(env, "keys", "rotate", successor_id, "--overlap-days", "0", "--json").stdout)
    assert now_rotated["successor_of"] == successor_id
    assert now_rotated["successor_of_expires_at"] <= time.time()
    assert listed(env)[successor_id]["state"] == "expired"
    again = run(env, "keys", "rotate", successor_id)
    assert (again.returncode, again.stdout) == (1, "")
    assert f"key {successor_id} has expired" in again.stderr
    unknown = run(env, "keys", "rotate", "0123456789abcdef")
    assert unknown.returncode == 1
    assert "no key with id '0123456789abcdef'" in unknown.stderr
