"""What one `serve` replica holds: memory, database and Redis connections, idle and under load.

    .venv/bin/python bench/replica_footprint.py [--backend postgres-redis|sqlite] [--seconds 10]
                                                [--connections 64]

Starts the sandbox upstream (`liveness-proxy sandbox`) and one `serve` process (one worker, audit
on, API-key auth) on a scratch PostgreSQL database and Redis key prefix (or SQLite), creates a
session, then drives authenticated result reads with wrk (Debian package `wrk`) for `--seconds`.
Prints one JSON object: RSS idle and after the load, the connections the replica holds in
PostgreSQL (pg_stat_activity) and Redis (CLIENT LIST) after the load, and wrk's request rate and
latency. A sizing reading, not a benchmark: the load generator, the sandbox and the replica share
the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

COMMAND = str(Path(sys.executable).parent / "liveness-proxy")
POSTGRES_ADMIN_URL = os.environ.get("LIVENESS_PROXY_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LIVENESS_PROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLIENT_ID, CLIENT_SECRET, DOMAIN_ID = "bench-client", "bench-secret-0123456789", "bench-domain"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return round(int(match.group(1)) / 1024, 1) if match else float("nan")


async def admin(statement: str, dsn: str = POSTGRES_ADMIN_URL) -> Any:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(statement)
    finally:
        await connection.close()


def _find(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: exited during start-up")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url}: not ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["postgres-redis", "sqlite"], default="postgres-redis")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    workdir = Path(tempfile.mkdtemp(prefix="lp-footprint-"))
    database = f"lp_bench_{secrets.token_hex(4)}"
    prefix = f"lp-bench-{secrets.token_hex(4)}:"
    sandbox_port, proxy_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{sandbox_port}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))
    }
    env.update(
        {
            "CYNOPSIS_TOKEN_URL": f"{upstream}/oauth/token",
            "CYNOPSIS_API_BASE_URL": upstream,
            "CYNOPSIS_CLIENT_ID": CLIENT_ID,
            "CYNOPSIS_CLIENT_SECRET": CLIENT_SECRET,
            "CYNOPSIS_DOMAIN_ID": DOMAIN_ID,
            "LIVENESS_PROXY_API_KEY_PEPPER": secrets.token_urlsafe(48),
            "LIVENESS_PROXY_RATE_LIMIT_RESULT": "100000000/minute",
            "LIVENESS_PROXY_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        }
    )
    if args.backend == "postgres-redis":
        asyncio.run(admin(f'CREATE DATABASE "{database}"'))
        env["LIVENESS_PROXY_DATABASE_URL"] = re.sub(r"/[^/]*$", f"/{database}", POSTGRES_ADMIN_URL)
        env["LIVENESS_PROXY_REDIS_URL"] = REDIS_URL
        env["LIVENESS_PROXY_REDIS_KEY_PREFIX"] = prefix
    processes: list[subprocess.Popen[bytes]] = []
    try:
        sandbox = subprocess.Popen(
            [COMMAND, "sandbox", "--port", str(sandbox_port), "--client-id", CLIENT_ID,
             "--client-secret", CLIENT_SECRET, "--domain-id", DOMAIN_ID],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(sandbox)
        created = subprocess.run(
            [COMMAND, "keys", "create", "--subject", "bench"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        proxy = subprocess.Popen(
            [COMMAND, "serve", "--port", str(proxy_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(proxy)
        base = f"http://127.0.0.1:{proxy_port}"
        wait_ready(f"{base}/readyz", proxy)
        auth = {"Authorization": f"Bearer {key}"}
        token = httpx.post(f"{base}/v1/liveness/session-token", headers=auth).json()["session_token"]
        session = httpx.post(f"{base}/v1/liveness/sessions", headers=auth, json={"session_token": token})
        result_url = f"{base}/v1/liveness/sessions/{session.json()['session_id']}/result"
        time.sleep(1)
        idle_rss = rss_mib(proxy.pid)
        wrk = subprocess.run(
            ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
             "-H", f"Authorization: Bearer {key}", result_url],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        loaded_rss = rss_mib(proxy.pid)
        reading: dict[str, Any] = {
            "backend": args.backend,
            "connections": args.connections,
            "seconds": args.seconds,
            "rss_idle_mib": idle_rss,
            "rss_after_load_mib": loaded_rss,
            "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout).group(1)),  # type: ignore[union-attr]
            "latency": dict(re.findall(r"\s+(50|99)%\s+(\S+)", wrk.stdout)),
            "non_2xx": int(m.group(1))
            if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", wrk.stdout))
            else 0,
        }
        if args.backend == "postgres-redis":
            name = f"liveness-proxy:{proxy.pid}"  # the connection names the proxy gives itself
            reading["postgres_connections"] = asyncio.run(
                admin(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'")
            )
            client = redis.Redis.from_url(REDIS_URL)
            reading["redis_connections"] = sum(
                1 for entry in client.client_list() if entry.get("name") == name
            )
            client.close()
        print(json.dumps(reading, indent=2))
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        if args.backend == "postgres-redis":
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
            client.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
