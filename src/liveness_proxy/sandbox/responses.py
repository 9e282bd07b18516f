"""JSON responses in the shape the upstream uses for errors: `{"error": ..., "message": ...}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse


class OrjsonResponse(JSONResponse):
    """`application/json` rendered by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    status_code: int,
    error: str,
    message: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> OrjsonResponse:
    """An error body with a machine-readable `error` code and an optional human `message`."""
    body: dict[str, Any] = {"error": error}
    if message is not None:
        body["message"] = message
    body.update(extra)
    return OrjsonResponse(body, status_code=status_code, headers=headers)
