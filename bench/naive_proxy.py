"""The naive anchor: how a liveness proxy is commonly written (FastAPI + httpx, one shared client,
static token, no caller auth, no audit). bench/run.py compares the product against it and nginx.

Adapted from shared/perf/naive_proxy.py: the result read is unchanged; the create-session route is
new (for S2) and written in the same naive style (FastAPI parses the JSON body, httpx re-encodes it).

Run: uvicorn naive_proxy:app --app-dir bench --port PORT --no-access-log   (upstream at UPSTREAM)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Body, FastAPI, Response

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:18081")
HEADERS = {"Authorization": "Bearer static-token", "X-Domain-Id": "demo-domain"}
# A module-level client set by the lifespan, exactly as the reference (and much real code) does it:
# this file is the floor being measured, not an example to follow.
client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    global client
    async with httpx.AsyncClient(base_url=UPSTREAM) as client:
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/v1/liveness/sessions/{session_id}/result")
async def result(session_id: str) -> Response:
    r = await client.get(f"/service/liveness-v2/liveness_result/{session_id}", headers=HEADERS)
    return Response(r.content, status_code=r.status_code, media_type="application/json")


@app.post("/v1/liveness/sessions")
async def create_session(payload: dict[str, Any] = Body(...)) -> Response:  # noqa: B008 (FastAPI's idiom)
    r = await client.post("/service/liveness-v2/liveness_session", json=payload, headers=HEADERS)
    return Response(r.content, status_code=r.status_code, media_type="application/json")
