"""liveness-proxy: a security-first backend proxy for the Cynopsis Liveness API.

Public API: `create_app(settings)` builds the ASGI app; `Settings` holds the configuration.
"""

__version__ = "0.1.0"

from liveness_proxy.app import create_app
from liveness_proxy.settings import Settings

__all__ = ["Settings", "__version__", "create_app"]
