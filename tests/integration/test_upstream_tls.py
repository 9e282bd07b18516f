"""TLS towards Cynopsis: the sandbox served over HTTPS with certificates made by `trustme`.

The token endpoint and the liveness API are verified with one context (CYNOPSIS_CA_BUNDLE or the
system's CAs), present a client certificate when one is configured (mTLS), and a failed
verification is refused, answered as 503/502 and logged as what it is, without any secret."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from liveness_proxy.app import create_app
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.http import ConnectError, Http1Pool
from liveness_proxy.sandbox import Sandbox
from liveness_proxy.upstream import upstream_ssl_context
from support import (
    CLIENT_SECRET,
    LogScan,
    ServerThread,
    find_leaks,
    issue_keys,
    proxy_settings,
    upstream_sandbox,
)


@dataclass(frozen=True)
class Pki:
    """A private CA and what it issued, as PEM files."""

    folder: Path
    ca: trustme.CA

    @property
    def ca_bundle(self) -> Path:
        return self.folder / "ca.pem"

    def issue(self, name: str, *hosts: str) -> tuple[Path, Path]:
        """A certificate for `hosts` (server and client use) and its key: (cert file, key file)."""
        issued = self.ca.issue_cert(*hosts)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        for blob in issued.cert_chain_pems:
            with cert.open("ab") as file:
                file.write(blob.bytes())
        issued.private_key_pem.write_to_path(str(key))
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Pki(folder, ca)


@dataclass
class TlsProxy:
    url: str
    key: str
    sandbox: Sandbox
    log: io.StringIO

    def session_token(self) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return client.post("/v1/liveness/session-token", headers={"Authorization": f"Bearer {self.key}"})

    def flow(self) -> None:
        """Session token, session, result: every liveness call, after one token request."""
        auth = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=auth, timeout=10) as client:
            token = client.post("/v1/liveness/session-token")
            assert token.status_code == 200, token.text
            created = client.post(
                "/v1/liveness/sessions", json={"session_token": token.json()["session_token"]}
            )
            assert created.status_code == 201, created.text
            result = client.get(f"/v1/liveness/sessions/{created.json()['session_id']}/result")
            assert result.status_code == 200, result.text


@contextlib.contextmanager
def tls_proxy(
    tmp_path: Path,
    log_scan: LogScan,
    *,
    server_cert: tuple[Path, Path],
    client_ca: Path | None = None,
    plain_token_endpoint: bool = False,
    **overrides: Any,
) -> Iterator[TlsProxy]:
    """A sandbox over HTTPS (asking for a client certificate signed by `client_ca`, if given) and a
    proxy in front of it. With `plain_token_endpoint` the same sandbox also serves plain http on
    loopback for the token endpoint only: the proxy then holds a token whatever its TLS does, and
    only the liveness calls go over TLS."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sandbox = upstream_sandbox()
    servers: list[ServerThread] = []
    log = io.StringIO()
    try:
        secure = ServerThread(
            sandbox.app,
            lifespan="off",
            ssl_certfile=server_cert[0],
            ssl_keyfile=server_cert[1],
            ssl_ca_certs=client_ca,
            require_client_certificate=client_ca is not None,
        ).start()
        servers.append(secure)
        token_origin = secure.url
        if plain_token_endpoint:
            plain = ServerThread(sandbox.app, lifespan="off").start()
            servers.append(plain)
            token_origin = plain.url
        database = tmp_path / "proxy.db"
        settings = proxy_settings(
            secure.url,
            database,
            CYNOPSIS_TOKEN_URL=f"{token_origin}/oauth/token",
            # A TLS handshake on a loaded 2-core runner: more room than the plain-http default.
            CYNOPSIS_CONNECT_TIMEOUT_SECONDS=3,
            CYNOPSIS_TOKEN_TIMEOUT_SECONDS=3,
            CYNOPSIS_TIMEOUT_SECONDS=5,
            **overrides,
        )
        key = asyncio.run(issue_keys(settings, [("alice", "alice", [])]))["alice"].key
        servers.append(ServerThread(create_app(settings, log_stream=log)).start())
        yield TlsProxy(url=servers[-1].url, key=key, sandbox=sandbox, log=log)
    finally:
        for server in reversed(servers):
            server.stop()
    log_scan.scan("test_upstream_tls", log.getvalue())


def assert_refused(answer: httpx.Response, status: int, slug: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["type"].endswith(slug)
    assert answer.json()["request_id"]


def assert_clean(log: str) -> None:
    assert find_leaks(log) == []
    assert CLIENT_SECRET not in log


# -- the full flow -----------------------------------------------------------------------------------


def test_the_flow_works_over_tls_verified_with_the_configured_ca_bundle(
    tmp_path: Path, pki: Pki, log_scan: LogScan
) -> None:
    with tls_proxy(
        tmp_path, log_scan, server_cert=pki.issue("server", "127.0.0.1"), CYNOPSIS_CA_BUNDLE=pki.ca_bundle
    ) as proxy:
        proxy.flow()
        assert proxy.sandbox.stats()["tokens_issued"] == 1
        assert len(proxy.sandbox.request_log) == 4  # the token request and three liveness calls
    assert "upstream_tls_failed" not in proxy.log.getvalue()


def test_without_the_bundle_the_private_ca_is_not_trusted_for_the_token_or_the_liveness_calls(
    tmp_path: Path, pki: Pki, log_scan: LogScan
) -> None:
    server_cert = pki.issue("server", "127.0.0.1")
    # The token endpoint over TLS: no token, so 503, and the reason in the log.
    with tls_proxy(tmp_path / "token", log_scan, server_cert=server_cert) as proxy:
        assert_refused(proxy.session_token(), 503, "upstream-token-unavailable")
        assert proxy.sandbox.stats()["token_requests"] == 0  # refused before any request was sent
        log = proxy.log.getvalue()
    assert '"upstream_token_failed"' in log
    assert "token endpoint TLS verification failed (unable to get local issuer certificate)" in log
    assert_clean(log)

    # A token in hand (its endpoint on plain loopback), the liveness call over TLS: 502.
    with tls_proxy(tmp_path / "api", log_scan, server_cert=server_cert, plain_token_endpoint=True) as proxy:
        assert_refused(proxy.session_token(), 502, "upstream-unavailable")
        assert proxy.sandbox.stats()["tokens_issued"] == 1
        assert [record.raw_path for record in proxy.sandbox.request_log] == ["/oauth/token"]
        log = proxy.log.getvalue()
    assert '"upstream_tls_failed"' in log
    assert "TLS verification failed (unable to get local issuer certificate)" in log
    assert_clean(log)


def test_a_certificate_for_another_host_is_refused_even_from_the_trusted_ca(
    tmp_path: Path, pki: Pki, log_scan: LogScan
) -> None:
    server_cert = pki.issue("elsewhere", "cynopsis.example", "10.9.8.7")
    with tls_proxy(
        tmp_path / "token", log_scan, server_cert=server_cert, CYNOPSIS_CA_BUNDLE=pki.ca_bundle
    ) as proxy:
        assert_refused(proxy.session_token(), 503, "upstream-token-unavailable")
        token_log = proxy.log.getvalue()
    with tls_proxy(
        tmp_path / "api",
        log_scan,
        server_cert=server_cert,
        plain_token_endpoint=True,
        CYNOPSIS_CA_BUNDLE=pki.ca_bundle,
    ) as proxy:
        assert_refused(proxy.session_token(), 502, "upstream-unavailable")
        api_log = proxy.log.getvalue()
    for log in (token_log, api_log):
        assert "TLS verification failed (IP address mismatch, certificate is not valid for '127.0.0.1'" in log
        assert_clean(log)


def test_mutual_tls_presents_the_configured_client_certificate(
    tmp_path: Path, pki: Pki, log_scan: LogScan
) -> None:
    server_cert = pki.issue("server", "127.0.0.1")
    client_cert, client_key = pki.issue("client", "liveness-proxy.client.example")
    with tls_proxy(
        tmp_path / "with",
        log_scan,
        server_cert=server_cert,
        client_ca=pki.ca_bundle,
        CYNOPSIS_CA_BUNDLE=pki.ca_bundle,
        CYNOPSIS_CLIENT_CERT_FILE=client_cert,
        CYNOPSIS_CLIENT_KEY_FILE=client_key,
    ) as proxy:
        proxy.flow()
        assert proxy.sandbox.stats()["tokens_issued"] == 1

    # Without a client certificate the server refuses both the token endpoint and the API.
    with tls_proxy(
        tmp_path / "without",
        log_scan,
        server_cert=server_cert,
        client_ca=pki.ca_bundle,
        CYNOPSIS_CA_BUNDLE=pki.ca_bundle,
    ) as proxy:
        assert_refused(proxy.session_token(), 503, "upstream-token-unavailable")
        assert proxy.sandbox.stats()["token_requests"] == 0
    with tls_proxy(
        tmp_path / "without-api",
        log_scan,
        server_cert=server_cert,
        client_ca=pki.ca_bundle,
        plain_token_endpoint=True,
        CYNOPSIS_CA_BUNDLE=pki.ca_bundle,
    ) as proxy:
        assert_refused(proxy.session_token(), 502, "upstream-unavailable")
        assert [record.raw_path for record in proxy.sandbox.request_log] == ["/oauth/token"]


# -- the context and its files -------------------------------------------------------------------------


def test_bad_tls_files_stop_start_up_naming_the_variable_never_the_content(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.issue("client", "client.example")
    _, other_key = pki.issue("other", "other.example")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(f"{CLIENT_SECRET}\n")
    encrypted = tmp_path / "encrypted.key"
    private_key = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    missing = tmp_path / "missing.pem"
    cases: list[tuple[dict[str, Path], str]] = [
        ({"ca_bundle": missing}, "CYNOPSIS_CA_BUNDLE: cannot read the file (No such file or directory)"),
        ({"ca_bundle": garbage}, "CYNOPSIS_CA_BUNDLE: not a PEM file of CA certificates"),
        ({"client_cert_file": missing, "client_key_file": key}, "CYNOPSIS_CLIENT_CERT_FILE: cannot read"),
        ({"client_cert_file": cert, "client_key_file": missing}, "CYNOPSIS_CLIENT_KEY_FILE: cannot read"),
        ({"client_cert_file": garbage, "client_key_file": key}, "CYNOPSIS_CLIENT_CERT_FILE: not a PEM"),
        ({"client_cert_file": cert}, "CYNOPSIS_CLIENT_CERT_FILE: not a PEM certificate with its private key"),
        ({"client_cert_file": cert, "client_key_file": other_key}, "does not belong to the certificate"),
        ({"client_cert_file": cert, "client_key_file": encrypted}, "the private key is encrypted"),
    ]
    for files, message in cases:
        with pytest.raises(ConfigurationError, match=re.escape(message)) as refused:
            upstream_ssl_context(**files)
        assert CLIENT_SECRET not in str(refused.value)
        assert "PRIVATE KEY" not in str(refused.value)
    # What works: the key beside the certificate, or in the same file.
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    for files in ({"client_cert_file": cert, "client_key_file": key}, {"client_cert_file": both}):
        context = upstream_ssl_context(ca_bundle=pki.ca_bundle, **files)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_the_app_does_not_start_with_an_unreadable_ca_bundle(tmp_path: Path) -> None:
    settings = proxy_settings(
        "https://127.0.0.1:9", tmp_path / "proxy.db", CYNOPSIS_CA_BUNDLE=tmp_path / "absent.pem"
    )
    app = create_app(settings, log_stream=io.StringIO())
    with pytest.raises(ConfigurationError, match="CYNOPSIS_CA_BUNDLE: cannot read the file"):
        async with app.router.lifespan_context(app):
            pass


# -- the liveness client's handshake -------------------------------------------------------------------


async def test_the_handshake_is_bounded_by_the_connect_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts the connection, never answers the ClientHello

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(f"https://127.0.0.1:{port}", max_connections=1, connect_timeout_seconds=0.2)
    started = time.monotonic()
    try:
        # The exchange's own deadline is far away: a handshake that waited for it would end in
        # TimeoutError, not in a connect error.
        with pytest.raises(ConnectError):
            await pool.request("GET", "/", [], None, max_body_bytes=1024, timeout_seconds=20)
    finally:
        await pool.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the TLS server never saw the connection"
    assert time.monotonic() - started < 15


async def test_the_liveness_client_sends_the_host_name_for_sni_and_checks_it(pki: Pki) -> None:
    cert, key = pki.issue("localhost", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_context.sni_callback = lambda _socket, name, _context: names.append(name)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    failures: list[str] = []
    verifying = upstream_ssl_context(ca_bundle=pki.ca_bundle)
    try:
        pool = Http1Pool(
            f"https://localhost:{port}", max_connections=1, connect_timeout_seconds=3, ssl_context=verifying
        )
        response = await pool.request("GET", "/", [], None, max_body_bytes=1024, timeout_seconds=5)
        await pool.close()
        assert response.status == 200
        assert "localhost" in names
        # The same server reached by its address: the certificate does not name it.
        pool = Http1Pool(
            f"https://127.0.0.1:{port}",
            max_connections=1,
            connect_timeout_seconds=3,
            ssl_context=verifying,
            on_tls_failure=failures.append,
        )
        with pytest.raises(ConnectError, match="TLS verification failed"):
            await pool.request("GET", "/", [], None, max_body_bytes=1024, timeout_seconds=5)
        await pool.close()
    finally:
        server.close()
        await server.wait_closed()
    assert failures == [
        "TLS verification failed (IP address mismatch, certificate is not valid for '127.0.0.1'.)"
    ]
