"""The nginx stubs: one nginx process (bench/stub-nginx.conf, one worker) serving the static stub of
the Cynopsis API, the nginx reference proxy, the slow (500 ms) stub and its nginx proxy, and S4's
token stub, whose log counts the token requests; its count of requests served and the log of our
proxy's reads of S1-herd's session count our proxy's Cynopsis calls.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import BENCH_DIR, BenchError
from plan import Plan
from processes import Children, free_port


@dataclass(frozen=True, slots=True)
class Stubs:
    """The one nginx process: static stub, nginx proxy, slow stub, slow nginx proxy, S4 token stub."""

    stub_port: int
    nginx_proxy_port: int
    slow_stub_port: int
    slow_nginx_proxy_port: int
    token_stub_port: int
    token_log: Path
    # Our proxy's reads of the herd session (`herd-<n>`), one line each, `$msec` first.
    herd_log: Path

    @property
    def stub(self) -> str:
        return f"http://127.0.0.1:{self.stub_port}"

    @property
    def nginx_proxy(self) -> str:
        return f"http://127.0.0.1:{self.nginx_proxy_port}"

    @property
    def slow_stub(self) -> str:
        return f"http://127.0.0.1:{self.slow_stub_port}"

    @property
    def slow_nginx_proxy(self) -> str:
        return f"http://127.0.0.1:{self.slow_nginx_proxy_port}"

    @property
    def token_stub(self) -> str:
        return f"http://127.0.0.1:{self.token_stub_port}"

    def ports(self) -> tuple[int, ...]:
        return (
            self.stub_port,
            self.nginx_proxy_port,
            self.slow_stub_port,
            self.slow_nginx_proxy_port,
            self.token_stub_port,
        )


def render_nginx_conf(stubs: Stubs, *, token_lifetime_seconds: int, open_files: int) -> str:
    text = (BENCH_DIR / "stub-nginx.conf").read_text()
    values = {
        "stub_port": stubs.stub_port,
        "nginx_proxy_port": stubs.nginx_proxy_port,
        "slow_stub_port": stubs.slow_stub_port,
        "slow_nginx_proxy_port": stubs.slow_nginx_proxy_port,
        "token_stub_port": stubs.token_stub_port,
        "token_log": stubs.token_log,
        "herd_log": stubs.herd_log,
        "token_lifetime": token_lifetime_seconds,
        "nofile": open_files,
    }
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    leftover = re.search(r"\{\{\w+\}\}", text)
    if leftover:
        raise BenchError(f"bench/stub-nginx.conf: no value for {leftover.group(0)}")
    return text


def nginx_binary() -> str:
    found = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if found is None:
        raise BenchError("nginx is not installed (bench/install-tools installs nginx-light)")
    return found


def start_nginx(children: Children, prefix: Path, plan: Plan, open_files: int) -> Stubs:
    stubs = Stubs(
        stub_port=free_port(),
        nginx_proxy_port=free_port(),
        slow_stub_port=free_port(),
        slow_nginx_proxy_port=free_port(),
        token_stub_port=free_port(),
        token_log=prefix / "s4-token-requests.log",
        herd_log=prefix / "s1-herd-calls.log",
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_nginx_conf(stubs, token_lifetime_seconds=plan.token_lifetime_seconds, open_files=open_files)
    )
    process = children.start(
        "nginx", [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    )
    deadline = time.monotonic() + 15
    for port in stubs.ports():
        while True:
            if process.poll() is not None:
                errors = (
                    (prefix / "error.log").read_text(errors="replace")
                    if (prefix / "error.log").exists()
                    else ""
                )
                raise BenchError(f"nginx exited at start-up: {children.log_tail(process)} {errors[-1500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"nginx did not listen on {port}")
            time.sleep(0.02)
    return stubs


def requests_served(stubs: Stubs) -> int:
    """Requests the nginx process has served so far, every server together (stub_status). Read
    around one of our proxy's windows, the difference is its Cynopsis calls (nothing else talks to
    nginx then), plus this request itself."""
    answer = httpx.get(f"{stubs.stub}/bench/stub_status", timeout=10)
    match = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", answer.text, re.MULTILINE)
    if answer.status_code != 200 or match is None:
        raise BenchError(f"nginx stub_status: unexpected answer {answer.status_code}: {answer.text[:300]}")
    return int(match.group(1))


def token_request_times(log: Path) -> list[float]:
    """Epoch times of the S4 token stub's requests (or of S1-herd's Cynopsis calls: the same
    format), one log line each ($msec first)."""
    if not log.exists():
        return []
    return [float(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]
