"""The proxies under measurement: ours (`liveness-proxy serve`, with its settings and API key) and the
naive FastAPI + httpx one (bench/naive_proxy.py), and `Bench`, one run's scratch space, processes and
stubs, which every scenario is handed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from common import BENCH_DIR, COMMAND, SESSION_TOKEN_PATH, SESSIONS_PATH, BenchError
from plan import Plan
from processes import Children, free_port
from stubs import Stubs

# Limits our proxy must run with so that none of them is what a benchmark measures.
UNLIMITED_RATE = "100000000/minute"
CLIENT_ID, CLIENT_SECRET, DOMAIN_ID = "bench-client", "bench-client-secret-0123456789", "bench-domain"
# S2's create (bench/post_session.lua) sends every system the same request: a fixed session token
# and a `metadata` member (the ~2 KiB padding). Since request integrity (issue 17) our proxy takes
# that only with token binding off (a token it did not hand to this caller is refused) and `metadata`
# declared as an extra body member (an undeclared one is refused); so the proxies that serve S2 run
# with both, and S2 keeps measuring what it measured before, like for like with nginx and the naive
# proxy. What binding and idempotency cost is measured apart (S2b, S2i: scenarios/s2_costs.py).
PLAIN_CREATE_SETTINGS = {
    "LIVENESS_PROXY_SESSION_TOKEN_BINDING": "false",
    "LIVENESS_PROXY_EXTRA_BODY_FIELDS": "metadata",
}
# As shipped: the per-request access line (info) is written, to a log file in the scratch directory,
# as a deployment would. nginx and the naive proxy log nothing per request; that is their advantage.
PROXY_LOG_LEVEL = "info"


@dataclass(frozen=True, slots=True)
class Proxy:
    """One started proxy process: ours (with its API key) or the naive one (no key)."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


@dataclass(slots=True)
class Bench:
    """One run's scratch space, processes and stubs; what every scenario is handed."""

    plan: Plan
    workdir: Path
    children: Children
    stubs: Stubs
    pepper: str
    settings_used: dict[str, dict[str, str]]
    naive_requests_served: int = 0

    def our_env(
        self, label: str, *, database_url: str, api_base: str, token_url: str, **extra: str
    ) -> dict[str, str]:
        """The environment of one of our proxy processes; recorded (without secrets) under `label`."""
        # Nothing of the caller's own proxy configuration may leak into the measured processes; nor
        # its OpenTelemetry settings: tracing is on only where a scenario turns it on (S1t).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CYNOPSIS_", "LIVENESS_PROXY_", "OTEL_"))
        }
        settings = {
            "CYNOPSIS_TOKEN_URL": token_url,
            "CYNOPSIS_API_BASE_URL": api_base,
            "CYNOPSIS_CLIENT_ID": CLIENT_ID,
            "CYNOPSIS_CLIENT_SECRET": CLIENT_SECRET,
            "CYNOPSIS_DOMAIN_ID": DOMAIN_ID,
            "LIVENESS_PROXY_API_KEY_PEPPER": self.pepper,
            "LIVENESS_PROXY_DATABASE_URL": database_url,
            "LIVENESS_PROXY_RATE_LIMIT_RESULT": UNLIMITED_RATE,
            "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": UNLIMITED_RATE,
            "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": UNLIMITED_RATE,
            "LIVENESS_PROXY_DAILY_ATTEMPTS": "0",  # 0: no daily cap
            "LIVENESS_PROXY_LOG_LEVEL": PROXY_LOG_LEVEL,
            # Off unless a scenario turns it on (S7 measures what it costs): on, every session S2
            # creates would be followed for minutes after S2's window, taking CPU from whatever is
            # measured next (nginx and the naive proxy in S2's own repetitions, then S3-S6).
            "LIVENESS_PROXY_FINALIZER": "off",
            **extra,
        }
        env.update(settings)
        hidden = ("CYNOPSIS_CLIENT_SECRET", "LIVENESS_PROXY_API_KEY_PEPPER", "LIVENESS_PROXY_WEBHOOK_SECRET")
        self.settings_used.setdefault(
            label,
            {
                name: "(random, hidden)" if name in hidden else redact_database_url(value)
                for name, value in sorted(settings.items())
            },
        )
        return env

    def sqlite_url(self, name: str) -> str:
        return f"sqlite:///{self.workdir / f'{name}.db'}"

    def start_ours(self, name: str, env: Mapping[str, str], *, key: str | None = None) -> Proxy:
        """`liveness-proxy serve` (one worker, audit on); issues an API key first unless given one
        (issuing also migrates the database, so `serve` starts on a ready schema)."""
        if key is None:
            key = issue_api_key(env, self.workdir)
        port = free_port()
        # cwd is the scratch directory: Settings also reads a `.env` in the working directory.
        process = self.children.start(
            name, [COMMAND, "serve", "--port", str(port)], env=env, cwd=self.workdir
        )
        return Proxy(name=name, process=process, url=f"http://127.0.0.1:{port}", key=key)

    def start_naive(self, name: str, upstream: str) -> Proxy:
        port = free_port()
        env = {**os.environ, "UPSTREAM": upstream}
        process = self.children.start(
            name,
            [
                sys.executable, "-m", "uvicorn", "naive_proxy:app", "--app-dir", str(BENCH_DIR),
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
            ],
            env=env,
            cwd=self.workdir,
        )  # fmt: skip
        return Proxy(name=name, process=process, url=f"http://127.0.0.1:{port}")

    def wait_ok(self, proxy: Proxy, path: str, timeout_seconds: float = 60.0) -> None:
        """Until `path` answers 200 (our /readyz also fetches the first upstream token)."""
        deadline = time.monotonic() + timeout_seconds
        last = "no answer"
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if proxy.process.poll() is not None:
                    raise BenchError(
                        f"{proxy.name} exited during start-up: {self.children.log_tail(proxy.process)}"
                    )
                try:
                    answer = client.get(proxy.url + path, headers=proxy.headers())
                    if answer.status_code == 200:
                        return
                    last = f"HTTP {answer.status_code}: {answer.text[:300]}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                time.sleep(0.05)
        raise BenchError(f"{proxy.name}: {path} not 200 within {timeout_seconds:.0f} s ({last})")


def redact_database_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return value


def issue_api_key(env: Mapping[str, str], cwd: Path) -> str:
    answer = subprocess.run(
        [COMMAND, "keys", "create", "--subject", "bench", "--json"],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if answer.returncode != 0:
        raise BenchError(f"keys create failed: {answer.stderr.strip()[-1500:]}")
    return str(json.loads(answer.stdout.strip().splitlines()[-1])["key"])


def create_session(proxy: Proxy) -> str:
    """A session of our proxy's caller (session token, then create): result reads need one."""
    with httpx.Client(base_url=proxy.url, headers=proxy.headers(), timeout=30) as client:
        token = client.post(SESSION_TOKEN_PATH, json={})
        if token.status_code != 200:
            raise BenchError(f"{proxy.name}: session-token answered {token.status_code}: {token.text[:500]}")
        created = client.post(SESSIONS_PATH, json={"session_token": token.json()["session_token"]})
        if created.status_code != 201:
            raise BenchError(
                f"{proxy.name}: create session answered {created.status_code}: {created.text[:500]}"
            )
        return str(created.json()["session_id"])


def sample_failure(proxy: Proxy, method: str, path: str, body: bytes | None = None) -> str:
    """One request like the benchmark's, for the report when wrk counted non-2xx answers."""
    headers = proxy.headers()
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        answer = httpx.request(method, proxy.url + path, headers=headers, content=body, timeout=10)
    except httpx.TransportError as exc:
        return f"transport error {type(exc).__name__}"
    return f"HTTP {answer.status_code}: {answer.text[:500]}"
