"""What an outbound HTTP exchange can fail with; the tree is in the package docstring (http/__init__.py).

These errors say what happened on the wire and nothing about the API: a caller turns them into its
own errors (`TokenEndpointError`, `JwksError`), or, for the liveness calls, into API problems through
the one table in http/problems.py. Messages are log-safe: they never quote what the peer sent.
"""

from __future__ import annotations

import re
import ssl

# OpenSSL reason codes are short upper-case identifiers ("KEY_VALUES_MISMATCH"): safe to show.
_REASON_CODE = re.compile(r"[A-Z0-9_]{1,64}")
# What an OpenSSL verification message may contain once it reaches a log line: printable ASCII.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_REASON_LENGTH = 200


class HttpError(Exception):
    """Base of every outbound HTTP error."""


class ConnectError(HttpError):
    """No exchange took place: the request was not sent (refused, unreachable, name not resolved,
    connect timeout, a header we refuse to send, the transport closed)."""


class TlsError(ConnectError):
    """The TLS handshake failed: an untrusted certificate, a wrong host name, no common protocol.
    `description` is log-safe (see `describe_tls_failure`)."""

    def __init__(self, description: str) -> None:
        super().__init__(f"cannot connect to the upstream: {description}")
        self.description = description


class ExchangeError(HttpError):
    """The exchange failed after the connection was made: the request may have been received."""


class ConnectionClosed(ExchangeError):
    """The peer reset or closed the connection before the answer was complete (a TLS alert after the
    handshake, e.g. a refused client certificate under TLS 1.3, looks like this too)."""


class MalformedResponse(ExchangeError):
    """The answer is not HTTP/1.1 as we accept it: garbage, a protocol switch, two answers."""


class EncodedResponse(MalformedResponse):
    """A complete answer with a `Content-Encoding` we did not ask for (we send `identity` only:
    decoding an unasked-for encoding is where size bombs hide)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"encoded response (HTTP {status})")
        self.status = status


class ResponseTooLarge(HttpError):
    """The answer's headers or body exceed the limits (a body announced as larger than the limit is
    refused before any of it is buffered)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"response too large (HTTP {status})")
        self.status = status


class Timeout(HttpError, TimeoutError):
    """The whole exchange (waiting for a connection, connecting, sending, receiving) was not over in
    its time. Also a `TimeoutError`, so code that bounds its own waits catches both alike."""


def describe_tls_failure(exc: ssl.SSLError) -> str:
    """A log-safe description of a failed handshake: "TLS verification failed (...)" for a server
    certificate we do not trust (with OpenSSL's verification message: an untrusted issuer, a
    hostname mismatch, an expired certificate), "TLS handshake failed (...)" otherwise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message if isinstance(exc.verify_message, str) else ""
        message = _UNPRINTABLE.sub("?", message)[:_MAX_REASON_LENGTH]
        return f"TLS verification failed ({message or 'certificate not trusted'})"
    reason = exc.reason if isinstance(exc.reason, str) and _REASON_CODE.fullmatch(exc.reason) else None
    return f"TLS handshake failed ({reason or type(exc).__name__})"
