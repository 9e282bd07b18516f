"""`liveness-proxy demo`: the embedded default. The sandbox Cynopsis API and the proxy run in one
process, on loopback, with SQLite in a local folder, a fresh demo API key, and the demo page at
`/demo/` whose sign-in is a demo identity provider's short-lived JWT (see `demo.web` and `demo.identity`).
The demo server also plays the customer's backend: the proxy's webhooks go to `/demo/webhooks`, and
the page shows them arriving, signature checked (`demo.webhooks`). What runs is started in
`demo.servers`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from typing import Any

import orjson

from liveness_proxy.demo.servers import DEMO_SUBJECT, DemoDidNotStart, RunningDemo, serving_demo
from liveness_proxy.http import Http1Transport, Url
from liveness_proxy.serving.sockets import bound_sockets


async def run_demo(
    *, directory: str, host: str, port: int, sandbox_port: int, walkthrough_only: bool = False
) -> int:
    # Both ports are bound before anything starts: a port that is taken ends the demo with one line.
    with (
        bound_sockets(host, sandbox_port, "--sandbox-port") as sandbox_sockets,
        bound_sockets(host, port, "--port") as proxy_sockets,
    ):
        try:
            async with serving_demo(
                directory=directory,
                host=host,
                sandbox_sockets=sandbox_sockets,
                proxy_sockets=proxy_sockets,
                quiet=walkthrough_only,
            ) as demo:
                print(_walkthrough(demo), flush=True)
                if walkthrough_only:
                    return await _run_walkthrough(demo.proxy_url, demo.sandbox_url, demo.api_key)
                await _wait_for_interrupt()
                return 0
        except DemoDidNotStart:
            return 1


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _walkthrough(demo: RunningDemo) -> str:
    proxy_url, sandbox_url, key, database = demo.proxy_url, demo.sandbox_url, demo.api_key, demo.database
    webhooks = (
        f"{demo.webhook_url}   (the demo plays your backend: verdicts arrive signed, shown on the page)"
        if demo.webhook_url
        else "off (the demo listens on no loopback address; the proxy posts plain-http webhooks to loopback only)"
    )
    pick = "python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])'"
    return f"""
liveness-proxy demo is running.
  page:    {proxy_url}/demo/   (open it in a browser: the whole flow, step by step)
  proxy:   {proxy_url}   (OpenAPI: {proxy_url}/openapi.json, JS client: {proxy_url}/client/liveness-proxy-client.js)
  sandbox: {sandbox_url} (simulated Cynopsis API, control API on)
  data:    SQLite at {os.path.relpath(database)} (choose the folder with --dir)
  webhooks: {webhooks}

A demo API key for subject {DEMO_SUBJECT!r} was created (shown once):
  {key}

Copy and paste, step by step:

  KEY={shlex.quote(key)}
  # 1. a one-time session token for the frontend SDK
  TOKEN=$(curl -s -X POST {proxy_url}/v1/liveness/session-token -H "Authorization: Bearer $KEY" | {pick} session_token)
  # 2. create the liveness session; it is now bound to {DEMO_SUBJECT!r}
  SESSION=$(curl -s -X POST {proxy_url}/v1/liveness/sessions -H "Authorization: Bearer $KEY" \\
      -H 'Content-Type: application/json' -d "{{\\"session_token\\": \\"$TOKEN\\"}}" | {pick} session_id)
  # 3. (sandbox only) play the user in front of the camera: "live" or "spoof"
  curl -s -X POST {sandbox_url}/_sandbox/sessions/$SESSION/complete -H 'Content-Type: application/json' -d '{{"outcome": "live"}}' >/dev/null
  # 4. read the result: only the creator (or a liveness:admin key) may; face images are removed
  curl -s {proxy_url}/v1/liveness/sessions/$SESSION/result -H "Authorization: Bearer $KEY"; echo
  # every call above is in the audit log:
  #   LIVENESS_PROXY_DATABASE_URL=sqlite:///{database} .venv/bin/liveness-proxy audit export

Press Ctrl+C to stop.
"""


async def _run_walkthrough(proxy_url: str, sandbox_url: str, key: str) -> int:
    """The same four steps as the printed walkthrough, run once; prints each answer."""
    auth = {"Authorization": f"Bearer {key}"}
    async with Http1Transport(max_connections=2, connect_timeout_seconds=5) as http:

        async def step(
            label: str,
            method: str,
            url: str,
            *,
            headers: dict[str, str] | None = None,
            json: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            sent = list((headers or {}).items())
            if json is not None:
                sent.append(("Content-Type", "application/json"))
            response = await http.request(
                method,
                Url.parse(url),
                headers=sent,
                # A POST without content still says its length (0), as any HTTP client does.
                body=orjson.dumps(json) if json is not None else (b"" if method != "GET" else None),
                max_body_bytes=1024 * 1024,
                timeout_seconds=30,
            )
            payload: dict[str, Any] = orjson.loads(response.body)
            print(f"{label}: HTTP {response.status} {payload}", flush=True)
            if response.status >= 300:
                raise RuntimeError(f"{label} failed with HTTP {response.status}")
            return payload

        try:
            token = await step(
                "1 session-token", "POST", f"{proxy_url}/v1/liveness/session-token", headers=auth
            )
            session = await step(
                "2 create session",
                "POST",
                f"{proxy_url}/v1/liveness/sessions",
                headers=auth,
                json={"session_token": token["session_token"]},
            )
            session_id = session["session_id"]
            await step(
                "3 sandbox capture",
                "POST",
                f"{sandbox_url}/_sandbox/sessions/{session_id}/complete",
                json={"outcome": "live"},
            )
            result = await step(
                "4 result", "GET", f"{proxy_url}/v1/liveness/sessions/{session_id}/result", headers=auth
            )
        except RuntimeError as exc:
            print(f"walkthrough failed: {exc}", file=sys.stderr)
            return 1
    print(f"walkthrough: status={result.get('status')} confidence={result.get('confidence')}", flush=True)
    return 0
