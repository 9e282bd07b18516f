"""TLS towards Cynopsis: one client `ssl.SSLContext` for the token endpoint and the liveness API.

Verification is never optional: the server certificate must chain to a trusted CA and name the host
we connect to, over TLS 1.2 or newer. The trusted CAs are the system's, or, with
`CYNOPSIS_CA_BUNDLE`, only those in that file (a private CA: the public ones are then not trusted
for Cynopsis at all). `CYNOPSIS_CLIENT_CERT_FILE` (and `CYNOPSIS_CLIENT_KEY_FILE`, unless the
certificate file holds the key) add a client certificate for mutual TLS.

The identity provider's JWKS is fetched with the default context instead: its host is the
customer's, with a public certificate, and a private Cynopsis CA must not vouch for it.

How a failed handshake is described in logs is `liveness_proxy.http.errors.describe_tls_failure`.

A file that cannot be read or is not what it should be is a `ConfigurationError` naming the
variable; the message never quotes the file's content (a key file holds a private key).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from liveness_proxy.errors import ConfigurationError

# OpenSSL reason codes are short upper-case identifiers ("KEY_VALUES_MISMATCH"): safe to show.
_REASON_CODE = re.compile(r"[A-Z0-9_]{1,64}")


class _EncryptedKey(Exception):
    """Raised from the password callback: a key that needs a passphrase is refused, never prompted
    for (OpenSSL would otherwise ask on the terminal and block start-up)."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey


def _openssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason
    if isinstance(reason, str) and _REASON_CODE.fullmatch(reason):
        return f" ({reason})"
    return ""


def upstream_ssl_context(
    *,
    ca_bundle: Path | None = None,
    client_cert_file: Path | None = None,
    client_key_file: Path | None = None,
) -> ssl.SSLContext:
    """The verifying client context; see the module docstring. Raises ConfigurationError."""
    try:
        context = ssl.create_default_context(cafile=None if ca_bundle is None else str(ca_bundle))
    except OSError as exc:  # ssl.SSLError is an OSError too: check the more specific one first
        if isinstance(exc, ssl.SSLError):
            raise ConfigurationError(
                f"CYNOPSIS_CA_BUNDLE: not a PEM file of CA certificates{_openssl_reason(exc)}"
            ) from None
        raise ConfigurationError(f"CYNOPSIS_CA_BUNDLE: cannot read the file ({exc.strerror})") from None
    # create_default_context already sets these; stated here so that no later default can weaken them.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert_file is not None:
        _load_client_certificate(context, client_cert_file, client_key_file)
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    # Which file is at fault, where that can be told: each must at least be readable.
    for variable, path in (("CYNOPSIS_CLIENT_CERT_FILE", cert_file), ("CYNOPSIS_CLIENT_KEY_FILE", key_file)):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigurationError(f"{variable}: cannot read the file ({exc.strerror})") from None
    key_variable = "CYNOPSIS_CLIENT_KEY_FILE" if key_file is not None else "CYNOPSIS_CLIENT_CERT_FILE"
    try:
        context.load_cert_chain(
            str(cert_file), None if key_file is None else str(key_file), password=_refuse_passphrase
        )
    except _EncryptedKey:
        raise ConfigurationError(
            f"{key_variable}: the private key is encrypted; give it unencrypted (file permissions "
            "protect it, as for every other secret file)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigurationError(
                f"{key_variable}: the private key does not belong to the certificate in "
                "CYNOPSIS_CLIENT_CERT_FILE"
            ) from None
        raise ConfigurationError(
            "CYNOPSIS_CLIENT_CERT_FILE: not a PEM certificate with its private key "
            f"(in CYNOPSIS_CLIENT_KEY_FILE or the same file){_openssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"CYNOPSIS_CLIENT_CERT_FILE: cannot read the certificate or key ({exc.strerror})"
        ) from None
