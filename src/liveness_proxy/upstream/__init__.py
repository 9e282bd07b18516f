"""The Cynopsis side: the OAuth token request, access-token management and the three liveness calls.

The HTTP they go over is liveness_proxy/http/.
"""

from liveness_proxy.upstream.client import CynopsisClient, CynopsisEndpoints, ShapedResult, UpstreamResult
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.upstream.oauth import ClientCredentialsFetcher, FetchedToken, TokenEndpointError
from liveness_proxy.upstream.single_flight import SingleFlight
from liveness_proxy.upstream.tls import upstream_ssl_context
from liveness_proxy.upstream.token_store import (
    DatabaseTokenStore,
    RedisTokenStore,
    SharedStateUnavailable,
    SharedToken,
    TokenCipher,
    TokenStore,
)
from liveness_proxy.upstream.tokens import (
    AccessToken,
    SharedTokenPolicy,
    TokenFetcher,
    TokenManager,
)

__all__ = [
    "AccessToken",
    "ClientCredentialsFetcher",
    "ClientSecretSource",
    "CynopsisClient",
    "CynopsisEndpoints",
    "DatabaseTokenStore",
    "FetchedToken",
    "RedisTokenStore",
    "ShapedResult",
    "SharedStateUnavailable",
    "SharedToken",
    "SharedTokenPolicy",
    "SingleFlight",
    "TokenCipher",
    "TokenEndpointError",
    "TokenFetcher",
    "TokenManager",
    "TokenStore",
    "UpstreamResult",
    "upstream_ssl_context",
]
