"""The aiohttp session a process uses for its rare HTTP calls (the token endpoint, JWKS), bounded body
reading, and helpers shared with the liveness calls' own transport (`http1`)."""

from __future__ import annotations

import email.utils
import math
import re
import time
from dataclasses import dataclass

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from liveness_proxy._version import __version__
from liveness_proxy.errors import UpstreamMalformed

USER_AGENT = f"liveness-proxy/{__version__}"
MAX_RETRY_AFTER_SECONDS = 3600
# ASCII digits only, and few of them: str.isdigit() accepts "²", and int() refuses 4,300+ digits.
_DIGITS = re.compile(r"[0-9]{1,9}")
_ERROR_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


def create_http_session(
    *, max_connections: int, connect_timeout_seconds: float, total_timeout_seconds: float
) -> aiohttp.ClientSession:
    """One pooled session per process: connection reuse is most of an upstream call's cost.

    Redirects are never followed (an `Authorization` header must not travel to a host we did not
    configure), proxies from the environment are ignored, and cookies are not kept.
    """
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        # Idle connections are dropped before the shortest idle timeout common servers use (5 s:
        # uvicorn, Node.js; nginx and cloud balancers wait 60 s or more). Otherwise a request can go
        # out on a connection the server is closing at that moment, and a POST cannot be re-sent
        # safely: the caller would get a 502 for a race. Under load connections are never idle
        # that long, so this costs a reconnect only after a quiet spell.
        keepalive_timeout=4,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=total_timeout_seconds,
            connect=connect_timeout_seconds,
        ),
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        raise_for_status=False,
    )


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    retry_after: str | None


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> UpstreamResponse:
    """Reads the whole body, refusing more than `limit` bytes (after decompression)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise UpstreamMalformed(
            "The liveness service sent a response that is too large.", upstream_status=response.status
        )
    body: bytes
    if declared is not None and response.headers.get("Content-Encoding") is None:
        # The common case: an unencoded body of a declared, acceptable length. aiohttp reads exactly
        # that many bytes, so one read is as bounded as the loop below, and cheaper.
        body = await response.read()
    else:
        # Chunked or compressed: the size is known only while reading (after decompression).
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise UpstreamMalformed(
                    "The liveness service sent a response that is too large.", upstream_status=response.status
                )
            chunks.append(chunk)
        body = b"".join(chunks)
    headers: CIMultiDictProxy[str] = response.headers
    return UpstreamResponse(
        status=response.status,
        body=body,
        content_type=headers.get("Content-Type", "").lower(),
        retry_after=headers.get("Retry-After"),
    )


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
