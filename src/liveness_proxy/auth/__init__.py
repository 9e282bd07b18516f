"""Caller authentication: who may call the proxy, and as which subject."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers

from liveness_proxy.auth.api_keys import ApiKeyAuthenticator, IssuedApiKey, looks_like_api_key, new_api_key
from liveness_proxy.auth.caller import ADMIN_SCOPE, Authenticator, Caller
from liveness_proxy.auth.host import HostAuthentication, HostAuthenticator, InvalidHostCaller
from liveness_proxy.auth.jwks import JwksCache, KeySet, StaticKeySource
from liveness_proxy.auth.jwt import JwtAuthenticator, JwtPolicy
from liveness_proxy.errors import Unauthenticated

__all__ = [
    "ADMIN_SCOPE",
    "ApiKeyAuthenticator",
    "Authenticator",
    "Caller",
    "CallerAuthentication",
    "HostAuthentication",
    "HostAuthenticator",
    "InvalidHostCaller",
    "IssuedApiKey",
    "JwksCache",
    "JwtAuthenticator",
    "JwtPolicy",
    "KeySet",
    "StaticKeySource",
    "credential_kind",
    "new_api_key",
    "refuse_repeated_credentials",
]


class CallerAuthentication:
    """Asks each authenticator in turn; the first that recognises the credential decides."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)
        # Only name JWTs in the "authentication required" answer when they would be accepted.
        self._missing_detail = (
            "Authentication is required: send an API key or a JWT as 'Authorization: Bearer <credential>'."
            if any(isinstance(authenticator, JwtAuthenticator) for authenticator in self._authenticators)
            else "Authentication is required: send an API key as 'Authorization: Bearer <key>'."
        )

    async def known_caller(self, headers: Headers) -> Caller | None:
        """The caller of an API key this process has verified before (None for anything else, a
        JWT included): what is still served from an address over the unauthenticated limit."""
        for authenticator in self._authenticators:
            if isinstance(authenticator, ApiKeyAuthenticator):
                return await authenticator.known_caller(headers)
        return None

    def forget_all(self) -> None:
        """Drops every cached caller (after an erasure: store/erasure.py)."""
        for authenticator in self._authenticators:
            if isinstance(authenticator, ApiKeyAuthenticator):
                authenticator.forget_all()

    async def authenticate(self, headers: Headers) -> Caller:
        refuse_repeated_credentials(headers)
        for authenticator in self._authenticators:
            caller = await authenticator.authenticate(headers)
            if caller is not None:
                return caller
        if "authorization" in headers or "x-api-key" in headers:
            raise Unauthenticated("The credential is not valid.", error="invalid_token")
        raise Unauthenticated(self._missing_detail)


def credential_kind(headers: Headers) -> str:
    """What kind of credential a request presents, for counting failures: none, api_key, jwt
    (any other Bearer credential), or other (another scheme)."""
    if "x-api-key" in headers:
        return "api_key"
    authorization = headers.get("authorization")
    if authorization is None:
        return "none"
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return "other"
    return "api_key" if looks_like_api_key(credential.strip()) else "jwt"


def refuse_repeated_credentials(headers: Headers) -> None:
    """Two Authorization headers, or two X-API-Key headers, are refused whatever their order, as
    both kinds together are: picking one would let a proxy in front smuggle in a second identity."""
    authorization = api_key = 0
    for name, _value in headers.raw:  # ASGI header names are lowercase
        if name == b"authorization":
            authorization += 1
        elif name == b"x-api-key":
            api_key += 1
    if authorization > 1 or api_key > 1:
        raise Unauthenticated(
            "Send one credential, once: a repeated Authorization or X-API-Key header is refused.",
            error="invalid_request",
        )
