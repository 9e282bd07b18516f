"""`Retry-After` (RFC 9110 §10.2.3), read defensively: it comes from a server we do not control."""

from __future__ import annotations

import email.utils
import math
import re
import time

MAX_RETRY_AFTER_SECONDS = 3600
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() would take "²" and then fail int()


def parse_retry_after(value: str | None, *, default: int = 1, now: float | None = None) -> int:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), bounded to [1, 3600]."""
    if not value:
        return default
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return max(1, min(int(value), MAX_RETRY_AFTER_SECONDS))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a year past what datetime holds: OverflowError
        return default
    delta = when.timestamp() - (time.time() if now is None else now)
    return max(1, min(math.ceil(delta), MAX_RETRY_AFTER_SECONDS))
