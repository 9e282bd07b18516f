"""Fetching the identity provider's JWKS over HTTP: one GET, bounded in time and size.

Apart from jwks.py so that the keys, their selection and the cache know nothing of HTTP: the cache
is given any `JwksFetcher`, this is the one that asks the URL the operator configured. Every failure
is a `JwksError` with a one-line reason for the log, never the response's content.
"""

from __future__ import annotations

from liveness_proxy.auth.jwks import MAX_JWKS_BYTES, JwksError
from liveness_proxy.http import HttpError, HttpTransport, Url
from liveness_proxy.http.errors import EncodedResponse, ResponseTooLarge, Timeout


class HttpJwksFetcher:
    """`GET jwks_url` with its own timeout and a bounded body.

    `http` is the JWKS transport: an Http1Transport with the system's trust store (http/base.py's
    `system_ssl_context`), never the Cynopsis one (upstream/tls.py says why). Redirects are not
    followed: the keys must come from the URL the operator configured.
    """

    def __init__(
        self,
        http: HttpTransport,
        *,
        url: str,
        timeout_seconds: float,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        self._http = http
        self._url = Url.parse(url)
        self._timeout_seconds = timeout_seconds
        self._max_bytes = max_bytes

    async def fetch(self) -> bytes:
        try:
            answer = await self._http.request(
                "GET",
                self._url,
                headers=(("Accept", "application/jwk-set+json, application/json"),),
                max_body_bytes=self._max_bytes,
                timeout_seconds=self._timeout_seconds,
            )
        except HttpError as exc:
            raise JwksError(self._describe(exc)) from None
        if answer.status != 200:
            raise JwksError(f"JWKS endpoint answered HTTP {answer.status}")
        return answer.body

    def _describe(self, error: HttpError) -> str:
        status = getattr(error, "status", None)
        if isinstance(error, ResponseTooLarge | EncodedResponse) and status != 200:
            # A refusal by its status first, whatever its body: as if the body had not been read.
            return f"JWKS endpoint answered HTTP {status}"
        if isinstance(error, Timeout):
            return "JWKS endpoint timed out"
        if isinstance(error, ResponseTooLarge):
            return f"JWKS response larger than {self._max_bytes} bytes"
        if isinstance(error, EncodedResponse):
            return "JWKS endpoint sent an encoded response"
        return f"JWKS endpoint unreachable ({type(error).__name__})"
