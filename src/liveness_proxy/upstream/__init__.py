"""The Cynopsis side: HTTP transport, access-token management and the three liveness calls."""

from liveness_proxy.upstream.client import CynopsisClient, CynopsisEndpoints, UpstreamResult
from liveness_proxy.upstream.client_secret import ClientSecretSource
from liveness_proxy.upstream.http1 import Http1Pool
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
    ClientCredentialsFetcher,
    FetchedToken,
    SharedTokenPolicy,
    TokenEndpointError,
    TokenFetcher,
    TokenManager,
)
from liveness_proxy.upstream.transport import create_http_session

__all__ = [
    "AccessToken",
    "ClientCredentialsFetcher",
    "ClientSecretSource",
    "CynopsisClient",
    "CynopsisEndpoints",
    "DatabaseTokenStore",
    "FetchedToken",
    "Http1Pool",
    "RedisTokenStore",
    "SharedStateUnavailable",
    "SharedToken",
    "SharedTokenPolicy",
    "TokenCipher",
    "TokenEndpointError",
    "TokenFetcher",
    "TokenManager",
    "TokenStore",
    "UpstreamResult",
    "create_http_session",
    "upstream_ssl_context",
]
