"""The check that no answer passed on holds a secret of ours: the access token a call carried, the
client secret, or a credential of the caller it goes to (which the upstream never receives, so one
in an answer means a body carried it there).

The liveness client applies it to every answer as it arrives; an answer shared with further callers
(api/result_reads.py) or served from the proxy's record is checked again against each of their own
credentials, by the same function.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

from liveness_proxy.errors import UpstreamMalformed

# Shorter values are not checked for: they would match innocent answers. Every secret we guard is far
# longer (tokens, 32+ character secrets and peppers, 40+ character API keys).
MIN_SECRET_LENGTH = 16
# What JSON text cannot hold as it is (orjson escapes these, and nothing else).
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def refuse_echoed_secrets(raw: bytes, decoded: bytes, secrets: Iterable[str], *, status: int | None) -> None:
    """UpstreamMalformed when the answer holds one of `secrets`: as sent (`raw`, the body), or once
    decoded (`decoded`: the JSON re-encoded canonically, so no escape such as \\u0041 hides one)."""
    for secret in secrets:
        if len(secret) < MIN_SECRET_LENGTH:
            continue  # an empty or trivially short value would match innocent answers
        plain = secret.encode()
        # The secret as it reads in JSON text: '"', '\\' and control characters escaped, the way
        # the canonical form writes them (a secret may hold any of them). Most secrets hold none:
        # then it reads as it is, and is looked for once in each form (a few us a check, profiled).
        written = plain if _JSON_ESCAPED.search(secret) is None else orjson.dumps(secret)[1:-1]
        if plain in raw or (written is not plain and written in raw) or written in decoded:
            raise UpstreamMalformed(
                "The liveness service sent an answer that contains a credential; it was not passed on.",
                upstream_status=status,
            )
