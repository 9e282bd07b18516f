"""The query of `GET /v1/liveness/sessions`, read strictly: an unknown or repeated parameter is a 400,
never ignored, because a misspelt filter that is ignored lists every session instead of a few.

The cursor is opaque to clients: the base64url of the JSON `[created_at, session_id]` of the last
session of the page before. It carries nothing secret (an admin may read any session), so it is not
signed; anything that does not decode to that shape is a 400.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import orjson

from liveness_proxy.api.paths import is_session_id
from liveness_proxy.errors import BadRequest
from liveness_proxy.store import SESSION_STATUSES, SessionFilter, SessionPosition, SessionStatus

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
LIST_PARAMETERS = ("subject", "reference", "status", "created_after", "created_before", "cursor", "limit")
_MAX_FILTER_CHARS = 255  # subjects and references are stored in 255 characters
_MAX_CURSOR_CHARS = 512
_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_NAME = re.compile(r"[a-z_]{1,32}")
# RFC 3339 `date-time`: a full date, `T`, a time with optional fraction, and `Z` or a numeric offset.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d is 0-9 only: int() would read the digits of any script
)


@dataclass(frozen=True, slots=True)
class SessionListQuery:
    criteria: SessionFilter
    after: SessionPosition | None
    limit: int


def parse_list_query(items: Iterable[tuple[str, str]]) -> SessionListQuery:
    """The list query from the request's (name, value) pairs, in order."""
    values: dict[str, str] = {}
    for name, value in items:
        if name not in LIST_PARAMETERS:
            raise BadRequest(f"Unknown query parameter{_named(name)}; known: {', '.join(LIST_PARAMETERS)}.")
        if name in values:
            raise BadRequest(f"The query parameter '{name}' is given more than once.")
        values[name] = value
    cursor = values.get("cursor")
    return SessionListQuery(
        criteria=SessionFilter(
            subject=_filter_text(values, "subject"),
            reference=_filter_text(values, "reference"),
            status=_status(values.get("status")),
            created_after=_time(values, "created_after"),
            created_before=_time(values, "created_before"),
        ),
        after=None if cursor is None else decode_cursor(cursor),
        limit=_limit(values.get("limit")),
    )


def encode_cursor(position: SessionPosition) -> str:
    text = orjson.dumps([position.created_at, position.session_id])
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> SessionPosition:
    invalid = BadRequest("The cursor is not one this route returned.")
    if len(cursor) > _MAX_CURSOR_CHARS or not _CURSOR_TEXT.fullmatch(cursor):
        raise invalid
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise invalid from None
    if not (isinstance(decoded, list) and len(decoded) == 2):
        raise invalid
    created_at, session_id = decoded
    if (
        isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not math.isfinite(created_at)
        or not is_session_id(session_id)
    ):
        raise invalid
    return SessionPosition(float(created_at), session_id)


def parse_rfc3339(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 date-time with its offset (`Z` or ±hh:mm), or None when `text`
    is not one. A leap second (:60) is read as the first moment of the next minute."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(index)) for index in range(1, 7))
    fraction, zulu, sign, offset_hours, offset_minutes = match.group(7, 8, 9, 10, 11)
    if second > 60 or (zulu is None and (int(offset_hours) > 23 or int(offset_minutes) > 59)):
        return None
    offset = dt.timedelta(0)
    if zulu is None:
        offset = dt.timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        if sign == "-":
            offset = -offset
    try:
        moment = dt.datetime(year, month, day, hour, minute, min(second, 59), tzinfo=dt.timezone(offset))
    except ValueError:  # no such day or hour (2025-02-30, 24:00)
        return None
    leap = 1.0 if second == 60 else 0.0
    return moment.timestamp() + leap + (float(fraction) if fraction else 0.0)


def _filter_text(values: dict[str, str], name: str) -> str | None:
    value = values.get(name)
    if value is None:
        return None
    if not value or len(value) > _MAX_FILTER_CHARS or not value.isprintable():
        raise BadRequest(f"'{name}' must be 1-{_MAX_FILTER_CHARS} printable characters.")
    return value


def _status(value: str | None) -> SessionStatus | None:
    if value is None:
        return None
    if value not in SESSION_STATUSES:
        raise BadRequest(f"'status' must be one of {', '.join(SESSION_STATUSES)}.")
    return cast(SessionStatus, value)


def _time(values: dict[str, str], name: str) -> float | None:
    value = values.get(name)
    if value is None:
        return None
    moment = parse_rfc3339(value)
    if moment is None:
        raise BadRequest(
            f"'{name}' must be an RFC 3339 date-time with its offset, such as 2026-01-31T09:00:00Z."
        )
    return moment


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE_SIZE
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or not (
        1 <= int(value) <= MAX_PAGE_SIZE
    ):
        raise BadRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE_SIZE}.")
    return int(value)


def _named(name: str) -> str:
    """The unknown name, for the problem's detail, only when it is plainly a name: a problem never
    repeats arbitrary caller input (it could be anything, a credential pasted in the wrong place)."""
    return f" '{name}'" if _PLAIN_NAME.fullmatch(name) else ""
