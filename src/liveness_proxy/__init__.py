"""liveness-proxy: a security-first backend proxy for the Cynopsis Liveness API.

Public API: `create_app(settings)` builds the ASGI app (a standalone server, or mounted inside a
Starlette/FastAPI host with `authenticate_caller` and `running()`); `Settings` holds the
configuration; `Caller` is who calls, as the host's hook reports it; `Unauthenticated` and
`Forbidden` refuse a request from the hook.

The names are imported on first use (PEP 562): `import liveness_proxy` or
`import liveness_proxy.errors` must not pull in Starlette, SQLAlchemy and the rest of the app, or
every CLI command and every library user would pay for it (about a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from liveness_proxy._version import __version__

if TYPE_CHECKING:
    from liveness_proxy.app import ProxyApplication, create_app
    from liveness_proxy.auth import ADMIN_SCOPE, Caller, HostAuthentication
    from liveness_proxy.errors import Forbidden, Unauthenticated
    from liveness_proxy.settings import Settings, settings_from_mapping

# Each public name and the module that defines it.
_EXPORTS = {
    "ADMIN_SCOPE": "liveness_proxy.auth",
    "Caller": "liveness_proxy.auth",
    "Forbidden": "liveness_proxy.errors",
    "HostAuthentication": "liveness_proxy.auth",
    "ProxyApplication": "liveness_proxy.app",
    "Settings": "liveness_proxy.settings",
    "Unauthenticated": "liveness_proxy.errors",
    "create_app": "liveness_proxy.app",
    "settings_from_mapping": "liveness_proxy.settings",
}

__all__ = [
    "ADMIN_SCOPE",
    "Caller",
    "Forbidden",
    "HostAuthentication",
    "ProxyApplication",
    "Settings",
    "Unauthenticated",
    "__version__",
    "create_app",
    "settings_from_mapping",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'liveness_proxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, found without this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
