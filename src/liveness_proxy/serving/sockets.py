"""The sockets a server will listen on, bound before it starts, so that a taken port or an unknown
host is one clear line, and nothing (no migration, no service) runs first.

Bound but not yet listening: until the server starts listening on them, connection attempts are
refused, not queued, so a client or a TCP health check never reaches a port whose app cannot answer
yet. Every address the host resolves to is bound, IPv6 ones with IPV6_V6ONLY as asyncio binds them,
so `::` means IPv6 only and `localhost` means both loopbacks, as with uvicorn binding by itself.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from liveness_proxy.errors import StartRefused


def display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def bound_sockets(host: str, port: int, option: str) -> Iterator[list[socket.socket]]:
    """One socket per address of host:port, bound (not listening), closed after the block.
    StartRefused (naming the option) when the host does not resolve or an address cannot be had."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, OverflowError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise StartRefused(f"--host {host}: cannot be resolved ({reason})") from None
    seen: set[tuple[int, object]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in addresses:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            listener = socket.socket(family, kind, protocol)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                listener.bind(address)
            except OSError as exc:
                raise StartRefused(
                    f"{option} {port}: {display(str(address[0]), port)} cannot be bound ({exc.strerror})"
                ) from None
        yield sockets
    finally:
        for listener in sockets:
            listener.close()
