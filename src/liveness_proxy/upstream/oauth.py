"""The OAuth 2.0 client-credentials request for the upstream access token, and what its answer may be.

Only the request and the reading of its answer are here; keeping the token (cache, refresh ahead,
one request at a time, the fleet lease) is upstream/tokens.py. The answer is read narrowly: a JSON
object with a printable `access_token` of bounded length, `token_type` Bearer (or absent), and an
`expires_in` that is a positive number of seconds (capped). Whatever goes wrong is a
`TokenEndpointError` whose message never holds a secret or the endpoint's own words (only a short
`error` code, see upstream/answers.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from opentelemetry.trace import SpanKind

from liveness_proxy.http import HttpError, HttpResponse, HttpTransport, Url
from liveness_proxy.http.errors import EncodedResponse, ResponseTooLarge, Timeout, TlsError
from liveness_proxy.tracing import Tracing, client_attributes, record_answer
from liveness_proxy.upstream.answers import parse_seconds, upstream_error_code

MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
MAX_ACCESS_TOKEN_LENGTH = 8192
# An access token goes into a header: printable ASCII only, so it can never split a header line.
_ACCESS_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")


class TokenEndpointError(Exception):
    """The token endpoint did not give a usable token. The message never contains a secret."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class FetchedToken:
    value: str = field(repr=False)
    lifetime_seconds: float


def describe_http_error(error: HttpError) -> str:
    """What a failed token request says in the `upstream_token_failed` log line."""
    if isinstance(error, Timeout):
        return "token endpoint timed out"
    if isinstance(error, TlsError):
        return f"token endpoint {error.description}"
    if isinstance(error, ResponseTooLarge):
        return "token endpoint response too large"
    if isinstance(error, EncodedResponse):
        return "token endpoint sent an encoded response"
    return f"token endpoint unreachable ({type(error).__name__})"


class ClientCredentialsFetcher:
    """`POST token_url` with `grant_type=client_credentials` (form-encoded), as Cynopsis documents.

    `http` is the transport for Cynopsis (an Http1Transport with upstream/tls.py's context): TLS is
    the transport's. The token endpoint's own timeout bounds each request, and its answer is read up
    to MAX_TOKEN_RESPONSE_BYTES.

    `client_secret` is called for every request. When the endpoint refuses the client (400/401
    `invalid_client`: the secret was rotated), `reload_client_secret` is asked to read it again, and
    if that gave a different secret the request is sent once more at once with it. Re-reads are
    bounded by the callers of `fetch`: the TokenManager makes at most one token request at a time
    and, after a failed one, none before its failure backoff is over, so an endpoint that refuses
    every secret costs one file read per backoff interval.
    """

    def __init__(
        self,
        http: HttpTransport,
        *,
        token_url: str,
        client_id: str,
        client_secret: Callable[[], str],
        default_lifetime_seconds: float,
        max_lifetime_seconds: float,
        timeout_seconds: float,
        reload_client_secret: Callable[[], bool] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._http = http
        self._tracing = tracing or Tracing.off()
        self._timeout_seconds = timeout_seconds
        self._token_url = Url.parse(token_url)
        self._span_attributes = client_attributes(
            "POST", self._token_url.origin, **{"liveness_proxy.upstream.endpoint": "token"}
        )
        self._client_id = client_id
        self._client_secret = client_secret
        self._default_lifetime = default_lifetime_seconds
        self._max_lifetime = max_lifetime_seconds
        self._reload_client_secret = reload_client_secret

    async def fetch(self) -> FetchedToken:
        answer = await self._request(self._client_secret())
        if (
            answer.status in (400, 401)
            and self._reload_client_secret is not None
            and upstream_error_code(answer.body) == "invalid_client"
            and self._reload_client_secret()
        ):
            # Rotated: the file already holds the new secret. Once, so a refused new secret is
            # reported like any other refusal.
            answer = await self._request(self._client_secret())
        if answer.status != 200:
            reason = upstream_error_code(answer.body)
            suffix = f" ({reason})" if reason else ""
            raise TokenEndpointError(
                f"token endpoint answered HTTP {answer.status}{suffix}", status=answer.status
            )
        return self._parse(answer.body)

    async def _request(self, client_secret: str) -> HttpResponse:
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": client_secret,
            }
        )
        # A client span, and the token endpoint gets its traceparent (tracing on): a slow refresh
        # is then visible in the token server's own traces too.
        with self._tracing.span("POST", kind=SpanKind.CLIENT, attributes=self._span_attributes) as span:
            try:
                answer = await self._http.request(
                    "POST",
                    self._token_url,
                    headers=(
                        ("Accept", "application/json"),
                        ("Content-Type", "application/x-www-form-urlencoded"),
                        *self._tracing.outbound_headers(),
                    ),
                    body=form.encode("ascii"),
                    max_body_bytes=MAX_TOKEN_RESPONSE_BYTES,
                    timeout_seconds=self._timeout_seconds,
                )
            except HttpError as exc:
                raise TokenEndpointError(describe_http_error(exc)) from None
            record_answer(span, answer.status)
            return answer

    def _parse(self, body: bytes) -> FetchedToken:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TokenEndpointError("token response is not JSON", status=200) from None
        if not isinstance(payload, dict):
            raise TokenEndpointError("token response is not a JSON object", status=200)
        token = payload.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenEndpointError("token response has no access_token", status=200)
        if len(token) > MAX_ACCESS_TOKEN_LENGTH or not _ACCESS_TOKEN_PATTERN.fullmatch(token):
            raise TokenEndpointError("token response has an access_token of an unusable form", status=200)
        token_type = payload.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenEndpointError("token response has a token_type other than Bearer", status=200)
        return FetchedToken(value=token, lifetime_seconds=self._lifetime(payload.get("expires_in")))

    def _lifetime(self, expires_in: Any) -> float:
        if expires_in is None:
            return self._default_lifetime
        if isinstance(expires_in, str):
            parsed = parse_seconds(expires_in.strip())
            if parsed is None:
                raise TokenEndpointError("token response has an invalid expires_in", status=200)
            expires_in = parsed
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not math.isfinite(expires_in)
        ):
            raise TokenEndpointError("token response has an invalid expires_in", status=200)
        if expires_in <= 0:
            raise TokenEndpointError("token response has a non-positive expires_in", status=200)
        return min(float(expires_in), self._max_lifetime)
