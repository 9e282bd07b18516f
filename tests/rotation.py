"""What the client-secret rotation tests share (unit/, integration/ and e2e/test_secret_rotation.py): a
new secret, the secret file written as Kubernetes writes a mounted secret, the check that no secret
reached a text, and the sandbox served on loopback."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from liveness_proxy.sandbox import Sandbox
from support import CLIENT_SECRET, ServerThread, find_leaks, upstream_sandbox


def new_secret() -> str:
    return "rotated-client-secret-" + secrets.token_urlsafe(16)


def write_atomically(path: Path, text: str) -> None:
    """As Kubernetes updates a mounted secret: the new content appears whole, never half-written."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


def secret_file(folder: Path, value: str = CLIENT_SECRET) -> Path:
    path = folder / "client-secret"
    write_atomically(path, value)
    return path


def assert_no_secret_in(text: str, *values: str) -> None:
    """No known secret pattern, CLIENT_SECRET, nor any of `values` in `text`. (pytest does not rewrite
    the asserts of this module: the messages say which check failed without showing the secret.)"""
    assert find_leaks(text) == [], "a secret pattern in the text"
    for index, value in enumerate((CLIENT_SECRET, *values)):
        assert value not in text, f"secret {index} (0: CLIENT_SECRET, then the values given) in the text"


@contextlib.contextmanager
def served_sandbox() -> Iterator[tuple[Sandbox, str]]:
    """The sandbox served on loopback (lifespan off), and its URL."""
    upstream = upstream_sandbox()
    server = ServerThread(upstream.app, lifespan="off").start()
    try:
        yield upstream, server.url
    finally:
        server.stop()
