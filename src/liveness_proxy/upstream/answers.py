"""Reading what an upstream answered, shared by the liveness calls and the token fetch: a
Retry-After header, a count of seconds, the short `error` code of a JSON error body.

Each reads text the upstream controls, so each accepts only a narrow form and bounds it: ASCII
digits only (`str.isdigit()` accepts "²", and `int()` refuses 4,300+ digits), a Retry-After within an
hour, an error code that is an identifier and never free text.
"""

from __future__ import annotations

import re

import orjson

# ASCII digits only, and few of them: str.isdigit() accepts "²", and int() refuses 4,300+ digits.
_DIGITS = re.compile(r"[0-9]{1,9}")
_ERROR_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def parse_seconds(value: str) -> int | None:
    """A non-negative whole number of seconds written as ASCII digits, else None."""
    return int(value) if _DIGITS.fullmatch(value) else None


def upstream_error_code(body: bytes) -> str | None:
    """The `error` code of a JSON error body, only if it is a short identifier; never free text."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    code = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(code, str) and _ERROR_CODE_PATTERN.fullmatch(code):
        return code
    return None
