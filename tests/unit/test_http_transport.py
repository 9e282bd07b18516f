"""liveness_proxy/http/ without sockets: the error table, the in-memory transport, and what the token
fetch, the JWKS fetch and the liveness client make of answers and failures on the wire.

The real HTTP/1.1 client is driven over real sockets in tests/test_http1.py and test_upstream_tls.py;
here each case is one handler function of the request.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import parse_qs

import orjson
import pytest

from liveness_proxy.auth.jwks import MAX_JWKS_BYTES, JwksError
from liveness_proxy.auth.jwks_http import HttpJwksFetcher
from liveness_proxy.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from liveness_proxy.http import (
    USER_AGENT,
    ConnectError,
    ConnectionClosed,
    EncodedResponse,
    Http1Transport,
    HttpError,
    HttpRequest,
    HttpResponse,
    MalformedResponse,
    MemoryTransport,
    ResponseTooLarge,
    Timeout,
    TlsError,
    Url,
)
from liveness_proxy.http.errors import describe_tls_failure
from liveness_proxy.http.memory import json_response, response
from liveness_proxy.http.problems import upstream_problem
from liveness_proxy.upstream import CynopsisClient, CynopsisEndpoints, TokenManager
from liveness_proxy.upstream.oauth import (
    MAX_TOKEN_RESPONSE_BYTES,
    ClientCredentialsFetcher,
    FetchedToken,
    TokenEndpointError,
)

TOKEN_URL = "https://auth.cynopsis.example/oauth/token?tenant=a b"
API = "https://api.cynopsis.example:8443/base"
JWKS_URL = "https://idp.example.test/.well-known/jwks.json"


def untrusted() -> TlsError:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    return TlsError(describe_tls_failure(failure))


def failing(error: HttpError) -> MemoryTransport:
    def handler(_request: HttpRequest) -> HttpResponse:
        raise error

    return MemoryTransport(handler)


# -- the table --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outcome", "problem", "status", "upstream_status"),
    [
        (Timeout("late"), "timeout", UpstreamTimeout, 504, None),
        (ResponseTooLarge(503), "malformed", UpstreamMalformed, 502, 503),
        (EncodedResponse(200), "malformed", UpstreamMalformed, 502, 200),
        (ConnectError("refused"), "connect_error", UpstreamUnavailable, 502, None),
        (untrusted(), "connect_error", UpstreamUnavailable, 502, None),
        (ConnectionClosed("reset"), "connection_error", UpstreamUnavailable, 502, None),
        (MalformedResponse("garbage"), "connection_error", UpstreamUnavailable, 502, None),
        (HttpError("anything else"), "connection_error", UpstreamUnavailable, 502, None),
    ],
)
def test_each_http_error_has_one_outcome_and_one_problem(
    error: HttpError, outcome: str, problem: type[UpstreamError], status: int, upstream_status: int | None
) -> None:
    label, made = upstream_problem(error)
    assert label == outcome
    assert type(made) is problem
    assert made.status == status
    assert made.upstream_status == upstream_status
    assert "late" not in made.detail  # never the wire's own words
    assert "garbage" not in made.detail


def test_a_timeout_is_also_a_timeout_error() -> None:
    assert isinstance(Timeout("late"), TimeoutError)
    assert not isinstance(Timeout("late"), ConnectError)


# -- the in-memory transport and Url ---------------------------------------------------------------


async def test_the_memory_transport_keeps_the_transport_promises() -> None:
    async def slow(_request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(5)
        return response(200)

    url = Url.parse("http://127.0.0.1:1/x")
    with pytest.raises(Timeout):
        await MemoryTransport(slow).request("GET", url, max_body_bytes=10, timeout_seconds=0.05)
    big = MemoryTransport(lambda _: response(200, b"x" * 11))
    with pytest.raises(ResponseTooLarge) as refused:
        await big.request("GET", url, max_body_bytes=10, timeout_seconds=1)
    assert refused.value.status == 200
    gzip = MemoryTransport(lambda _: response(200, b"x", headers=[("Content-Encoding", "gzip")]))
    with pytest.raises(EncodedResponse):
        await gzip.request("GET", url, max_body_bytes=10, timeout_seconds=1)
    identity = MemoryTransport(lambda _: response(200, b"x", headers=[("Content-Encoding", "identity")]))
    assert (await identity.request("GET", url, max_body_bytes=10, timeout_seconds=1)).body == b"x"
    await identity.aclose()
    with pytest.raises(ConnectError):
        await identity.request("GET", url, max_body_bytes=10, timeout_seconds=1)


def test_a_url_is_split_once_and_encoded_once() -> None:
    url = Url.parse("https://Host.example:8443/a b/%41?q=1 2&r=/x#fragment")
    assert url.origin == "https://Host.example:8443"
    assert url.target == "/a%20b/%41?q=1%202&r=/x"
    assert str(Url.parse("http://h")) == "http://h/"
    for bad in ("ftp://h/x", "/relative", "https://user:pw@h/x", "https:///x"):
        with pytest.raises(ValueError, match="URL"):
            Url.parse(bad)


async def test_the_http1_transport_bounds_its_origins_and_refuses_after_closing() -> None:
    transport = Http1Transport(max_connections=1, connect_timeout_seconds=1, max_origins=1)
    with pytest.raises(ConnectError, match="cannot connect"):  # nothing listens on port 9
        await transport.request("GET", Url.parse("http://127.0.0.1:9/"), max_body_bytes=1, timeout_seconds=2)
    with pytest.raises(ConnectError, match="more than 1 origins"):
        await transport.request("GET", Url.parse("http://127.0.0.1:7/"), max_body_bytes=1, timeout_seconds=2)
    assert transport.pool("http://127.0.0.1:9") is not None
    assert transport.pool("http://127.0.0.1:7") is None
    await transport.aclose()
    with pytest.raises(ConnectError, match="closed"):
        await transport.request("GET", Url.parse("http://127.0.0.1:9/"), max_body_bytes=1, timeout_seconds=2)


# -- the token fetch ---------------------------------------------------------------------------------


def fetcher(http: MemoryTransport, *, reload: bool = False) -> ClientCredentialsFetcher:
    current = ["first-secret"]

    def reload_secret() -> bool:  # the file held a rotated secret
        current[0] = "second-secret"
        return True

    return ClientCredentialsFetcher(
        http,
        token_url=TOKEN_URL,
        client_id="client id",
        client_secret=lambda: current[0],
        default_lifetime_seconds=300,
        max_lifetime_seconds=3600,
        timeout_seconds=2,
        reload_client_secret=reload_secret if reload else None,
    )


async def test_the_token_request_is_a_form_post_to_the_configured_url() -> None:
    http = MemoryTransport(lambda _: json_response(200, b'{"access_token": "abc", "expires_in": 60}'))
    token = await fetcher(http).fetch()
    assert (token.value, token.lifetime_seconds) == ("abc", 60)
    [sent] = http.requests
    assert (sent.method, str(sent.url)) == ("POST", "https://auth.cynopsis.example/oauth/token?tenant=a%20b")
    assert sent.header("content-type") == "application/x-www-form-urlencoded"
    assert sent.header("accept") == "application/json"
    assert sent.body is not None
    assert parse_qs(sent.body.decode()) == {
        "grant_type": ["client_credentials"],
        "client_id": ["client id"],
        "client_secret": ["first-secret"],
    }


async def test_invalid_client_is_asked_once_more_with_the_reloaded_secret() -> None:
    def handler(request: HttpRequest) -> HttpResponse:
        assert request.body is not None
        if b"first-secret" in request.body:
            return json_response(401, b'{"error": "invalid_client", "error_description": "no"}')
        return json_response(200, b'{"access_token": "abc"}')

    http = MemoryTransport(handler)
    assert (await fetcher(http, reload=True).fetch()).lifetime_seconds == 300
    assert len(http.requests) == 2
    with pytest.raises(TokenEndpointError, match=r"^token endpoint answered HTTP 401 \(invalid_client\)$"):
        await fetcher(MemoryTransport(handler)).fetch()  # without a reload: the refusal as it is


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (Timeout("late"), "token endpoint timed out"),
        (untrusted(), "token endpoint TLS verification failed (unable to get local issuer certificate)"),
        (ResponseTooLarge(200), "token endpoint response too large"),
        (EncodedResponse(200), "token endpoint sent an encoded response"),
        (ConnectError("refused"), "token endpoint unreachable (ConnectError)"),
        (ConnectionClosed("reset"), "token endpoint unreachable (ConnectionClosed)"),
        (MalformedResponse("garbage"), "token endpoint unreachable (MalformedResponse)"),
    ],
)
async def test_a_failed_token_request_is_a_token_endpoint_error(error: HttpError, reason: str) -> None:
    with pytest.raises(TokenEndpointError) as failed:
        await fetcher(failing(error)).fetch()
    assert str(failed.value) == reason
    assert failed.value.status is None


async def test_a_token_answer_over_its_limit_is_refused() -> None:
    padded = b'{"access_token": "abc", "pad": "' + b"x" * MAX_TOKEN_RESPONSE_BYTES + b'"}'
    with pytest.raises(TokenEndpointError, match=r"^token endpoint response too large$"):
        await fetcher(MemoryTransport(lambda _: json_response(200, padded))).fetch()


# -- the JWKS fetch ----------------------------------------------------------------------------------


def jwks(http: MemoryTransport) -> HttpJwksFetcher:
    return HttpJwksFetcher(http, url=JWKS_URL, timeout_seconds=1)


async def test_the_jwks_is_fetched_with_a_get_and_its_body_returned() -> None:
    http = MemoryTransport(lambda _: json_response(200, b'{"keys": []}'))
    assert await jwks(http).fetch() == b'{"keys": []}'
    [sent] = http.requests
    assert (sent.method, str(sent.url), sent.body) == ("GET", JWKS_URL, None)
    assert sent.header("accept") == "application/jwk-set+json, application/json"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (Timeout("late"), "JWKS endpoint timed out"),
        (ConnectError("refused"), "JWKS endpoint unreachable (ConnectError)"),
        (json_response(500, b"{}"), "JWKS endpoint answered HTTP 500"),
        # Refused by its status, whatever the size of its body (as when the body was never read).
        (json_response(503, b"x" * (MAX_JWKS_BYTES + 1)), "JWKS endpoint answered HTTP 503"),
        (
            json_response(200, b"x" * (MAX_JWKS_BYTES + 1)),
            f"JWKS response larger than {MAX_JWKS_BYTES} bytes",
        ),
    ],
)
async def test_a_failed_jwks_fetch_is_a_jwks_error(answer: HttpResponse | HttpError, reason: str) -> None:
    def handler(_request: HttpRequest) -> HttpResponse:
        if isinstance(answer, HttpError):
            raise answer
        return answer

    with pytest.raises(JwksError) as failed:
        await jwks(MemoryTransport(handler)).fetch()
    assert str(failed.value) == reason


# -- the liveness client -----------------------------------------------------------------------------


class Observed:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def observe_upstream(
        self, endpoint: str, outcome: str, seconds: float, trace_id: str | None = None
    ) -> None:
        self.outcomes.append((endpoint, outcome))


class FixedToken:
    def __init__(self) -> None:
        self.fetched = 0

    async def fetch(self) -> FetchedToken:
        self.fetched += 1
        return FetchedToken(value=f"token-{self.fetched}", lifetime_seconds=300)


def cynopsis(http: MemoryTransport, observed: Observed, tokens: FixedToken | None = None) -> CynopsisClient:
    return CynopsisClient(
        http,
        TokenManager(tokens or FixedToken(), refresh_margin=lambda _: 1.0, failure_backoff_seconds=0),
        endpoints=CynopsisEndpoints(API, "/v2/session token", "/v2/session", "/v2/result/{session_id}/x"),
        domain_id="domain",
        max_response_bytes=1024,
        timeout_seconds=1,
        observer=observed,
    )


async def test_the_liveness_calls_go_to_their_urls_with_their_headers() -> None:
    http = MemoryTransport(lambda _: json_response(200, b'{"ok": true}'))
    client = cynopsis(http, Observed())
    assert (await client.get_session_token(b"{}", "req-1")).payload == {"ok": True}
    await client.get_result("abc_-1", "req-2")
    first, second = http.requests
    assert (first.method, str(first.url)) == ("POST", f"{API}/v2/session%20token")
    assert (first.header("authorization"), first.header("x-domain-id")) == ("Bearer token-1", "domain")
    assert (first.header("x-request-id"), first.header("content-type")) == ("req-1", "application/json")
    assert (second.method, str(second.url), second.body) == ("GET", f"{API}/v2/result/abc_-1/x", None)
    assert second.header("content-type") is None


@pytest.mark.parametrize(
    ("error", "outcome", "problem"),
    [
        (Timeout("late"), "timeout", UpstreamTimeout),
        (ConnectError("refused"), "connect_error", UpstreamUnavailable),
        (untrusted(), "connect_error", UpstreamUnavailable),
        (ConnectionClosed("reset"), "connection_error", UpstreamUnavailable),
        (MalformedResponse("garbage"), "connection_error", UpstreamUnavailable),
        (ResponseTooLarge(200), "malformed", UpstreamMalformed),
        (EncodedResponse(200), "malformed", UpstreamMalformed),
    ],
)
async def test_a_failed_exchange_is_observed_and_answered_by_the_table(
    error: HttpError, outcome: str, problem: type[UpstreamError]
) -> None:
    observed = Observed()
    with pytest.raises(UpstreamError) as failed:
        await cynopsis(failing(error), observed).create_session(b"{}", "req-1")
    assert type(failed.value) is problem
    assert observed.outcomes == [("create_session", outcome)]


async def test_a_rejected_token_is_replaced_and_the_call_sent_once_more() -> None:
    def handler(request: HttpRequest) -> HttpResponse:
        if request.header("authorization") == "Bearer token-1":
            return json_response(401, b"{}")
        return json_response(201, b'{"session_id": "s"}')

    http, observed, tokens = MemoryTransport(handler), Observed(), FixedToken()
    result = await cynopsis(http, observed, tokens).create_session(b"{}", "req-1")
    assert (result.status, tokens.fetched, len(http.requests)) == (201, 2, 2)
    assert observed.outcomes == [("create_session", "401"), ("create_session", "201")]


async def test_answers_are_read_by_status_and_content_type() -> None:
    observed = Observed()
    limited = MemoryTransport(lambda _: response(429, b"", headers=[("Retry-After", "7")]))
    with pytest.raises(UpstreamRateLimited) as limited_error:
        await cynopsis(limited, observed).get_result("s", "req-1")
    assert limited_error.value.headers == {"Retry-After": "7"}
    html = MemoryTransport(lambda _: response(200, b"{}", content_type="text/html"))
    with pytest.raises(UpstreamMalformed, match="non-JSON"):
        await cynopsis(html, observed).get_result("s", "req-2")
    assert observed.outcomes == [("result", "429"), ("result", "malformed")]
    body = orjson.dumps({"status": "SUCCEEDED"})
    ok = MemoryTransport(lambda _: json_response(200, body, headers=[("Content-Encoding", "identity")]))
    assert (await cynopsis(ok, observed).get_result("s", "req-3")).payload == {"status": "SUCCEEDED"}


def test_the_user_agent_names_the_version() -> None:
    from liveness_proxy._version import __version__

    assert f"liveness-proxy/{__version__}" == USER_AGENT
