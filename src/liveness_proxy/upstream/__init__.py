"""The Cynopsis side: HTTP transport, access-token management and the three liveness calls."""

from liveness_proxy.upstream.client import CynopsisClient, CynopsisEndpoints, UpstreamResult
from liveness_proxy.upstream.tokens import (
    AccessToken,
    ClientCredentialsFetcher,
    FetchedToken,
    TokenEndpointError,
    TokenFetcher,
    TokenManager,
)
from liveness_proxy.upstream.transport import create_http_session

__all__ = [
    "AccessToken",
    "ClientCredentialsFetcher",
    "CynopsisClient",
    "CynopsisEndpoints",
    "FetchedToken",
    "TokenEndpointError",
    "TokenFetcher",
    "TokenManager",
    "UpstreamResult",
    "create_http_session",
]
