"""Property-based tests (Hypothesis) of the helpers that read upstream answers without a socket: the
Retry-After / expires_in / error-code helpers of upstream/transport.py and the JSON re-encoding
bound (split from the former test_properties.py).

The settings (derandomized, no example database) and the strategies the property tests share are
in properties.py, which says why."""

from __future__ import annotations

import re

import hypothesis
import orjson
from hypothesis import strategies as st

from liveness_proxy.api.bodies import encode_upstream
from liveness_proxy.errors import (
    UpstreamMalformed,
)
from liveness_proxy.http.retry_after import MAX_RETRY_AFTER_SECONDS, parse_retry_after
from liveness_proxy.upstream.answers import (
    parse_seconds,
    upstream_error_code,
)
from properties import ERROR_CODE, PROPERTIES, json_values, nested, unicode_text


@PROPERTIES
@hypothesis.given(depth=st.integers(min_value=1, max_value=1100))
def test_upstream_json_nested_too_deeply_to_re_encode_is_malformed_not_a_crash(depth: int) -> None:
    try:
        payload = orjson.loads(nested(depth))
    except orjson.JSONDecodeError:
        return  # deeper than orjson reads: the client refuses it as malformed (test above)
    try:
        encoded = encode_upstream(payload, 200)
    except UpstreamMalformed:
        assert depth > 200
        return
    assert orjson.loads(encoded) == payload


# --- the helpers of upstream/transport.py -------------------------------------------------------


def _retry_after_values() -> st.SearchStrategy[str | None]:
    http_dates = st.builds(
        lambda day, month, year, clock, zone: f"{day} {month} {year} {clock} {zone}".strip(),
        st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["Mon,", "Thu,", ""])),
        st.sampled_from(["Jan", "FEB", "Dec", "Foo", ""]),
        st.one_of(st.integers(-10, 10_000), st.integers(10_000, 10**15)).map(str),
        st.sampled_from(["00:00:00", "23:59:59", "99:99:99", "0:0", ""]),
        st.sampled_from(["GMT", "UTC", "+2359", "-2359", "+9999", "-0000", "EST", ""]),
    )
    return st.one_of(
        st.none(), unicode_text(max_size=40), st.integers(-(10**12), 10**12).map(str), http_dates
    )


@PROPERTIES
@hypothesis.given(value=_retry_after_values(), now=st.floats(min_value=0, max_value=4e9))
def test_retry_after_is_always_between_1_and_3600_seconds(value: str | None, now: float) -> None:
    seconds = parse_retry_after(value, now=now)
    assert 1 <= seconds <= MAX_RETRY_AFTER_SECONDS
    if value is not None and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        assert seconds == max(1, min(int(value), MAX_RETRY_AFTER_SECONDS))


@PROPERTIES
@hypothesis.given(value=st.one_of(unicode_text(max_size=12), st.integers(0, 10**12).map(str)))
def test_parse_seconds_reads_exactly_one_to_nine_ascii_digits(value: str) -> None:
    parsed = parse_seconds(value)
    if 1 <= len(value) <= 9 and all(character in "0123456789" for character in value):
        assert parsed == int(value)
    else:
        assert parsed is None


@PROPERTIES
@hypothesis.given(
    body=st.one_of(
        st.binary(max_size=200),
        json_values().map(orjson.dumps),
        st.one_of(
            unicode_text(max_size=80),
            st.from_regex(ERROR_CODE, fullmatch=True),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
        ).map(lambda code: orjson.dumps({"error": code})),
    )
)
def test_an_upstream_error_code_is_a_short_identifier_or_nothing(body: bytes) -> None:
    code = upstream_error_code(body)
    if code is None:
        return
    assert ERROR_CODE.fullmatch(code)
    assert orjson.loads(body)["error"] == code
