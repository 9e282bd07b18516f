"""The transport interface every outbound HTTP call goes through, and the small values it exchanges.

In the style of httpx's `_transports/base.py`: a caller (the token fetch, the JWKS fetch, the
liveness client) depends on `HttpTransport` only, so it can be given the real HTTP/1.1 client
(http1.py) or an in-memory one (memory.py) that answers from a function, without a socket.

A `Url` is parsed once, where it is configured: the liveness calls build theirs from parts known in
advance, so the hot path never parses a URL string.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

from liveness_proxy._version import __version__
from liveness_proxy.http.errors import EncodedResponse

USER_AGENT = f"liveness-proxy/{__version__}"

# What a path or query may keep as it is; anything else is percent-encoded once, here.
PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = PATH_SAFE + "?"


@dataclass(frozen=True, slots=True)
class Url:
    """An absolute http(s) URL split once: `origin` ("scheme://host[:port]", what one connection
    pool talks to) and `target` (path and query, safe to send as they are)."""

    origin: str
    target: str

    @classmethod
    def parse(cls, url: str) -> Url:
        """Raises ValueError for anything but an absolute http(s) URL without credentials. The
        fragment is dropped (it is never sent); path and query are percent-encoded where needed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an absolute http(s) URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in a URL are not sent")
        target = quote(parts.path or "/", safe=PATH_SAFE)
        if parts.query:
            target += "?" + quote(parts.query, safe=_QUERY_SAFE)
        return cls(origin=f"{parts.scheme}://{parts.netloc}", target=target)

    def __str__(self) -> str:
        return self.origin + self.target


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as a transport sees it (what an in-memory handler is given)."""

    method: str
    url: Url
    headers: tuple[tuple[str, str], ...]
    body: bytes | None

    def header(self, name: str) -> str | None:
        """The first value of header `name`, compared case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete answer: its body has been read whole and within the caller's limit."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower-case bytes), decoded as latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class HttpTransport(Protocol):
    """Sends one request and returns the whole answer, or raises an `HttpError` (http/errors.py).

    Every implementation: follows no redirect (an `Authorization` header must not travel to a host
    we did not configure, and keys must come from the URL the operator set), uses no proxy from the
    environment, keeps no cookies, asks for and accepts no `Content-Encoding` (`EncodedResponse`),
    refuses a body over `max_body_bytes` (`ResponseTooLarge`, before buffering when the size is
    announced) and is over within `timeout_seconds` (`Timeout`). A non-2xx answer is an answer,
    not an error."""

    async def request(
        self,
        method: str,
        url: Url,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        max_body_bytes: int,
        timeout_seconds: float,
    ) -> HttpResponse: ...

    async def aclose(self) -> None: ...


def refuse_encoded(response: HttpResponse) -> HttpResponse:
    """`response`, unless it carries a `Content-Encoding` other than identity (see HttpTransport)."""
    encoding = response.header(b"content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise EncodedResponse(response.status)
    return response


def system_ssl_context() -> ssl.SSLContext:
    """The system's trust store, verifying certificate and host name: what aiohttp used by default
    (`ssl.create_default_context()`, ALPN offering http/1.1 only), for hosts that are not Cynopsis'
    (the identity provider's JWKS: upstream/tls.py says why a private Cynopsis CA must not vouch
    for it)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
