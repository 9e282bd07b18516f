"""`liveness-proxy demo`: the embedded default. The sandbox Cynopsis API and the proxy run in one
process, on loopback, with SQLite in a local folder, a fresh demo API key, and the demo page at
`/demo/` whose sign-in is a demo identity provider's short-lived JWT (see `demo.web` and `demo.identity`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from liveness_proxy.app import create_app
from liveness_proxy.auth import new_api_key
from liveness_proxy.demo.handling import LOOPBACK_HOSTS
from liveness_proxy.demo.identity import DEMO_AUDIENCE, DEMO_ISSUER, DemoIdentityProvider
from liveness_proxy.demo.web import create_demo_app
from liveness_proxy.http import Http1Transport, Url
from liveness_proxy.sandbox import Sandbox, SandboxConfig
from liveness_proxy.serving.sockets import bound_sockets
from liveness_proxy.settings import settings_from_mapping
from liveness_proxy.store import ApiKeyStore, create_engine, upgrade_database

DEMO_SUBJECT = "demo-user"
# `--host` values that mean every address; only compared here, never bound by this code.
WILDCARD_ADDRESSES = frozenset({"0.0.0." + "0", "::", ""})


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (two servers share one loop here)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _write_public_key(folder: Path, identity: DemoIdentityProvider) -> Path:
    # The proxy reads the demo IdP's key from a file, as it would a real IdP's PEM key.
    path = folder / "demo-idp-public-key.pem"
    path.write_bytes(identity.public_key_pem())
    return path


def _prepare_folder(directory: str) -> tuple[Path, str]:
    """The demo folder, and the pepper kept there so demo keys stay valid across runs."""
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "api-key-pepper"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48), encoding="utf-8")
        path.chmod(0o600)
    return folder, path.read_text(encoding="utf-8").strip()


async def run_demo(
    *, directory: str, host: str, port: int, sandbox_port: int, walkthrough_only: bool = False
) -> int:
    folder, pepper = await asyncio.to_thread(_prepare_folder, directory)
    identity = DemoIdentityProvider(subject=DEMO_SUBJECT)
    public_key_file = await asyncio.to_thread(_write_public_key, folder, identity)
    sandbox_secret = secrets.token_urlsafe(24)  # new every run: nothing to leak between runs
    sandbox = Sandbox(
        SandboxConfig(
            client_id="demo-client",
            client_secret=sandbox_secret,
            domain_id="demo-domain",
            control_enabled=True,
        )
    )
    # Both ports are bound before anything starts: a port that is taken ends the demo with one line.
    with (
        bound_sockets(host, sandbox_port, "--sandbox-port") as sandbox_sockets,
        bound_sockets(host, port, "--port") as proxy_sockets,
    ):
        return await _run_servers(
            folder=folder,
            pepper=pepper,
            identity=identity,
            public_key_file=public_key_file,
            sandbox_secret=sandbox_secret,
            sandbox=sandbox,
            host=host,
            sandbox_sockets=sandbox_sockets,
            proxy_sockets=proxy_sockets,
            walkthrough_only=walkthrough_only,
        )


async def _run_servers(
    *,
    folder: Path,
    pepper: str,
    identity: DemoIdentityProvider,
    public_key_file: Path,
    sandbox_secret: str,
    sandbox: Sandbox,
    host: str,
    sandbox_sockets: list[socket.socket],
    proxy_sockets: list[socket.socket],
    walkthrough_only: bool,
) -> int:
    sandbox_server = EmbeddedServer(
        uvicorn.Config(sandbox.app, host=host, port=0, log_level="warning", lifespan="off")
    )
    sandbox_task = asyncio.create_task(sandbox_server.serve(sockets=sandbox_sockets))
    while not sandbox_server.started:
        if sandbox_task.done():
            await sandbox_task
            return 1
        await asyncio.sleep(0.01)
    sandbox_url = f"http://{host}:{_bound_port(sandbox_server)}"

    settings = settings_from_mapping(
        {
            "CYNOPSIS_TOKEN_URL": f"{sandbox_url}/oauth/token",
            "CYNOPSIS_API_BASE_URL": sandbox_url,
            "CYNOPSIS_CLIENT_ID": "demo-client",
            "CYNOPSIS_CLIENT_SECRET": sandbox_secret,
            "CYNOPSIS_DOMAIN_ID": "demo-domain",
            "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{folder / 'liveness-proxy.db'}",
            "LIVENESS_PROXY_API_KEY_PEPPER": pepper,
            # The demo page signs in with the demo IdP's JWTs: the proxy checks them like any other.
            "LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE": str(public_key_file),
            "LIVENESS_PROXY_JWT_ISSUER": DEMO_ISSUER,
            "LIVENESS_PROXY_JWT_AUDIENCE": DEMO_AUDIENCE,
            "LIVENESS_PROXY_JWT_ALGORITHMS": "ES256",
            "LIVENESS_PROXY_LOG_FORMAT": "console",
            "LIVENESS_PROXY_LOG_LEVEL": "warning" if walkthrough_only else "info",
        }
    )
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        await upgrade_database(engine)
        issued = new_api_key(
            pepper=settings.liveness_proxy_api_key_pepper.get_secret_value().encode(),
            subject=DEMO_SUBJECT,
            scopes=[],
            name="demo",
            now=time.time(),
        )
        await ApiKeyStore(engine).add(issued.stored)
    finally:
        await engine.dispose()

    proxy_server = EmbeddedServer(
        uvicorn.Config(
            create_demo_app(
                proxy=create_app(settings),
                sandbox=sandbox,
                sandbox_url=sandbox_url,
                identity=identity,
                client_secret=sandbox_secret,
                allowed_hosts=_allowed_hosts(host),
            ),
            host=host,
            port=0,
            log_level="warning",
            access_log=False,
            server_header=False,
        )
    )
    proxy_task = asyncio.create_task(proxy_server.serve(sockets=proxy_sockets))
    while not proxy_server.started:
        if proxy_task.done():
            sandbox_server.should_exit = True
            await sandbox_task
            await proxy_task
            return 1
        await asyncio.sleep(0.01)
    proxy_url = f"http://{host}:{_bound_port(proxy_server)}"
    print(_walkthrough(proxy_url, sandbox_url, issued.key, folder / "liveness-proxy.db"), flush=True)

    exit_code = 0
    try:
        if walkthrough_only:
            exit_code = await _run_walkthrough(proxy_url, sandbox_url, issued.key)
        else:
            await _wait_for_interrupt()
    finally:
        proxy_server.should_exit = True
        await proxy_task
        sandbox_server.should_exit = True
        await sandbox_task
    return exit_code


def _allowed_hosts(host: str) -> frozenset[str] | None:
    """Host names the demo page answers under: loopback and the address it listens on. Listening on
    every address means "reach me by any name", so then any, with a warning: the page signs anyone
    in as the demo user."""
    if host in WILDCARD_ADDRESSES:
        print(
            f"warning: the demo listens on {host or 'every address'}; its page signs anyone who reaches it "
            f"in as {DEMO_SUBJECT!r}. Keep it on a trusted network.",
            file=sys.stderr,
            flush=True,
        )
        return None
    return LOOPBACK_HOSTS | {f"[{host}]" if ":" in host else host}


def _bound_port(server: uvicorn.Server) -> int:
    # With port 0 the OS chose one: read it back from the listening socket.
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return int(server.config.port)


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _walkthrough(proxy_url: str, sandbox_url: str, key: str, database: Path) -> str:
    pick = "python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])'"
    return f"""
liveness-proxy demo is running.
  page:    {proxy_url}/demo/   (open it in a browser: the whole flow, step by step)
  proxy:   {proxy_url}   (OpenAPI: {proxy_url}/openapi.json, JS client: {proxy_url}/client/liveness-proxy-client.js)
  sandbox: {sandbox_url} (simulated Cynopsis API, control API on)
  data:    SQLite at {os.path.relpath(database)} (choose the folder with --dir)

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
