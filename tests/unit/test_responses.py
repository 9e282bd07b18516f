"""json_response: the header fields Starlette's Response would send, without building them per answer."""

from __future__ import annotations

import pytest
from starlette.responses import Response

from liveness_proxy.api.responses import json_response


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, None),
        (201, {"Location": "/v1/liveness/sessions/abc/result"}),
        (200, {"Cache-Control": "private, max-age=5", "X-Liveness-Result-Source": "stored"}),
        (200, {"Content-Type": "application/problem+json", "Cache-Control": "no-cache"}),
    ],
)
def test_the_same_fields_as_starlettes_response(status: int, headers: dict[str, str] | None) -> None:
    body = b'{"status":"IN_PROGRESS"}'
    ours = json_response(body, status, headers)
    theirs = Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
    assert ours.status_code == theirs.status_code
    assert ours.body == theirs.body
    assert sorted(ours.raw_headers) == sorted(theirs.raw_headers)
