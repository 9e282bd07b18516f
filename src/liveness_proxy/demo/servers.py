"""What `liveness-proxy demo` runs, started and stopped as one: the sandbox Cynopsis API on its own
port, and on the other the demo page's app with the proxy mounted in it, configured the way the demo
needs (SQLite in the demo folder, the demo IdP's key, a fresh demo API key, and the demo server
itself as the proxy's webhook receiver, with a secret made for this run)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from liveness_proxy.app import create_app
from liveness_proxy.auth import new_api_key
from liveness_proxy.demo.identity import DEMO_AUDIENCE, DEMO_ISSUER, DemoIdentityProvider
from liveness_proxy.demo.web import WEBHOOK_PATH, create_demo_app
from liveness_proxy.sandbox import Sandbox, SandboxConfig
from liveness_proxy.sandbox.local_only import hosts_to_answer
from liveness_proxy.settings import Settings, settings_from_mapping
from liveness_proxy.store import ApiKeyStore, create_engine, upgrade_database
from liveness_proxy.webhook_signing import new_webhook_secret
from liveness_proxy.wiring.parts import privacy_keys

DEMO_SUBJECT = "demo-user"
# The finalizer reads every second at first, so a capture's verdict reaches the demo's backend within
# a second or two even when the page was closed; then less often. The sandbox expires an untouched
# session after 180 s, which the read at 180 s reports (a `liveness.session.expired` webhook).
DEMO_FINALIZER_SCHEDULE = (*range(1, 11), *range(12, 31, 2), *range(35, 121, 5), *range(135, 241, 15))
# The receiver is this process: a failed delivery is a bug to see at once, not an outage to wait out.
DEMO_WEBHOOK_RETRY_SCHEDULE = (0, 1, 2, 5, 10, 30, 60, 120, 300)
DEMO_WORKER_INTERVAL_SECONDS = 0.5


class DemoDidNotStart(Exception):
    """A server of the demo ended during its start-up (uvicorn has said why)."""


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (two servers share one loop here)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class RunningDemo:
    proxy_url: str
    sandbox_url: str
    api_key: str  # the demo key for DEMO_SUBJECT, made this run (shown once by the walkthrough)
    database: Path
    webhook_url: str | None  # None: the demo listens on no loopback address, so no webhooks
    settings: Settings


@contextlib.asynccontextmanager
async def serving_demo(
    *,
    directory: str,
    host: str,
    sandbox_sockets: Sequence[socket.socket],
    proxy_sockets: Sequence[socket.socket],
    quiet: bool = False,
) -> AsyncIterator[RunningDemo]:
    """Starts the sandbox, then the proxy and page, on the sockets given (bound, not listening);
    stops both on exit. DemoDidNotStart when either ends during start-up. `quiet`: the proxy logs
    warnings only."""
    folder, pepper = await asyncio.to_thread(_prepare_folder, directory)
    identity = DemoIdentityProvider(subject=DEMO_SUBJECT)
    public_key_file = await asyncio.to_thread(_write_public_key, folder, identity)
    sandbox_secret = secrets.token_urlsafe(24)  # new every run: nothing to leak between runs
    # The page and the sandbox's control API answer under the same names.
    allowed_hosts = _allowed_hosts(host)
    sandbox = Sandbox(
        SandboxConfig(
            client_id="demo-client",
            client_secret=sandbox_secret,
            domain_id="demo-domain",
            control_enabled=True,
            control_hosts=allowed_hosts,
        )
    )
    sandbox_server = EmbeddedServer(
        uvicorn.Config(sandbox.app, host=host, port=0, log_level="warning", lifespan="off")
    )
    async with _served(sandbox_server, sandbox_sockets):
        sandbox_url = f"http://{host}:{_bound_port(sandbox_server)}"
        webhook_url = loopback_webhook_url(proxy_sockets)
        webhook_secret = new_webhook_secret() if webhook_url else None  # new every run, never shown
        database = folder / "liveness-proxy.db"
        settings = demo_settings(
            sandbox_url=sandbox_url,
            sandbox_secret=sandbox_secret,
            database=database,
            pepper=pepper,
            public_key_file=public_key_file,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            quiet=quiet,
        )
        api_key = await _prepare_database(settings)
        proxy_server = EmbeddedServer(
            uvicorn.Config(
                create_demo_app(
                    proxy=create_app(settings),
                    sandbox=sandbox,
                    sandbox_url=sandbox_url,
                    identity=identity,
                    client_secret=sandbox_secret,
                    allowed_hosts=allowed_hosts,
                    webhook_secret=webhook_secret,
                    webhook_url=webhook_url,
                ),
                host=host,
                port=0,
                log_level="warning",
                access_log=False,
                server_header=False,
            )
        )
        async with _served(proxy_server, proxy_sockets):
            yield RunningDemo(
                proxy_url=f"http://{host}:{_bound_port(proxy_server)}",
                sandbox_url=sandbox_url,
                api_key=api_key,
                database=database,
                webhook_url=webhook_url,
                settings=settings,
            )


def demo_settings(
    *,
    sandbox_url: str,
    sandbox_secret: str,
    database: Path,
    pepper: str,
    public_key_file: Path,
    webhook_url: str | None,
    webhook_secret: str | None,
    quiet: bool,
) -> Settings:
    """The proxy's settings in the demo: explicit values only, nothing from the environment."""
    values: dict[str, Any] = {
        "CYNOPSIS_TOKEN_URL": f"{sandbox_url}/oauth/token",
        "CYNOPSIS_API_BASE_URL": sandbox_url,
        "CYNOPSIS_CLIENT_ID": "demo-client",
        "CYNOPSIS_CLIENT_SECRET": sandbox_secret,
        "CYNOPSIS_DOMAIN_ID": "demo-domain",
        "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{database}",
        "LIVENESS_PROXY_API_KEY_PEPPER": pepper,
        # The demo page signs in with the demo IdP's JWTs: the proxy checks them like any other.
        "LIVENESS_PROXY_JWT_PUBLIC_KEY_FILE": str(public_key_file),
        "LIVENESS_PROXY_JWT_ISSUER": DEMO_ISSUER,
        "LIVENESS_PROXY_JWT_AUDIENCE": DEMO_AUDIENCE,
        "LIVENESS_PROXY_JWT_ALGORITHMS": "ES256",
        "LIVENESS_PROXY_LOG_FORMAT": "console",
        "LIVENESS_PROXY_LOG_LEVEL": "warning" if quiet else "info",
        "LIVENESS_PROXY_FINALIZER": True,
        "LIVENESS_PROXY_FINALIZER_SCHEDULE": ",".join(map(str, DEMO_FINALIZER_SCHEDULE)),
        "LIVENESS_PROXY_WORKER_INTERVAL_SECONDS": DEMO_WORKER_INTERVAL_SECONDS,
    }
    if webhook_url and webhook_secret:
        values |= {
            "LIVENESS_PROXY_WEBHOOK_URL": webhook_url,
            "LIVENESS_PROXY_WEBHOOK_SECRET": webhook_secret,
            "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": ",".join(map(str, DEMO_WEBHOOK_RETRY_SCHEDULE)),
            "LIVENESS_PROXY_WEBHOOK_TIMEOUT_SECONDS": 5,
        }
    return settings_from_mapping(values)


@contextlib.asynccontextmanager
async def _served(server: EmbeddedServer, sockets: Sequence[socket.socket]) -> AsyncIterator[None]:
    task = asyncio.create_task(server.serve(sockets=list(sockets)))
    try:
        while not server.started:
            if task.done():
                raise DemoDidNotStart
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await task


def loopback_webhook_url(proxy_sockets: Sequence[socket.socket]) -> str | None:
    """Where the proxy reaches the demo's backend route: a loopback address the demo listens on
    (the proxy posts webhooks over plain http to loopback only). IPv4 first."""
    candidates = []
    for listener in proxy_sockets:
        address, port = listener.getsockname()[:2]
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        if ip.is_unspecified:  # every address of its family, loopback among them
            ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        if ip.is_loopback:
            name = f"[{ip}]" if ip.version == 6 else str(ip)
            candidates.append((ip.version, f"http://{name}:{port}{WEBHOOK_PATH}"))
    return min(candidates)[1] if candidates else None


async def _prepare_database(settings: Settings) -> str:
    """Migrates the demo database and adds a fresh demo API key; the key, shown once."""
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        await upgrade_database(engine, keys=privacy_keys(settings))
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
    return issued.key


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


def _allowed_hosts(host: str) -> frozenset[str] | None:
    """Host names the demo page answers under: loopback and the address it listens on. Listening on
    every address means "reach me by any name", so then any, with a warning: the page signs anyone
    in as the demo user."""
    allowed = hosts_to_answer(host)
    if allowed is None:
        print(
            f"warning: the demo listens on {host or 'every address'}; its page signs anyone who reaches it "
            f"in as {DEMO_SUBJECT!r}. Keep it on a trusted network.",
            file=sys.stderr,
            flush=True,
        )
    return allowed


def _bound_port(server: uvicorn.Server) -> int:
    # With port 0 the OS chose one: read it back from the listening socket.
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return int(server.config.port)
