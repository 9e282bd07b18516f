"""Forwarded headers from trusted peers, and a note of that trust for tracing.

uvicorn's own `ProxyHeadersMiddleware` still does the work (`X-Forwarded-For`, `-Proto` from the
addresses in `FORWARDED_ALLOW_IPS`, loopback by default), exactly as before; `serve` turns
uvicorn's built-in copy off and wraps the app in this instead, because once the client address is
rewritten nobody can tell any more whether the socket's peer was a trusted forwarder. Tracing
needs that answer: only a trusted peer may continue its `traceparent` (tracing/server.py).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware, _TrustedHosts

from liveness_proxy.tracing import FORWARDER_TRUSTED


class TrustedForwarders:
    def __init__(self, app: ASGIApp, trusted_hosts: str) -> None:
        self._trusted = _TrustedHosts(trusted_hosts)
        self._proxy_headers = ProxyHeadersMiddleware(app, trusted_hosts)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            scope[FORWARDER_TRUSTED] = client is not None and str(client[0]) in self._trusted
        await self._proxy_headers(scope, receive, send)  # type: ignore[arg-type]
