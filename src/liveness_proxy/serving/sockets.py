"""Listening sockets bound before a server starts, so that a taken port is one clear line."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from liveness_proxy.errors import StartRefused


@contextlib.contextmanager
def listening_socket(host: str, port: int, option: str) -> Iterator[socket.socket]:
    """A socket bound and listening on host:port, closed after the block; StartRefused (one line
    naming the option) when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise StartRefused(f"{option} {port}: {host}:{port} cannot be listened on ({exc.strerror})") from None
    with listener:
        yield listener
