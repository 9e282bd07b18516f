"""Test harness: real servers on loopback (uvicorn), or an app driven in-process through ASGI, each in
a thread with its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message

from liveness_proxy.app import create_app
from liveness_proxy.auth import IssuedApiKey, new_api_key
from liveness_proxy.sandbox import ManualClock, Sandbox, SandboxConfig
from liveness_proxy.settings import Settings, settings_from_mapping
from liveness_proxy.store import ApiKeyStore, AuditLog, create_engine, upgrade_database
from liveness_proxy.store.audit_chain import AuditRecord, parse_audit_keys, personal_values
from liveness_proxy.store.database import MigrationKeys
from liveness_proxy.store.subjects import SubjectKeys, SubjectRegistry
from liveness_proxy.wiring import Service

TEST_PEPPER = "test-pepper-" + "p" * 40
# The keys every test proxy derives from TEST_PEPPER (no keys file, no subject key): what a test
# that reads or writes the chain outside a proxy uses.
TEST_KEYS = MigrationKeys(
    audit=parse_audit_keys("", pepper=TEST_PEPPER),
    subjects=SubjectKeys.from_settings_values(pepper=TEST_PEPPER, subject_key=""),
)
TEST_AUDIT_KEYS = TEST_KEYS.audit


def failed_authentication_record(
    address: str, *, occurred_at: float, request_id: str = "failed", failures: int = 3
) -> AuditRecord:
    """An `auth.failed` aggregate record whose client address sits in `personal`, beside its
    commitment, as `store/failed_authentications.py` writes one."""
    personal, commitment = personal_values({"client_address": address})
    return AuditRecord(
        occurred_at=occurred_at,
        request_id=request_id,
        subject=None,
        credential_id=None,
        action="auth.failed",
        session_id=None,
        status=401,
        upstream_status=None,
        latency_ms=0.0,
        problem="unauthenticated",
        detail=f'{{"credential":"api_key","failures":{failures}}}',
        personal=personal,
        personal_commitment=commitment,
    )


CLIENT_ID = "test-client"
CLIENT_SECRET = "test-client-secret-s3cr3t-value"
DOMAIN_ID = "test-domain"


T = TypeVar("T")

# What must never appear in any log line of the proxy (the whole suite's logs are scanned for these):
# the client secret and pepper, sandbox access tokens (sbx_) and session tokens (sst_), API keys
# with their secret part, JWTs, webhook secrets, and the base64 PNG signature that starts every
# sandbox image.
LEAK_PATTERNS = re.compile(
    "|".join(
        (
            re.escape(CLIENT_SECRET),
            re.escape(TEST_PEPPER),
            r"sbx_[A-Za-z0-9_-]{8,}",
            r"sst_[A-Za-z0-9_-]{8,}",
            r"lpk_[0-9a-f]{16}_[A-Za-z0-9_-]{8,}",
            r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.",
            r"whsec_[A-Za-z0-9+/=]{8,}",
            "iVBORw0KGg",
        )
    )
)


def wait_until(condition: Callable[[], T], *, timeout: float = 10.0) -> T:
    """Polls `condition` until it returns something true, and returns that; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def find_leaks(text: str) -> list[str]:
    """Every secret-shaped match in `text`, each cut short so a report never repeats a whole secret."""
    return [match.group(0)[:12] + "…" for match in LEAK_PATTERNS.finditer(text)]


@dataclass
class LogScan:
    """Collects, over a whole test run, how much proxy log was scanned and what leaked into it."""

    lines_scanned: int = 0
    leaks: list[str] = field(default_factory=list)

    def scan(self, origin: str, text: str) -> None:
        self.lines_scanned += text.count("\n")
        self.leaks.extend(f"{origin}: {leak}" for leak in find_leaks(text))


@contextlib.contextmanager
def background_command(
    args: Sequence[str], *, env: dict[str, str], output: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A command running for the length of the block, its output (stdout and stderr) in `output`: a
    file, because nobody reads a pipe while the test runs and a full one would stall the command.
    On exit: SIGTERM, then SIGKILL to its whole process group if it has not stopped within 30 s (it
    runs in a session of its own, so a hung worker dies with its supervisor)."""
    with output.open("wb") as sink:
        process = subprocess.Popen(
            list(args), cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class _PromptServer(uvicorn.Server):
    """uvicorn's Server, looking at `should_exit` every 10 ms instead of every 100 ms: stopping a
    server is paid by every test that starts one (its `on_tick` still refreshes the Date header
    and checks the limits, only more often)."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.01)
            should_exit = await self.on_tick(counter)


class ServerThread:
    """Runs an ASGI app under uvicorn on 127.0.0.1 and an OS-chosen port, in a background thread.

    With `ssl_certfile` (and `ssl_keyfile`) it serves HTTPS; with `ssl_ca_certs` too it asks for a
    client certificate signed by those CAs, and with `require_client_certificate` it refuses a
    client without one."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifespan: str = "on",
        ssl_certfile: Path | None = None,
        ssl_keyfile: Path | None = None,
        ssl_ca_certs: Path | None = None,
        require_client_certificate: bool = False,
    ) -> None:
        tls: dict[str, Any] = {}
        if ssl_certfile is not None:
            tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": ssl_keyfile and str(ssl_keyfile)}
            if ssl_ca_certs is not None:
                tls["ssl_ca_certs"] = str(ssl_ca_certs)
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
        self.scheme = "https" if ssl_certfile is not None else "http"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan=lifespan,  # type: ignore[arg-type]
            access_log=False,
            loop="asyncio",
            **tls,
        )
        self.server = _PromptServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 15.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.005)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class InProcessApp:
    """An ASGI app served without a socket: its lifespan and every request run on one event loop in a
    thread of its own (as under uvicorn), and `transport()` hands each httpx request to it through
    ASGI. For behaviour that needs no real server; tests where the socket is the point (raw bytes,
    connection handling, other clients on the URL) use `ServerThread`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._to_app: asyncio.Queue[Message] | None = None
        self._from_app: asyncio.Queue[Message] | None = None
        self._lifespan: asyncio.Future[None] | None = None

    def start(self, timeout: float = 15.0) -> InProcessApp:
        self.thread.start()
        self.call(self._lifespan_event("startup"), timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        try:
            self.call(self._lifespan_event("shutdown"), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=timeout)
            self.loop.close()

    def call(self, coroutine: Any, timeout: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _lifespan_event(self, event: str) -> None:
        """The ASGI lifespan protocol, as uvicorn speaks it: one long-lived call of the app."""
        if self._lifespan is None:
            to_app = self._to_app = asyncio.Queue()
            from_app = self._from_app = asyncio.Queue()
            scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
            self._lifespan = asyncio.ensure_future(self.app(scope, to_app.get, from_app.put))
        assert self._to_app is not None
        assert self._from_app is not None
        await self._to_app.put({"type": f"lifespan.{event}"})
        answer = asyncio.ensure_future(self._from_app.get())
        pending: set[asyncio.Future[Any]] = {answer, self._lifespan}
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done():
            answer.cancel()
            self._lifespan.result()  # the app's own exception, if it raised
            raise RuntimeError(f"the app ended its lifespan without answering lifespan.{event}")
        message = answer.result()
        if message["type"] != f"lifespan.{event}.complete":
            raise RuntimeError(f"lifespan.{event} failed: {message.get('message', message)}")
        if event == "shutdown":
            await self._lifespan

    def transport(self) -> httpx.BaseTransport:
        return _InProcessTransport(self)


class _InProcessTransport(httpx.BaseTransport):
    """A synchronous httpx transport onto an `InProcessApp`: the request body is read from the
    caller's thread chunk by chunk as the app asks for it, the answer's timeout is the client's."""

    def __init__(self, served: InProcessApp) -> None:
        self.served = served
        # An app exception becomes a 500, as a server would answer (the app's own last-resort
        # middleware should have answered already; the test sees what a client would).
        self.asgi = httpx.ASGITransport(served.app, raise_app_exceptions=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        chunks = iter(request.stream)
        loop = self.served.loop

        async def body() -> AsyncIterator[bytes]:
            while (chunk := await loop.run_in_executor(None, next, chunks, None)) is not None:
                yield chunk

        async def exchange() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            forwarded = httpx.Request(
                request.method, request.url, headers=request.headers, stream=_AsyncBody(body())
            )
            answer = await self.asgi.handle_async_request(forwarded)
            content = await answer.aread()
            return answer.status_code, answer.headers.raw, content

        read_timeout = request.extensions.get("timeout", {}).get("read")
        future = asyncio.run_coroutine_threadsafe(exchange(), loop)
        try:
            status, headers, content = future.result(read_timeout)
        except TimeoutError as exc:
            future.cancel()
            raise httpx.ReadTimeout("the in-process app did not answer in time", request=request) from exc
        return httpx.Response(status, headers=headers, content=content, request=request)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk


@dataclass
class Keys:
    alice: str
    bob: str
    admin: str
    revocable: str
    revocable_id: str


@dataclass
class ProxyHarness:
    """A proxy and its sandbox upstream, sharing one manual clock. The sandbox is served over
    loopback; the proxy too (`url`), or, `in_process`, driven through ASGI without a socket (its
    `client()` is all there is)."""

    base_url: str
    sandbox: Sandbox
    sandbox_url: str
    clock: ManualClock
    settings: Settings
    keys: Keys
    log: io.StringIO
    app: Any
    responses: list[bytes] = field(default_factory=list)
    in_process: InProcessApp | None = None

    @property
    def url(self) -> str:
        """The proxy's URL on loopback; an in-process proxy has none."""
        if self.in_process is not None:
            raise AssertionError(
                "this proxy runs in-process, without a socket: use proxy.client(), or mark the test "
                "@pytest.mark.served to have it served by uvicorn on loopback"
            )
        return self.base_url

    @property
    def runtime(self) -> Service:
        service: Service = self.app.service
        return service

    def client(self) -> httpx.Client:
        """A client for the proxy that keeps every response (headers and body) for leak scans."""

        def keep(response: httpx.Response) -> None:
            response.read()
            self.responses.append(str(response.headers).encode() + b"\n" + response.content)

        transport = self.in_process.transport() if self.in_process is not None else None
        return httpx.Client(
            base_url=self.base_url, transport=transport, event_hooks={"response": [keep]}, timeout=10
        )

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.keys.alice}"}

    def log_text(self) -> str:
        return self.log.getvalue()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The proxy's JSON log lines whose event is `event`."""
        lines = [orjson.loads(line) for line in self.log_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == event]

    def access_line(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The access-log line of one request; waits for it (it is written just after the answer is sent)."""
        deadline = time.monotonic() + timeout
        while not (lines := [e for e in self.log_events("request") if e["request_id"] == request_id]):
            assert time.monotonic() < deadline, f"no access-log line for {request_id}"
            time.sleep(0.01)
        [line] = lines
        return line

    def upstream_paths(self) -> list[str]:
        return [record.raw_path for record in self.sandbox.request_log]

    def result_reads(self, session_id: str) -> int:
        """How often the sandbox was asked for this session's result (by callers or the finalizer)."""
        return sum(path.endswith(f"/liveness_result/{session_id}") for path in self.upstream_paths())

    def create_session(self, client: httpx.Client, key: str | None = None) -> str:
        """Session token, then session, through the proxy; returns the bound session id."""
        token = client.post("/v1/liveness/session-token", headers=self.auth(key)).json()["session_token"]
        response = client.post("/v1/liveness/sessions", headers=self.auth(key), json={"session_token": token})
        assert response.status_code == 201, response.text
        session_id: str = response.json()["session_id"]
        assert response.headers["location"] == f"/v1/liveness/sessions/{session_id}/result"
        return session_id

    def audit_rows(self) -> list[dict[str, Any]]:
        """Every audit record, read through a separate engine (so only committed rows are seen)."""

        async def read() -> list[dict[str, Any]]:
            async with self.database() as engine:
                return [row async for row in AuditLog(engine, TEST_AUDIT_KEYS).iterate()]

        return asyncio.run(read())

    def commitment_of(self, subject: str) -> str | None:
        """The subject's current commitment (None: it has no secret), read from the database."""

        async def read() -> str | None:
            async with self.database() as engine:
                found = await SubjectRegistry(engine, TEST_KEYS.subjects).find(subject)
                return None if found is None else found.commitment

        return asyncio.run(read())

    def flush_failed_authentications(self) -> None:
        """Writes the proxy's aggregate records of failed authentications now (they are otherwise
        written when their window ends), on the app's own loop."""
        if self.in_process is None:
            raise AssertionError("flush_failed_authentications needs the in-process proxy")
        self.in_process.call(self.runtime.failed_authentications.flush(), 10)

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[AsyncEngine]:
        """An engine of the test's own on the proxy's database."""
        engine = create_engine(self.settings.database_url, pool_size=1)
        try:
            yield engine
        finally:
            await engine.dispose()


def subprocess_env(upstream_url: str, database_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a `liveness-proxy` subprocess: this process's own without any proxy
    setting, plus the sandbox upstream, its credentials, the database and `extra`."""
    values = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CYNOPSIS_", "LIVENESS_PROXY_", "OTEL_", "FORWARDED_ALLOW_IPS"))
    }
    values.update(
        {
            "CYNOPSIS_TOKEN_URL": f"{upstream_url}/oauth/token",
            "CYNOPSIS_API_BASE_URL": upstream_url,
            "CYNOPSIS_CLIENT_ID": CLIENT_ID,
            "CYNOPSIS_CLIENT_SECRET": CLIENT_SECRET,
            "CYNOPSIS_DOMAIN_ID": DOMAIN_ID,
            "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{database_path}",
            "LIVENESS_PROXY_API_KEY_PEPPER": TEST_PEPPER,
            # A test that completes a session and reads it at once must not get the pending answer
            # of a read moments before (`proxy_settings` says why; `extra` may set a window).
            "LIVENESS_PROXY_RESULT_REUSE_SECONDS": "0",
            **extra,
        }
    )
    return values


def proxy_settings(sandbox_url: str, database_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "CYNOPSIS_TOKEN_URL": f"{sandbox_url}/oauth/token",
        "CYNOPSIS_API_BASE_URL": sandbox_url,
        "CYNOPSIS_CLIENT_ID": CLIENT_ID,
        "CYNOPSIS_CLIENT_SECRET": CLIENT_SECRET,
        "CYNOPSIS_DOMAIN_ID": DOMAIN_ID,
        "CYNOPSIS_TIMEOUT_SECONDS": 1.0,
        "CYNOPSIS_CONNECT_TIMEOUT_SECONDS": 0.5,
        "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": 0.5,
        "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{database_path}",
        "LIVENESS_PROXY_API_KEY_PEPPER": TEST_PEPPER,
        "LIVENESS_PROXY_API_KEY_CACHE_SECONDS": 0,
        # Failed authentications are answered at once (test_auth_flood.py tests the delay).
        "LIVENESS_PROXY_FAILED_AUTH_DELAY_SECONDS": 0,
        "LIVENESS_PROXY_LOG_LEVEL": "debug",
        # Limits stay on (their code runs in every test) but high enough not to interfere;
        # tests of the limits themselves set their own.
        "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "10000/minute",
        "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "10000/minute",
        "LIVENESS_PROXY_RATE_LIMIT_RESULT": "10000/minute",
        "LIVENESS_PROXY_DAILY_ATTEMPTS": 10000,
        # The finalizer reads results upstream on its own clock, which would add calls to the
        # sandbox's log that tests of other features count; its own tests turn it on.
        "LIVENESS_PROXY_FINALIZER": False,
        # The proxy's monotonic clock is the manual clock, which stands still unless a test moves it:
        # a reuse window would then never end, and every pending read after the first would be
        # shared. Tests of the window set it (integration/test_result_reads.py).
        "LIVENESS_PROXY_RESULT_REUSE_SECONDS": 0,
    }
    values.update(overrides)
    return settings_from_mapping(values)


async def issue_keys(
    settings: Settings, callers: Sequence[tuple[str, str, list[str]]]
) -> dict[str, IssuedApiKey]:
    """Migrates the proxy's database and issues one API key per (label, subject, scopes), in-process
    (a `keys create` run per key costs a second of start-up each)."""
    engine = create_engine(settings.database_url, pool_size=1)
    pepper = settings.liveness_proxy_api_key_pepper.get_secret_value().encode()
    made = {}
    try:
        await upgrade_database(engine, keys=TEST_KEYS)
        store = ApiKeyStore(engine)
        for label, subject, scopes in callers:
            issued = new_api_key(pepper=pepper, subject=subject, scopes=scopes, name=label, now=time.time())
            await store.add(issued.stored)
            made[label] = issued
    finally:
        await engine.dispose()
    return made


async def _prepare_database(settings: Settings) -> Keys:
    made = await issue_keys(
        settings,
        [
            ("alice", "alice", []),
            ("bob", "bob", []),
            ("admin", "ops", ["liveness:admin"]),
            ("revocable", "carol", []),
        ],
    )
    return Keys(
        alice=made["alice"].key,
        bob=made["bob"].key,
        admin=made["admin"].key,
        revocable=made["revocable"].key,
        revocable_id=made["revocable"].key_id,
    )


def upstream_sandbox(**config: Any) -> Sandbox:
    """The sandbox upstream with the credentials every test proxy is configured with."""
    return Sandbox(
        SandboxConfig(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            domain_id=DOMAIN_ID,
            control_enabled=True,
            **config,
        )
    )


@dataclass
class Harness:
    """Starts and stops a sandbox + proxy pair; used by the `proxy` fixture and by tests that
    need special settings."""

    tmp_path: Path
    sandbox_config: dict[str, Any] = field(default_factory=dict)
    proxy_overrides: dict[str, Any] = field(default_factory=dict)
    # Extra keyword arguments of create_app (library mode's authenticate_caller, say).
    app_options: dict[str, Any] = field(default_factory=dict)
    log_scan: LogScan | None = None
    origin: str = "harness"
    # The proxy driven through ASGI in this process instead of served on a socket (InProcessApp).
    in_process: bool = False
    # Keys already in the proxy's database (a copy of a prepared one): no migration, no new keys.
    prepared_keys: Keys | None = None
    _servers: list[ServerThread | InProcessApp] = field(default_factory=list)
    _log: io.StringIO | None = None

    def __enter__(self) -> ProxyHarness:
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)  # whatever did start stops
            raise

    def _start(self) -> ProxyHarness:
        clock = ManualClock()
        sandbox = upstream_sandbox(clock=clock, **self.sandbox_config)
        sandbox_server = ServerThread(sandbox.app, lifespan="off")
        self._servers.append(sandbox_server)
        sandbox_server.start()
        settings = proxy_settings(sandbox_server.url, self.tmp_path / "proxy.db", **self.proxy_overrides)
        keys = self.prepared_keys or asyncio.run(_prepare_database(settings))
        log = self._log = io.StringIO()
        # The shared token store dates tokens by the same manual clock, so advancing it expires them.
        app = create_app(
            settings, clock=clock.now, shared_clock=clock.now, log_stream=log, **self.app_options
        )
        in_process: InProcessApp | None = None
        if self.in_process:
            in_process = InProcessApp(app)
            self._servers.append(in_process)
            in_process.start()
            base_url = "http://proxy.in-process"
        else:
            proxy_server = ServerThread(app)
            self._servers.append(proxy_server)
            base_url = proxy_server.start().url
        return ProxyHarness(
            base_url=base_url,
            in_process=in_process,
            sandbox=sandbox,
            sandbox_url=sandbox_server.url,
            clock=clock,
            settings=settings,
            keys=keys,
            log=log,
            app=app,
        )

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self._servers):
            server.stop()
        if self.log_scan is not None and self._log is not None:
            self.log_scan.scan(self.origin, self._log.getvalue())


def harness(tmp_path: Path, **kwargs: Any) -> Iterator[ProxyHarness]:
    with Harness(tmp_path, **kwargs) as running:
        yield running
