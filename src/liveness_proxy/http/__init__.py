"""All outbound HTTP: the token endpoint, the identity provider's JWKS and the three liveness calls.

    base.py       the `HttpTransport` interface, `Url`, `HttpRequest`, `HttpResponse`, `USER_AGENT`
    http1.py      `Http1Pool` (keep-alive connections to one origin) and `Http1Transport` (a pool per
                  origin): the real client, on httptools
    memory.py     `MemoryTransport`: answers from a function, for tests without a socket
    errors.py     the errors below
    problems.py   the one table from these errors to the API problems of the liveness calls

The errors (http/errors.py); none of them is an API problem:

    HttpError
    ├── ConnectError              no exchange took place: refused, unreachable, name not resolved,
    │   │                         connect timeout, a header we refuse to send, the transport closed
    │   └── TlsError              the TLS handshake failed (`.description` is log-safe)
    ├── ExchangeError             the exchange failed after connecting: the request may have arrived
    │   ├── ConnectionClosed      reset, or closed before the answer was complete (or a TLS alert)
    │   └── MalformedResponse     not HTTP/1.1 as we accept it: garbage, a protocol switch, two answers
    │       └── EncodedResponse   a Content-Encoding we did not ask for (`.status`)
    ├── ResponseTooLarge          headers or body over the limits (`.status`)
    └── Timeout                   the whole exchange over its time; also a `TimeoutError`

Every transport follows no redirect, uses no proxy from the environment, keeps no cookies and sends
`Accept-Encoding: identity`; see base.py.
"""

from liveness_proxy.http.base import USER_AGENT, HttpRequest, HttpResponse, HttpTransport, Url
from liveness_proxy.http.errors import (
    ConnectError,
    ConnectionClosed,
    EncodedResponse,
    ExchangeError,
    HttpError,
    MalformedResponse,
    ResponseTooLarge,
    Timeout,
    TlsError,
)
from liveness_proxy.http.http1 import Http1Pool, Http1Transport
from liveness_proxy.http.memory import MemoryTransport

__all__ = [
    "USER_AGENT",
    "ConnectError",
    "ConnectionClosed",
    "EncodedResponse",
    "ExchangeError",
    "Http1Pool",
    "Http1Transport",
    "HttpError",
    "HttpRequest",
    "HttpResponse",
    "HttpTransport",
    "MalformedResponse",
    "MemoryTransport",
    "ResponseTooLarge",
    "Timeout",
    "TlsError",
    "Url",
]
