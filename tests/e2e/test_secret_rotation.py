"""Rotating the Cynopsis client secret of a running `serve` (a subprocess): SIGHUP rereads
CYNOPSIS_CLIENT_SECRET_FILE, so the next token request needs no refusal; the value never reaches a log."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from e2e.test_cli import COMMAND
from liveness_proxy.sandbox import Sandbox
from rotation import assert_no_secret_in, new_secret, secret_file, served_sandbox, write_atomically
from support import (
    LogScan,
    issue_keys,
    proxy_settings,
    subprocess_env,
)


@pytest.fixture
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    with served_sandbox() as pair:
        yield pair


# -- SIGHUP on a served proxy ---------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LogLines:
    """Reads a subprocess's stderr (its JSON log) as it is written."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        stream = process.stderr
        self._process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, *parts: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if all(part in line for part in parts):
                    return line
            if self._process.poll() is not None:
                raise AssertionError(f"the process ended ({self._process.returncode}) before logging {parts}")
            time.sleep(0.02)
        raise AssertionError(f"no log line with {parts}")

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def wait_until_serving(client: httpx.Client, process: subprocess.Popen[str], timeout: float = 30) -> None:
    # Not the "started" log line: the app starts before the server listens.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve ended during start-up"
        with contextlib.suppress(httpx.TransportError):
            if client.get("/healthz").status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError("serve did not start listening in time")


def test_sighup_rereads_the_secret_file_so_the_next_token_request_needs_no_refusal(
    tmp_path: Path, sandbox: tuple[Sandbox, str], log_scan: LogScan
) -> None:
    upstream, sandbox_url = sandbox
    path = secret_file(tmp_path)
    database = tmp_path / "proxy.db"
    key = asyncio.run(issue_keys(proxy_settings(sandbox_url, database), [("alice", "alice", [])]))[
        "alice"
    ].key
    env = subprocess_env(sandbox_url, database, CYNOPSIS_CLIENT_SECRET_FILE=str(path))
    del env["CYNOPSIS_CLIENT_SECRET"]  # the file is the only source
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [COMMAND, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogLines(process)
    rotated = new_secret()
    try:
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=auth, timeout=10) as client:
            wait_until_serving(client, process)
            assert client.post("/v1/liveness/session-token").status_code == 200
            assert (upstream.token_requests, upstream.tokens_issued) == (1, 1)

            write_atomically(path, rotated)
            process.send_signal(signal.SIGHUP)
            line = log.wait_for('"client_secret_reloaded"', '"trigger":"sighup"')
            assert '"changed":true' in line
            assert process.poll() is None  # the signal did not end the process
            # The cached token kept serving: SIGHUP drops nothing but the old secret.
            assert client.post("/v1/liveness/session-token").status_code == 200
            assert upstream.token_requests == 1

            upstream.rotate_client_secret(rotated)
            upstream.revoke_tokens()
            assert client.post("/v1/liveness/session-token").status_code == 200
        # One new token request, with the new secret, and no invalid_client round trip before it.
        assert (upstream.token_requests, upstream.tokens_issued) == (2, 2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    text = log.text()
    log_scan.scan("test_sighup_rereads_the_secret_file", text)
    assert process.returncode == 0, text
    assert '"trigger":"invalid_client"' not in text
    assert_no_secret_in(text, rotated, key)
