"""A start that cannot proceed ends the command with one clear line and a non-zero exit: no
traceback, no "Task exception was never retrieved", no password."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from e2e.test_cli import COMMAND, free_port
from support import subprocess_env


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False
    )


def assert_one_clear_line(completed: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert completed.returncode != 0
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in completed.stderr + completed.stdout


def test_demo_with_its_sandbox_port_taken(taken_port: int, tmp_path: Path) -> None:
    completed = run(
        [
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--port",
            str(free_port()),
            "--sandbox-port",
            str(taken_port),
        ]
    )
    assert_one_clear_line(completed, "cannot start", f"--sandbox-port {taken_port}")
    assert completed.returncode == 1


def test_serve_with_its_port_taken(taken_port: int, tmp_path: Path) -> None:
    env = subprocess_env("http://127.0.0.1:9", tmp_path / "proxy.db")
    completed = run(["serve", "--port", str(taken_port)], env=env)
    assert_one_clear_line(completed, "cannot start", f"--port {taken_port}")
    assert not (tmp_path / "proxy.db").exists()  # refused before the migrations


def test_serve_with_contradictory_jwt_settings(tmp_path: Path) -> None:
    env = subprocess_env(
        "http://127.0.0.1:9",
        tmp_path / "proxy.db",
        LIVENESS_PROXY_JWT_JWKS_URL="https://idp.example/jwks",
        LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE=str(tmp_path / "key.pem"),
    )
    completed = run(["serve", "--port", str(free_port())], env=env)
    assert_one_clear_line(completed, "configuration error", "LIVENESS_PROXY_JWT_JWKS_URL")
    assert completed.returncode == 2


def test_serve_with_jwt_callers_but_no_audience(tmp_path: Path) -> None:
    env = subprocess_env(
        "http://127.0.0.1:9", tmp_path / "proxy.db", LIVENESS_PROXY_JWT_JWKS_URL="https://idp.example/jwks"
    )
    completed = run(["serve", "--port", str(free_port())], env=env)
    assert_one_clear_line(
        completed,
        "configuration error",
        "LIVENESS_PROXY_JWT_AUDIENCE",
        "LIVENESS_PROXY_JWT_ALLOW_ANY_AUDIENCE=true",
    )
    assert completed.returncode == 2
    assert not (tmp_path / "proxy.db").exists()  # refused before the migrations


def test_serve_with_an_unreachable_database_names_no_password(tmp_path: Path) -> None:
    env = subprocess_env(
        "http://127.0.0.1:9",
        tmp_path / "proxy.db",
        LIVENESS_PROXY_DATABASE_URL="postgresql://proxy:hunter2-secret@127.0.0.1:9/proxy",
    )
    completed = run(["serve", "--port", str(free_port())], env=env)
    assert_one_clear_line(completed, "database cannot be reached")
    assert "hunter2" not in completed.stderr + completed.stdout


def test_serve_with_an_audit_signing_key_that_is_not_ed25519(tmp_path: Path) -> None:
    key = tmp_path / "audit-signing.pem"
    # An RSA key: what `openssl genpkey` writes when the algorithm is forgotten.
    key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    env = subprocess_env(
        "http://127.0.0.1:9", tmp_path / "proxy.db", LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE=str(key)
    )
    completed = run(["serve", "--port", str(free_port())], env=env)
    assert_one_clear_line(
        completed,
        "configuration error",
        "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: not an Ed25519 private key (it is an RSA key)",
    )
    assert completed.returncode == 2
    assert not (tmp_path / "proxy.db").exists()  # refused before the migrations
