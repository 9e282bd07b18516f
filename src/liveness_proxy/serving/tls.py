"""The server certificate `serve` uses: which files, and a check that they can serve before start."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from liveness_proxy.errors import ConfigurationError
from liveness_proxy.wiring import ServeOptions


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A server certificate (chain) and its key, each with the name the operator set it by."""

    cert_file: Path
    key_file: Path
    cert_name: str
    key_name: str


def tls_files(options: ServeOptions, cli_cert: str | None, cli_key: str | None) -> TlsFiles | None:
    """The certificate and key `serve` uses: `--ssl-certfile`/`--ssl-keyfile` override the settings
    one by one; None when neither is set. ConfigurationError when only one of the pair is."""
    cert_name, cert = (
        ("--ssl-certfile", Path(cli_cert))
        if cli_cert
        else ("LIVENESS_PROXY_TLS_CERT_FILE", options.tls_cert_file)
    )
    key_name, key = (
        ("--ssl-keyfile", Path(cli_key)) if cli_key else ("LIVENESS_PROXY_TLS_KEY_FILE", options.tls_key_file)
    )
    if cert is None and key is None:
        return None
    if cert is None:
        raise ConfigurationError(
            f"{key_name}: set only together with --ssl-certfile or LIVENESS_PROXY_TLS_CERT_FILE"
        )
    if key is None:
        raise ConfigurationError(
            f"{cert_name}: needs a key too (--ssl-keyfile or LIVENESS_PROXY_TLS_KEY_FILE; "
            "the same path if the certificate file holds the key)"
        )
    return TlsFiles(cert_file=cert, key_file=key, cert_name=cert_name, key_name=key_name)


def check_tls_files(files: TlsFiles) -> None:
    """Loads the pair once, so that a wrong file stops `serve` with a message naming the setting
    (uvicorn would fail in each worker with OpenSSL's text). Never shows file contents or paths."""
    for path, name in ((files.cert_file, files.cert_name), (files.key_file, files.key_name)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigurationError(f"{name}: the file cannot be read ({reason})") from None
    asked_for_password = False

    def no_password() -> bytes:
        # An encrypted key would make OpenSSL prompt on the terminal; a server has nobody to ask.
        nonlocal asked_for_password
        asked_for_password = True
        return b""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert_file, files.key_file, password=no_password)
    except ssl.SSLError as exc:
        if asked_for_password:
            raise ConfigurationError(
                f"{files.key_name}: the private key is encrypted; give it unencrypted (file mode 0600)"
            ) from None
        raise ConfigurationError(
            f"{files.cert_name}, {files.key_name}: not a PEM certificate and its matching private key "
            f"({exc.reason or 'unreadable'})"
        ) from None
