"""`check` and `serve` refuse audit and subject keys they cannot use (an unreadable keys file, a
malformed line, a short secret, a bad subject key) with one line that names the setting, before
anything is opened, and without showing a secret."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from e2e.test_cli import free_port
from e2e.test_start_refusals import assert_one_clear_line, run
from support import subprocess_env

SECRET = "kept-out-of-every-message-" + "x" * 20


def keys_file(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "audit-keys"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


# The settings (made in the test's folder) and what the one line must say.
Case = tuple[Callable[[Path], dict[str, str]], str]
CASES: dict[str, Case] = {
    "keys-file-missing": (
        lambda tmp: {"LIVENESS_PROXY_AUDIT_KEYS_FILE": str(tmp / "no-such-file")},
        "LIVENESS_PROXY_AUDIT_KEYS_FILE: cannot read the file (No such file or directory)",
    ),
    "keys-file-a-directory": (
        lambda tmp: {"LIVENESS_PROXY_AUDIT_KEYS_FILE": str(tmp)},
        "LIVENESS_PROXY_AUDIT_KEYS_FILE: cannot read the file (Is a directory)",
    ),
    "keys-file-not-text": (
        lambda tmp: {"LIVENESS_PROXY_AUDIT_KEYS_FILE": keys_file(tmp, b"k1:\xff\xfe" + SECRET.encode())},
        "LIVENESS_PROXY_AUDIT_KEYS_FILE: not UTF-8 text",
    ),
    "keys-file-malformed-line": (
        lambda tmp: {"LIVENESS_PROXY_AUDIT_KEYS_FILE": keys_file(tmp, f"# keys\nk1:{SECRET}\n{SECRET}\n")},
        "LIVENESS_PROXY_AUDIT_KEYS_FILE: line 3: expected key_id:secret",
    ),
    "keys-file-short-secret": (
        lambda tmp: {"LIVENESS_PROXY_AUDIT_KEYS_FILE": keys_file(tmp, f"k1:{SECRET}\nk2:short-secret\n")},
        "LIVENESS_PROXY_AUDIT_KEYS_FILE: line 2: the secret of key k2 needs at least 32 characters",
    ),
    "subject-key-short": (
        lambda tmp: {"LIVENESS_PROXY_SUBJECT_KEY": "k1:short-secret"},
        "LIVENESS_PROXY_SUBJECT_KEY: line 1: the secret needs at least 32 characters",
    ),
    "subject-key-bad-id": (
        lambda tmp: {"LIVENESS_PROXY_SUBJECT_KEY": f"k1:{SECRET}\nbad id:{SECRET}"},
        "LIVENESS_PROXY_SUBJECT_KEY: line 2: a key id is 1-32 letters, digits, '-' or '_'",
    ),
    "subject-key-file-duplicate-id": (
        lambda tmp: {"LIVENESS_PROXY_SUBJECT_KEY_FILE": keys_file(tmp, f"k1:{SECRET}\nk1:{SECRET}y\n")},
        "LIVENESS_PROXY_SUBJECT_KEY_FILE: line 2: the same key id as line 1",
    ),
    "subject-key-file-missing": (
        lambda tmp: {"LIVENESS_PROXY_SUBJECT_KEY_FILE": str(tmp / "no-such-file")},
        "LIVENESS_PROXY_SUBJECT_KEY_FILE: cannot read the file (No such file or directory)",
    ),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("case", list(CASES))
def test_unusable_keys_end_the_command_with_one_line(command: str, case: str, tmp_path: Path) -> None:
    make, expected = CASES[case]
    env = subprocess_env("http://127.0.0.1:9", tmp_path / "proxy.db", **make(tmp_path))
    args = ["serve", "--port", str(free_port())] if command == "serve" else ["check"]
    completed = run(args, env=env, cwd=tmp_path)
    assert_one_clear_line(completed, "configuration error", expected)
    assert completed.returncode == 2
    assert SECRET not in completed.stdout + completed.stderr
    assert not (tmp_path / "proxy.db").exists()  # refused before the database was opened


def test_check_accepts_usable_keys_and_goes_on_to_the_live_checks(tmp_path: Path) -> None:
    env = subprocess_env(
        "http://127.0.0.1:9",
        tmp_path / "proxy.db",
        LIVENESS_PROXY_AUDIT_KEYS_FILE=keys_file(tmp_path, f"# rotated yearly\nk2026:{SECRET}\n"),
        LIVENESS_PROXY_SUBJECT_KEY=f"old:{SECRET}\nnew:{SECRET}z",
    )
    completed = run(["check"], env=env, cwd=tmp_path)
    assert "configuration error" not in completed.stderr, completed.stderr
    assert "database: reachable" in completed.stdout
    assert "upstream token: FAILED" in completed.stdout  # nothing listens upstream: exit 1, not 2
    assert completed.returncode == 1
    assert "LIVENESS_PROXY_SUBJECT_KEY=set (hidden)" in completed.stdout
    assert SECRET not in completed.stdout + completed.stderr
