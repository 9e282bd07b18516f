"""The session list's query, read strictly: RFC 3339 times with their offsets, the opaque cursor, and
nothing but a 400 for anything else."""

from __future__ import annotations

import base64
import datetime as dt
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveness_proxy.api.paths import SESSION_ID_REGEX
from liveness_proxy.api.session_list_query import (
    DEFAULT_PAGE_SIZE,
    decode_cursor,
    encode_cursor,
    parse_list_query,
    parse_rfc3339,
)
from liveness_proxy.errors import BadRequest
from liveness_proxy.store import SessionPosition

session_ids = st.from_regex(rf"\A{SESSION_ID_REGEX}\Z")
offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)


@given(
    moment=st.datetimes(
        min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=offsets
    )
)
def test_an_rfc3339_time_is_read_at_its_offset(moment: dt.datetime) -> None:
    assert parse_rfc3339(moment.isoformat()) == pytest.approx(moment.timestamp(), abs=1e-6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", 1_767_225_600.0),
        ("2026-01-01t00:00:00z", 1_767_225_600.0),
        ("2026-01-01T02:00:00+02:00", 1_767_225_600.0),
        ("2025-12-31T19:00:00.5-05:00", 1_767_225_600.5),
        ("2016-12-31T23:59:60Z", 1_483_228_800.0),  # a leap second: the next minute's first moment
        ("2026-01-01", None),
        ("2026-01-01T00:00:00", None),  # no offset: which moment is meant is unknown
        ("2026-01-01 00:00:00Z", None),
        ("2026-02-30T00:00:00Z", None),
        ("2026-01-01T24:00:00Z", None),
        ("2026-01-01T00:00:61Z", None),
        ("2026-01-01T00:00:00+24:00", None),
        ("2026-01-01T00:00:00+0200", None),
        ("0000-01-01T00:00:00Z", None),
        ("\uff12\uff10\uff12\uff16-01-01T00:00:00Z", None),  # fullwidth digits
    ],
)
def test_rfc3339_examples(text: str, expected: float | None) -> None:
    assert parse_rfc3339(text) == expected


@given(
    created_at=st.floats(allow_nan=False, allow_infinity=False),
    session_id=session_ids,
)
def test_a_cursor_gives_back_its_position_exactly(created_at: float, session_id: str) -> None:
    cursor = encode_cursor(SessionPosition(created_at, session_id))
    assert decode_cursor(cursor) == SessionPosition(created_at, session_id)


@given(st.text(max_size=600))
def test_any_other_cursor_is_a_400_never_a_crash(text: str) -> None:
    try:
        position = decode_cursor(text)
    except BadRequest:
        return
    # Only text that decodes to [a finite number, a valid session id] is taken.
    assert math.isfinite(position.created_at)
    assert decode_cursor(encode_cursor(position)) == position


@pytest.mark.parametrize(
    "raw",
    [b'[NaN, "a"]', b'[1e400, "a"]', b'[1, "a", 2]', b"[1]", b'["1", "a"]', b'[1, ""]', b"null"],
)
def test_cursors_of_the_wrong_shape_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_cursor(base64.urlsafe_b64encode(raw).decode().rstrip("="))


def test_defaults_and_every_filter() -> None:
    empty = parse_list_query([])
    assert empty.limit == DEFAULT_PAGE_SIZE
    assert empty.after is None
    full = parse_list_query(
        [
            ("subject", "zoe"),
            ("reference", "order 7"),
            ("status", "unresolved"),
            ("created_after", "2026-01-01T00:00:00Z"),
            ("created_before", "2026-01-02T00:00:00Z"),
            ("cursor", encode_cursor(SessionPosition(5.0, "abc"))),
            ("limit", "500"),
        ]
    )
    assert full.criteria.subject == "zoe"
    assert full.criteria.reference == "order 7"
    assert full.criteria.status == "unresolved"
    assert full.criteria.created_after == 1_767_225_600.0
    assert full.criteria.created_before == 1_767_225_600.0 + 86_400
    assert full.after == SessionPosition(5.0, "abc")
    assert full.limit == 500


@pytest.mark.parametrize(
    "items",
    [
        [("subject", "a"), ("subject", "a")],
        [("Subject", "a")],
        [("subject", "tab\there")],
        [("reference", "x" * 256)],
        [("status", "following ")],
        [("limit", "\u0661\u0660")],  # Arabic-Indic digits: isdigit() says yes, the route no
        [("limit", "00001")],
    ],
)
def test_strict_refusals(items: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest):
        parse_list_query(items)
