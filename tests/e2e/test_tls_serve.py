"""`serve` over TLS: `--ssl-certfile/--ssl-keyfile` or LIVENESS_PROXY_TLS_CERT_FILE/_KEY_FILE, with
certificates made in the test by a throwaway CA (trustme); and a clear refusal to start with files
that cannot serve.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from e2e.test_serve_limits import (
    MAX_HEADER_BYTES,
    SESSION_TOKEN,
    RawConnection,
    assert_refusal,
    limits_env,
    request_head,
    running_serve,
)
from liveness_proxy.cli import EXIT_CONFIGURATION, main
from liveness_proxy.sandbox import Sandbox
from support import ServerThread, subprocess_env, upstream_sandbox


@dataclass
class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1 it issued, as PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    combined_file: Path  # key and certificate chain in one file

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    made = Certificates(
        ca=ca,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "server.pem",
        key_file=tmp_path / "server.key",
        combined_file=tmp_path / "server-with-key.pem",
    )
    ca.cert_pem.write_to_path(str(made.ca_file))
    for index, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(made.cert_file), append=index > 0)
    server.private_key_pem.write_to_path(str(made.key_file))
    server.private_key_and_cert_chain_pem.write_to_path(str(made.combined_file))
    return made


@pytest.fixture
def sandbox_url() -> Iterator[str]:
    upstream: Sandbox = upstream_sandbox()
    server = ServerThread(upstream.app, lifespan="off").start()
    yield server.url
    server.stop()


def assert_plain_http_is_not_served(port: int) -> None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except httpx.TransportError:
        return  # the TLS handshake failed and the connection was dropped: the expected outcome
    assert not response.is_success, response


def test_serve_over_tls_from_the_command_line_with_workers(
    certificates: Certificates, sandbox_url: str, tmp_path: Path
) -> None:
    env = limits_env(sandbox_url, tmp_path)
    tls = certificates.client_context()
    with running_serve(
        env,
        tmp_path,
        "--workers",
        "2",
        "--ssl-certfile",
        str(certificates.cert_file),
        "--ssl-keyfile",
        str(certificates.key_file),
        scheme="https",
        verify=tls,
    ) as serve:
        with httpx.Client(base_url=serve.url, verify=tls, timeout=10) as client:
            health = client.get("/healthz")
            assert health.status_code == 200
            assert health.headers["strict-transport-security"].startswith("max-age=")
            issued = client.post(SESSION_TOKEN, headers=serve.auth)
            assert issued.status_code == 200, issued.text
            assert "strict-transport-security" in issued.headers
        # The certificate is the one given, not something a client would trust by default.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{serve.url}/healthz", timeout=5)
        assert_plain_http_is_not_served(serve.port)
        # The limits hold over TLS too, in each spawned worker (uvicorn pickles the protocol to them).
        slow = RawConnection.open(serve.port, tls=tls)
        assert_refusal(slow.trickle(request_head("GET", "/healthz")), 408, "request-timeout")
        slow.close()
        large = RawConnection.open(serve.port, tls=tls)
        large.send(request_head("GET", "/healthz", "X-Pad: " + "a" * MAX_HEADER_BYTES))
        refused = large.read_response()
        assert_refusal(refused, 431, "request-header-fields-too-large")
        assert "strict-transport-security" in refused.headers
        large.close()


def test_serve_over_tls_from_the_environment(
    certificates: Certificates, sandbox_url: str, tmp_path: Path
) -> None:
    # One file holding key and chain, named by both settings.
    env = subprocess_env(
        sandbox_url,
        tmp_path / "proxy.db",
        LIVENESS_PROXY_TLS_CERT_FILE=str(certificates.combined_file),
        LIVENESS_PROXY_TLS_KEY_FILE=str(certificates.combined_file),
    )
    tls = certificates.client_context()
    with running_serve(env, tmp_path, scheme="https", verify=tls) as serve:
        response = httpx.get(f"{serve.url}/healthz", verify=tls, timeout=10)
        assert response.status_code == 200
        assert "strict-transport-security" in response.headers
        assert_plain_http_is_not_served(serve.port)


# -- refusals -------------------------------------------------------------------------------------


def encrypted_key(certificates: Certificates, folder: Path) -> Path:
    key = serialization.load_pem_private_key(certificates.key_file.read_bytes(), password=None)
    path = folder / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    return path


def other_key(certificates: Certificates, folder: Path) -> Path:
    path = folder / "other.key"
    certificates.ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(path))
    return path


def not_pem(_certificates: Certificates, folder: Path) -> Path:
    path = folder / "not-a-certificate.pem"
    path.write_text("this is not a certificate\n")
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("cli-cert-missing", "--ssl-certfile: the file cannot be read (No such file or directory)"),
        ("env-key-is-a-directory", "LIVENESS_PROXY_TLS_KEY_FILE: the file cannot be read (Is a directory)"),
        (
            "env-key-of-another-certificate",
            "LIVENESS_PROXY_TLS_CERT_FILE, LIVENESS_PROXY_TLS_KEY_FILE: not a PEM certificate and its "
            "matching private key (KEY_VALUES_MISMATCH)",
        ),
        ("cli-key-encrypted", "--ssl-keyfile: the private key is encrypted"),
        ("cli-cert-not-pem", "--ssl-certfile, --ssl-keyfile: not a PEM certificate and its matching"),
        ("cli-cert-without-key", "--ssl-certfile: needs a key too"),
        ("cli-key-without-cert", "--ssl-keyfile: set only together with --ssl-certfile"),
    ],
)
def test_serve_refuses_tls_files_that_cannot_serve(
    case: str,
    expected: str,
    certificates: Certificates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In-process (the refusal comes before uvicorn starts): exit code 2, one line naming the
    setting, never a path or anything read from the files."""
    arguments: list[str] = []
    environment: dict[str, str] = {}
    paths: list[Path] = []
    cert, key = str(certificates.cert_file), str(certificates.key_file)
    if case == "cli-cert-missing":
        paths.append(tmp_path / "missing.pem")
        arguments += ["--ssl-certfile", str(paths[-1]), "--ssl-keyfile", key]
    elif case == "env-key-is-a-directory":
        paths.append(tmp_path)
        environment |= {"LIVENESS_PROXY_TLS_CERT_FILE": cert, "LIVENESS_PROXY_TLS_KEY_FILE": str(tmp_path)}
    elif case == "env-key-of-another-certificate":
        paths.append(other_key(certificates, tmp_path))
        environment |= {"LIVENESS_PROXY_TLS_CERT_FILE": cert, "LIVENESS_PROXY_TLS_KEY_FILE": str(paths[-1])}
    elif case == "cli-key-encrypted":
        paths.append(encrypted_key(certificates, tmp_path))
        arguments += ["--ssl-certfile", cert, "--ssl-keyfile", str(paths[-1])]
    elif case == "cli-cert-not-pem":
        paths.append(not_pem(certificates, tmp_path))
        arguments += ["--ssl-certfile", str(paths[-1]), "--ssl-keyfile", key]
    elif case == "cli-cert-without-key":
        arguments += ["--ssl-certfile", cert]
    else:
        arguments += ["--ssl-keyfile", key]
    env = subprocess_env("http://127.0.0.1:9", tmp_path / "never-created.db", **environment)
    for name in list(os.environ):
        if name.startswith(("CYNOPSIS_", "LIVENESS_PROXY_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout is read

    assert main(["serve", "--port", "1", *arguments]) == EXIT_CONFIGURATION
    stderr = capsys.readouterr().err
    assert stderr.startswith("liveness-proxy: configuration error: ")
    assert stderr.count("\n") == 1
    assert expected in stderr
    assert "BEGIN" not in stderr
    for path in paths:
        assert str(path) not in stderr
    # It stopped before the database was touched.
    assert not (tmp_path / "never-created.db").exists()
