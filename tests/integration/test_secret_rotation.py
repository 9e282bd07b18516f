"""Rotating the Cynopsis client secret without a restart: CYNOPSIS_CLIENT_SECRET_FILE is read again
when the token endpoint answers `invalid_client`, and on SIGHUP in the running app; the value never
reaches a log (the `serve` subprocess on SIGHUP: e2e/test_secret_rotation.py)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from liveness_proxy.app import create_app
from liveness_proxy.errors import TokenUnavailable
from liveness_proxy.http import Http1Transport, HttpTransport
from liveness_proxy.sandbox import ManualClock, Sandbox
from liveness_proxy.serving.process import served
from liveness_proxy.upstream import (
    ClientCredentialsFetcher,
    ClientSecretSource,
    TokenEndpointError,
    TokenManager,
)
from rotation import assert_no_secret_in, new_secret, secret_file, served_sandbox, write_atomically
from support import (
    CLIENT_ID,
    CLIENT_SECRET,
    ProxyHarness,
    proxy_settings,
)


@pytest.fixture
def sandbox() -> Iterator[tuple[Sandbox, str]]:
    with served_sandbox() as pair:
        yield pair


# -- the token request ----------------------------------------------------------------------------------


def reloading_fetcher(http: HttpTransport, url: str, source: ClientSecretSource) -> ClientCredentialsFetcher:
    """The token request of the sandbox at `url`, with the secret from `source` (re-read on refusal)."""
    return ClientCredentialsFetcher(
        http,
        token_url=f"{url}/oauth/token",
        client_id=CLIENT_ID,
        client_secret=source.current,
        default_lifetime_seconds=300,
        max_lifetime_seconds=3600,
        timeout_seconds=2,
        reload_client_secret=source.reload,
    )


async def test_invalid_client_rereads_the_file_and_retries_once_only_when_the_secret_changed(
    tmp_path: Path, sandbox: tuple[Sandbox, str]
) -> None:
    upstream, url = sandbox
    path = secret_file(tmp_path)
    source = ClientSecretSource(CLIENT_SECRET, path=path)
    http = Http1Transport(max_connections=4, connect_timeout_seconds=1)
    fetcher = reloading_fetcher(http, url, source)
    try:
        # Cynopsis rotated, the file not yet: refused, the file read once, nothing sent again.
        rotated = new_secret()
        upstream.rotate_client_secret(rotated)
        with pytest.raises(TokenEndpointError, match=r"HTTP 401 \(invalid_client\)"):
            await fetcher.fetch()
        assert (upstream.token_requests, upstream.tokens_issued, source.reloads) == (1, 0, 1)

        # The file caught up: the first request is refused, the second (new secret) succeeds at once.
        write_atomically(path, rotated)
        await fetcher.fetch()
        assert (upstream.token_requests, upstream.tokens_issued, source.reloads) == (3, 1, 2)
        await fetcher.fetch()  # and from then on, one request
        assert (upstream.token_requests, upstream.tokens_issued, source.reloads) == (4, 2, 2)

        # A new secret that is refused too is sent once, not in a loop.
        upstream.rotate_client_secret(new_secret())
        write_atomically(path, new_secret())
        with pytest.raises(TokenEndpointError, match="invalid_client"):
            await fetcher.fetch()
        assert (upstream.token_requests, upstream.tokens_issued, source.reloads) == (6, 2, 3)
    finally:
        await http.aclose()


async def test_an_endpoint_that_refuses_every_secret_costs_one_file_read_per_failure_backoff(
    tmp_path: Path, sandbox: tuple[Sandbox, str]
) -> None:
    upstream, url = sandbox
    upstream.rotate_client_secret(new_secret())  # nothing we have will do
    source = ClientSecretSource(CLIENT_SECRET, path=secret_file(tmp_path))
    http = Http1Transport(max_connections=4, connect_timeout_seconds=1)
    clock = ManualClock()
    tokens = TokenManager(
        reloading_fetcher(http, url, source),
        refresh_margin=lambda lifetime: lifetime / 10,
        failure_backoff_seconds=5,
        clock=clock.now,
    )
    try:
        for _ in range(50):  # callers arriving during the backoff are answered without a request
            with pytest.raises(TokenUnavailable):
                await tokens.get()
        assert (upstream.token_requests, source.reloads) == (1, 1)
        clock.advance(5)
        with pytest.raises(TokenUnavailable):
            await tokens.get()  # after the backoff: one attempt, in the background
        deadline = time.monotonic() + 5
        while upstream.token_requests < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert (upstream.token_requests, source.reloads) == (2, 2)
    finally:
        await tokens.close()
        await http.aclose()


# -- a proxy under load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    started: float
    status: int


class Load:
    """A few caller threads polling a session's result through the proxy, each outcome recorded."""

    def __init__(self, url: str, key: str, session_id: str, *, threads: int = 4) -> None:
        self._url = url
        self._headers = {"Authorization": f"Bearer {key}"}
        self._path = f"/v1/liveness/sessions/{session_id}/result"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, headers=self._headers, timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.get(self._path).status_code
                except httpx.TransportError:
                    status = 0
                with self._lock:
                    self.outcomes.append(Outcome(started, status))
                time.sleep(0.005)  # steady, not saturating: a 2-core CI runner runs everything else too

    def wait_for(self, count: int, *, since: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = sum(1 for outcome in self.outcomes if outcome.started >= since)
            if done >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} requests completed in {timeout} s")


@pytest.mark.served
def test_rotating_the_secret_under_load_fails_no_caller_request(
    tmp_path: Path, make_proxy: Callable[..., AbstractContextManager[ProxyHarness]]
) -> None:
    path = secret_file(tmp_path)
    rotated = new_secret()
    with make_proxy(proxy_overrides={"CYNOPSIS_CLIENT_SECRET_FILE": path}) as proxy:
        with proxy.client() as client:
            session_id = proxy.create_session(client)
        control = httpx.Client(base_url=proxy.sandbox_url, timeout=10)
        with Load(proxy.url, proxy.keys.alice, session_id) as load:
            load.wait_for(40, since=0)
            before = proxy.sandbox.stats()
            # The order a careful operator follows: the new secret into every replica's file first,
            # then at Cynopsis. Both sides hold the new secret once the last step returns; revoking
            # the tokens makes the proxy fetch a new one at once instead of when its token is due.
            write_atomically(path, rotated)
            assert control.post("/_sandbox/client-secret", json={"client_secret": rotated}).status_code == 204
            assert control.post("/_sandbox/tokens/revoke").status_code in (200, 204)
            completed = time.monotonic()
            load.wait_for(200, since=completed)
        after = proxy.sandbox.stats()
        control.close()
        log = proxy.log_text()

    failed_after = [o.status for o in load.outcomes if o.started >= completed and o.status != 200]
    failed_before = [o.status for o in load.outcomes if o.started < completed and o.status != 200]
    assert failed_after == [], f"{len(failed_after)} failed after the rotation completed: {failed_after[:10]}"
    # Stronger than asked, and what this order of steps gives: nothing failed during it either.
    assert failed_before == [], f"{len(failed_before)} failed during the rotation: {failed_before[:10]}"
    # A new token was issued after the rotation, so with the new secret, after exactly one refusal
    # (the old secret, still in memory), retried at once rather than after a failure backoff.
    assert after["tokens_issued"] == before["tokens_issued"] + 1
    assert after["token_requests"] == before["token_requests"] + 2
    assert '"client_secret_reloaded"' in log
    assert '"trigger":"invalid_client"' in log
    assert '"changed":true' in log
    assert_no_secret_in(log, rotated)


# -- SIGHUP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_file", [True, False])
async def test_the_app_rereads_the_secret_on_sighup_while_it_runs_and_restores_the_handler_after(
    tmp_path: Path, from_file: bool
) -> None:
    # A handler of the test's own: should the app fail to install its handler, SIGHUP must not end
    # the test run (the default action ends the process).
    received: list[int] = []
    original = signal.signal(signal.SIGHUP, lambda signum, _frame: received.append(signum))
    guard = signal.getsignal(signal.SIGHUP)
    path = secret_file(tmp_path)
    overrides = {"CYNOPSIS_CLIENT_SECRET_FILE": path} if from_file else {}
    settings = proxy_settings("http://127.0.0.1:9", tmp_path / "proxy.db", **overrides)
    log = io.StringIO()
    app = create_app(settings, log_stream=log, migrate=True)
    rotated = new_secret()
    try:
        async with served(app):
            runtime = app.service
            write_atomically(path, rotated)
            os.kill(os.getpid(), signal.SIGHUP)
            event = "client_secret_reloaded" if from_file else "client_secret_not_reloaded"
            for _ in range(500):
                if event in log.getvalue():
                    break
                await asyncio.sleep(0.01)
            assert runtime.client_secret.current() == (rotated if from_file else CLIENT_SECRET)
        assert received == []  # the app's handler had it, not the guard
        assert signal.getsignal(signal.SIGHUP) is guard  # and gave the signal back at shutdown
    finally:
        signal.signal(signal.SIGHUP, original)
    text = log.getvalue()
    if from_file:
        assert '"trigger":"sighup"' in text
        assert '"changed":true' in text
    else:
        assert "CYNOPSIS_CLIENT_SECRET is not read from a file" in text
    assert_no_secret_in(text, rotated)
