"""Property-based tests (Hypothesis) of the problem renderer: RFC 9457 members for every problem
class, extensions added without losing one (split from the former test_properties.py).

The settings (derandomized, no example database) and the strategies the property tests share are
in properties.py, which says why."""

from __future__ import annotations

import json
import re

import hypothesis
import orjson
from hypothesis import strategies as st

from liveness_proxy import errors
from liveness_proxy.errors import (
    ProblemError,
    RateLimited,
    UpstreamError,
    UpstreamMalformed,
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    render_problem,
)
from properties import PROPERTIES, unicode_text

# --- 4. The problem renderer --------------------------------------------------------------------


def _every_problem(detail: str, number: int) -> list[ProblemError]:
    """One problem of every class in errors.py, built as the code builds them."""
    seconds = max(1, number)
    return [
        ProblemError(detail),
        errors.BadRequest(detail),
        errors.Unauthenticated(detail),
        errors.Unauthenticated(detail, error="invalid_token"),
        errors.Forbidden(detail),
        errors.NotFound(detail),
        errors.MethodNotAllowed(detail),
        errors.RequestTimeout(detail),
        errors.PayloadTooLarge(detail),
        errors.UnsupportedMediaType(detail),
        errors.UnprocessableContent(detail),
        errors.SessionTokenInvalid(detail),
        errors.IdempotencyKeyReused(detail),
        errors.Conflict(detail),
        errors.IdempotencyKeyInFlight(detail, retry_after_seconds=number),
        errors.RequestHeaderFieldsTooLarge(detail),
        RateLimited(detail, retry_after_seconds=number),
        RateLimited(detail, retry_after_seconds=number, limit="daily_attempts"),
        errors.InternalError(detail),
        errors.ServiceUnavailable(detail),
        errors.ServiceUnavailable(detail, retry_after_seconds=number),
        errors.StoreUnavailable(detail),
        UpstreamError(detail),
        errors.UpstreamTimeout(detail),
        UpstreamUnavailable(detail, upstream_status=500),
        UpstreamMalformed(detail, upstream_status=200),
        UpstreamRateLimited(detail, retry_after_seconds=number),
        UpstreamRejected(detail, upstream_status=400 + abs(number) % 100),
        UpstreamNotFound(detail),
        errors.TokenUnavailable(detail, retry_after_seconds=seconds),
        errors.UpstreamCircuitOpen(detail, retry_after_seconds=seconds),
    ]


def test_the_renderer_properties_cover_every_problem_class() -> None:
    classes: set[type[ProblemError]] = set()
    pending: list[type[ProblemError]] = [ProblemError]
    while pending:
        cls = pending.pop()
        # errors.py's classes only: the demo defines its own, there whenever a test imported it.
        if cls.__module__ == errors.__name__:
            classes.add(cls)
        pending.extend(cls.__subclasses__())
    assert {type(problem) for problem in _every_problem("detail", 1)} == classes


@PROPERTIES
@hypothesis.given(
    which=st.integers(min_value=0, max_value=len(_every_problem("", 0)) - 1),
    detail=unicode_text(max_size=200),
    request_id=unicode_text(min_size=1, max_size=130),
    number=st.integers(min_value=-5, max_value=10**6),
)
def test_a_rendered_problem_is_json_with_exactly_the_rfc_9457_members(
    which: int, detail: str, request_id: str, number: int
) -> None:
    error = _every_problem(detail, number)[which]
    body = render_problem(error, request_id)
    # Valid UTF-8 and valid JSON for a strict parser, with every control character escaped.
    text = body.decode("utf-8")
    assert not any(ord(character) < 0x20 for character in text)
    parsed = json.loads(text)
    assert parsed == orjson.loads(body)
    assert set(parsed) == {"type", "title", "status", "detail", "request_id"} | set(error.extensions())
    assert parsed["type"] == errors.PROBLEM_TYPE_PREFIX + error.slug
    assert re.fullmatch(r"urn:liveness-proxy:problem:[a-z]+(-[a-z]+)*", parsed["type"])
    assert parsed["title"] == error.title
    assert parsed["status"] == error.response_status()
    assert 400 <= parsed["status"] <= 599
    assert parsed["detail"] == detail
    assert parsed["request_id"] == request_id
    for name, value in error.headers.items():
        # Headers go out as latin-1 bytes: no line breaks, nothing a header cannot carry.
        assert value.isascii()
        assert "\r" not in value
        assert "\n" not in value
        if name == "Retry-After":
            assert int(value) >= 1


@PROPERTIES
@hypothesis.given(
    checks=st.dictionaries(unicode_text(max_size=10), unicode_text(max_size=30), max_size=4),
    request_id=unicode_text(min_size=1, max_size=40),
)
def test_problem_extensions_are_added_without_losing_a_member(
    checks: dict[str, str], request_id: str
) -> None:
    error = errors.ServiceUnavailable("Not ready.", retry_after_seconds=5)
    parsed = orjson.loads(render_problem(error, request_id, {"checks": checks}))
    assert parsed["checks"] == checks
    assert parsed["status"] == 503
    assert parsed["request_id"] == request_id
