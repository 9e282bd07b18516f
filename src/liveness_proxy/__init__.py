"""liveness-proxy: a security-first backend proxy for the Cynopsis Liveness API.

Public API: `create_app(settings)` builds the ASGI app (a standalone server, or mounted inside a
Starlette/FastAPI host with `authenticate_caller` and `running()`); `Settings` holds the
configuration; `Caller` is who calls, as the host's hook reports it; `Unauthenticated` and
`Forbidden` refuse a request from the hook.
"""

__version__ = "0.1.0"

from liveness_proxy.app import ProxyApplication, create_app
from liveness_proxy.auth import ADMIN_SCOPE, Caller, HostAuthentication
from liveness_proxy.errors import Forbidden, Unauthenticated
from liveness_proxy.settings import Settings, settings_from_mapping

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
