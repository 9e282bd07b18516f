"""Property-based tests (Hypothesis) of the interpretation of upstream answers, over real HTTP from a
loopback upstream that answers whatever a test scripts: every answer is a JSON object or a
documented upstream error, objects reach the caller unchanged, and an accepted session id never
leaves the configured result path. (The pure helpers, JWT parsing, the problem renderer and the
session-id validator are in unit/test_*_properties.py.)

The settings (derandomized, no example database) and the strategies the property tests share are
in properties.py, which says why."""

from __future__ import annotations

import asyncio
import posixpath
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from liveness_proxy.api.bodies import encode_upstream
from liveness_proxy.api.paths import SESSION_ID_PATTERN
from liveness_proxy.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
)
from liveness_proxy.http import Http1Transport
from liveness_proxy.http.retry_after import MAX_RETRY_AFTER_SECONDS, parse_retry_after
from liveness_proxy.upstream import CynopsisClient, CynopsisEndpoints, TokenManager, UpstreamResult
from liveness_proxy.upstream.answers import upstream_error_code
from liveness_proxy.upstream.oauth import ClientCredentialsFetcher
from properties import (
    ERROR_CODE,
    PROPERTIES,
    SESSION_ID_ALPHABET,
    json_values,
    nested,
    unicode_text,
    weighted,
)
from support import ServerThread

MAX_RESPONSE_BYTES = 4096
RESULT_PREFIX = "/api/v2/liveness_result/"
RESULT_SUFFIX = "/details"
# Marks upstream text: it must never reach a problem detail (only a validated short error code may).
UPSTREAM_TEXT_MARKER = "Zq7-upstream-text"


def _json_objects() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(unicode_text(max_size=8), json_values(), max_size=5)


# --- a loopback upstream that answers what the test scripts -------------------------------------


@dataclass
class ScriptedAnswer:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"application/json")]
    )
    body: bytes = b"{}"


@dataclass
class ScriptedUpstream:
    """Answers the token endpoint as Cynopsis would, and every other request with `answer`;
    records every request target as it arrived (still percent-encoded)."""

    answer: ScriptedAnswer = field(default_factory=ScriptedAnswer)
    targets: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        more_body = True
        while more_body:
            message = await receive()
            more_body = message.get("more_body", False)
        if scope["path"] == "/oauth/token":
            token = orjson.dumps(
                {"access_token": f"at-{uuid.uuid4().hex}", "token_type": "Bearer", "expires_in": 3600}
            )
            answer = ScriptedAnswer(body=token)
        else:
            self.targets.append(scope["raw_path"].decode("latin-1"))
            answer = self.answer
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        await send({"type": "http.response.body", "body": answer.body})


@dataclass
class UpstreamRig:
    """A real CynopsisClient (Http1Transport, TokenManager) talking to a ScriptedUpstream over loopback;
    `run` drives its coroutines on the rig's one event loop."""

    upstream: ScriptedUpstream
    client: CynopsisClient
    runner: asyncio.Runner

    def result(self, session_id: str) -> UpstreamResult:
        return self.runner.run(self.client.get_result(session_id, "req-properties"))

    def create_session(self) -> UpstreamResult:
        return self.runner.run(self.client.create_session(b'{"session_token":"sst_x"}', "req-properties"))


@asynccontextmanager
async def _cynopsis_client(base_url: str) -> AsyncIterator[CynopsisClient]:
    http = Http1Transport(max_connections=4, connect_timeout_seconds=5)
    tokens = TokenManager(
        ClientCredentialsFetcher(
            http,
            token_url=f"{base_url}/oauth/token",
            client_id="properties",
            client_secret=lambda: "properties-secret",
            default_lifetime_seconds=3600,
            max_lifetime_seconds=86400,
            timeout_seconds=5,
        ),
        refresh_margin=lambda lifetime: lifetime / 10,
        failure_backoff_seconds=1,
    )
    endpoints = CynopsisEndpoints(
        api_base_url=f"{base_url}/api",
        session_token_path="/v2/get_session_token",
        session_path="/v2/liveness_session",
        result_path="/v2/liveness_result/{session_id}" + RESULT_SUFFIX,
    )
    pool = Http1Transport(max_connections=4, connect_timeout_seconds=5)
    try:
        yield CynopsisClient(
            pool,
            tokens,
            endpoints=endpoints,
            domain_id="properties-domain",
            max_response_bytes=MAX_RESPONSE_BYTES,
            timeout_seconds=5,
        )
    finally:
        await tokens.close()
        await pool.aclose()
        await http.aclose()


@pytest.fixture(scope="module")
def rig() -> Iterator[UpstreamRig]:
    upstream = ScriptedUpstream()
    server = ServerThread(upstream, lifespan="off").start()
    try:
        with asyncio.Runner() as runner:
            context = _cynopsis_client(server.url)
            client = runner.run(context.__aenter__())
            try:
                yield UpstreamRig(upstream, client, runner)
            finally:
                runner.run(context.__aexit__(None, None, None))
    finally:
        server.stop()


@PROPERTIES
@hypothesis.given(session_id=st.text(st.sampled_from(sorted(SESSION_ID_ALPHABET)), min_size=1, max_size=128))
def test_an_accepted_session_id_never_leaves_the_configured_result_path(
    rig: UpstreamRig, session_id: str
) -> None:
    assert SESSION_ID_PATTERN.fullmatch(session_id)
    rig.upstream.answer = ScriptedAnswer(body=orjson.dumps({"session_id": session_id, "status": "CREATED"}))
    result = rig.result(session_id)
    assert result.payload["session_id"] == session_id
    sent = rig.upstream.targets[-1]
    # Exactly the configured path with the id in its place: not encoded, no query, no dot segment.
    assert sent == RESULT_PREFIX + session_id + RESULT_SUFFIX
    assert posixpath.normpath(sent) == sent


# --- 2. Upstream answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamScript:
    status: int
    content_type: str | None
    body: bytes
    retry_after: str | None
    content_encoding: str | None
    chunked: bool
    close: bool

    def answer(self) -> ScriptedAnswer:
        headers: list[tuple[bytes, bytes]] = []
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        if self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode("latin-1")))
        if self.content_encoding is not None:
            headers.append((b"content-encoding", self.content_encoding.encode("latin-1")))
        if not self.chunked:
            headers.append((b"content-length", str(len(self.body)).encode()))
        if self.close:
            headers.append((b"connection", b"close"))
        return ScriptedAnswer(self.status, headers, self.body)


def _header_value(max_size: int) -> st.SearchStrategy[str]:
    return st.from_regex(
        re.compile(rf"[\x21-\x7e](?:[\x20-\x7e]{{0,{max_size}}}[\x21-\x7e])?"), fullmatch=True
    )


def _upstream_bodies() -> st.SearchStrategy[bytes]:
    return weighted(
        (3, _json_objects().map(orjson.dumps)),
        (1, st.binary(max_size=300)),
        (1, json_values().map(orjson.dumps)),
        (
            2,
            st.builds(
                lambda code, text: orjson.dumps({"error": code, "message": text}),
                st.one_of(
                    st.from_regex(ERROR_CODE, fullmatch=True),
                    unicode_text(max_size=70),
                    st.integers(min_value=-(2**63), max_value=2**63 - 1),
                ),
                st.just(UPSTREAM_TEXT_MARKER),
            ),
        ),
        (1, st.integers(min_value=1000, max_value=1100).map(nested)),
        (
            1,
            st.integers(min_value=MAX_RESPONSE_BYTES - 16, max_value=MAX_RESPONSE_BYTES + 64).map(
                lambda size: (b'{"pad":"' + b"x" * size + b'"}')[:size]
            ),
        ),
    )


def _retry_after_headers() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.integers(min_value=-5, max_value=10**12).map(str),
        st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "soon"]),
        _header_value(40),
    )


def _upstream_scripts() -> st.SearchStrategy[UpstreamScript]:
    # What a working upstream sends: JSON, a status the client tells apart, no encoding.
    plausible = st.builds(
        UpstreamScript,
        status=st.sampled_from([200, 201, 200, 429, 404, 400, 409, 410, 401, 403, 500, 503]),
        content_type=st.sampled_from(["application/json", "application/json; charset=utf-8"]),
        body=_upstream_bodies(),
        retry_after=_retry_after_headers(),
        content_encoding=st.none(),
        chunked=st.booleans(),
        close=st.booleans(),
    )
    anything = st.builds(
        UpstreamScript,
        status=st.integers(min_value=200, max_value=599),
        content_type=st.one_of(
            st.sampled_from(["APPLICATION/JSON", "application/problem+json", "text/html", "text/plain"]),
            st.none(),
            _header_value(40),
        ),
        body=_upstream_bodies(),
        retry_after=_retry_after_headers(),
        content_encoding=st.sampled_from([None, "identity", "gzip", "br", "x-unknown"]),
        chunked=st.booleans(),
        close=st.booleans(),
    )
    return weighted((3, plausible), (1, anything))


def _expected_problem(script: UpstreamScript, *, is_result: bool) -> type[UpstreamError] | None:
    """What the module docstring of upstream/client.py promises for this answer (None: a result)."""
    status = script.status
    if script.content_encoding not in (None, "identity") or len(script.body) > MAX_RESPONSE_BYTES:
        return UpstreamMalformed
    if 200 <= status < 300:
        try:
            payload = orjson.loads(script.body)
        except orjson.JSONDecodeError:
            return UpstreamMalformed
        json_type = "json" in (script.content_type or "").lower()
        if not json_type or not isinstance(payload, dict):
            return UpstreamMalformed
        try:
            orjson.dumps(payload)  # the client re-encodes it to look for credentials in it
        except orjson.JSONEncodeError:
            return UpstreamMalformed  # nested deeper than orjson writes: no caller could get it
        asked = "session-1" if is_result else None
        if asked is not None and payload.get("session_id") not in (None, asked):
            return UpstreamMalformed  # a result for another session
        return None
    if status == 429:
        return UpstreamRateLimited
    if status in (401, 403):
        return UpstreamUnavailable
    if status == 404:
        return UpstreamNotFound if is_result else UpstreamUnavailable
    if 400 <= status < 500:
        return UpstreamRejected
    return UpstreamUnavailable


def _no_body_allowed(status: int) -> bool:
    return status in (204, 304)


@PROPERTIES
@hypothesis.given(script=_upstream_scripts(), is_result=st.booleans())
def test_any_upstream_answer_is_a_json_object_or_a_documented_upstream_error(
    rig: UpstreamRig, script: UpstreamScript, is_result: bool
) -> None:
    if _no_body_allowed(script.status):
        script = UpstreamScript(**{**script.__dict__, "body": b""})
    rig.upstream.answer = script.answer()
    expected = _expected_problem(script, is_result=is_result)
    hypothesis.event(f"expected {'a result' if expected is None else expected.__name__}")
    outcome: UpstreamResult | UpstreamError
    try:
        outcome = rig.result("session-1") if is_result else rig.create_session()
    except UpstreamError as error:
        outcome = error
    if isinstance(outcome, UpstreamError):
        assert type(outcome) is expected, (outcome, outcome.detail)
        _assert_sanitized(outcome, script)
    else:
        assert expected is None
        assert outcome.status == script.status
        assert outcome.payload == orjson.loads(script.body)


def _assert_sanitized(error: UpstreamError, script: UpstreamScript) -> None:
    """The caller sees our words and the status, never the upstream's text."""
    assert UPSTREAM_TEXT_MARKER not in error.detail
    assert error.detail.isascii()
    if isinstance(error, UpstreamRejected):
        assert error.response_status() == script.status
        code = upstream_error_code(script.body)
        assert error.detail == "The liveness service rejected the request" + (f" ({code})." if code else ".")
    if isinstance(error, UpstreamRateLimited | UpstreamNotFound):
        assert error.response_status() == script.status
    if isinstance(error, UpstreamRateLimited):
        assert 1 <= int(error.headers["Retry-After"]) <= MAX_RETRY_AFTER_SECONDS
    if isinstance(error, UpstreamMalformed | UpstreamUnavailable):
        assert error.response_status() == 502


@PROPERTIES
@hypothesis.given(payload=_json_objects())
def test_a_json_object_from_the_upstream_reaches_the_caller_unchanged(
    rig: UpstreamRig, payload: dict[str, Any]
) -> None:
    body = orjson.dumps(payload)
    hypothesis.assume(len(body) <= MAX_RESPONSE_BYTES)
    rig.upstream.answer = ScriptedAnswer(body=body)
    result = rig.result("session-1")
    assert result.payload == payload
    # What the route then sends on (re-encoded by orjson) reads back as the same object.
    assert orjson.loads(encode_upstream(result.payload, result.status)) == payload


@pytest.mark.parametrize("year", ["2147483648", "99999999999"])
def test_bug_retry_after_date_with_a_year_past_the_int_range_is_bounded_not_an_overflow_error(
    rig: UpstreamRig, year: str
) -> None:
    """Found by test_retry_after_is_always_between_1_and_3600_seconds: an upstream 429 whose
    Retry-After is an HTTP date with a huge year made parse_retry_after raise OverflowError (from
    datetime), which left the client as an unhandled exception: the caller got a 500."""
    assert parse_retry_after(f"Mon, 01 Jan {year} 00:00:00 GMT") in range(1, MAX_RETRY_AFTER_SECONDS + 1)
    rig.upstream.answer = ScriptedAnswer(
        status=429, headers=[(b"retry-after", f"0 JAN {year} 0:0".encode())], body=b""
    )
    with pytest.raises(UpstreamRateLimited):
        rig.result("session-1")
