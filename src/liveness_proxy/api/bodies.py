"""Request bodies in, upstream answers out: the checks that make both safe to pass on."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request

from liveness_proxy.api.paths import is_session_id
from liveness_proxy.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnprocessableContent,
    UnsupportedMediaType,
    UpstreamMalformed,
)

_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9.+-]*\+)?json", re.IGNORECASE)


def encode_upstream(payload: dict[str, Any], upstream_status: int) -> bytes:
    """Upstream JSON re-encoded for the caller. orjson reads deeper nesting than it writes (1024 vs
    254 levels): such an answer is unusable, not a crash."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise UpstreamMalformed(
            "The liveness service sent JSON nested too deeply.", upstream_status=upstream_status
        ) from None


def session_id_from(payload: dict[str, Any], field_names: Sequence[str], upstream_status: int) -> str:
    """The session id of a create-session answer: the first configured field present, validated."""
    for name in field_names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, str) and is_session_id(value):
            return value
        raise UpstreamMalformed(
            "The liveness service returned a session id of an unusable form.", upstream_status=upstream_status
        )
    raise UpstreamMalformed("The liveness service returned no session id.", upstream_status=upstream_status)


async def read_json_object(
    request: Request, max_bytes: int, *, allow_empty: bool, timeout_seconds: float
) -> dict[str, Any]:
    """The request body, a JSON object, parsed; size and media type are enforced before the body is
    read, and the whole body must arrive within `timeout_seconds` (a client trickling it in would
    otherwise hold this request, its task and its connection for as long as it likes). What goes
    upstream is re-encoded from it (`encode_forwarded`), so the upstream never sees duplicate keys or
    other parser-dependent input."""
    headers = request.headers
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is invalid.")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
        if int(declared) == 0 and allow_empty:
            return {}
    content_type = headers.get("content-type")
    media_type = (content_type or "").split(";", 1)[0].strip()
    if content_type is not None and not _JSON_MEDIA_TYPE.fullmatch(media_type):
        raise UnsupportedMediaType("The body must be application/json.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLarge(f"The body must be at most {max_bytes} bytes.")
    except TimeoutError:
        raise RequestTimeout(
            f"The request body was not received within {timeout_seconds:g} seconds."
        ) from None
    if not body:
        if allow_empty:
            return {}
        raise BadRequest("A JSON object body is required.")
    if content_type is None:
        raise UnsupportedMediaType("The body must be sent with Content-Type: application/json.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise UnprocessableContent("The body must be a JSON object.")
    return payload


def encode_forwarded(payload: dict[str, Any]) -> bytes:
    """A validated body, encoded for the upstream. orjson reads deeper nesting than it writes."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise UnprocessableContent("The body is nested too deeply.") from None
