"""Serving the proxy as a process: uvicorn with our protocol subclass (`protocol`), TLS (`tls`), the
GC tuning and signals (`process`), all built around the app's `running()` (`server`).

A library user who mounts the app in a host of their own needs none of this.
"""

from liveness_proxy.serving.protocol import LimitedHttpToolsProtocol, ServeLimits, protocol_class
from liveness_proxy.serving.server import serve, uvicorn_options
from liveness_proxy.serving.tls import TlsFiles, check_tls_files, tls_files

__all__ = [
    "LimitedHttpToolsProtocol",
    "ServeLimits",
    "TlsFiles",
    "check_tls_files",
    "protocol_class",
    "serve",
    "tls_files",
    "uvicorn_options",
]
