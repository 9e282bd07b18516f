"""liveness-proxy: a security-first backend proxy for the Cynopsis Liveness API.

Public API: `create_app(settings)` builds the ASGI app; `Settings` holds the configuration.
"""

__version__ = "0.1.0"

from liveness_proxy.app import create_app  # noqa: E402  (after __version__, which submodules read)
from liveness_proxy.settings import Settings  # noqa: E402

__all__ = ["Settings", "__version__", "create_app"]
