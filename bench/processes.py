"""The processes of a run: `Children` starts every one of them (nginx, our proxy, the naive proxy,
py-spy) in a session of its own with its output in a log file, and stops them; free loopback ports,
the open-file limit, a process's RSS and CPU time, and bench/install-tools for the tools the run drives.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import BENCH_DIR, BenchError


class Children:
    """Every process this run starts: each in a session of its own (so its own children, nginx's
    worker for one, are stopped with it), its output in a log file rather than a pipe nobody reads
    (a full pipe would stall it mid-benchmark), and all of them stopped by `stop_all()`."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._running: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self._log_dir / f"{name}.log"
        suffix = 1
        while log.exists():
            suffix += 1
            log = self._log_dir / f"{name}-{suffix}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._running.append(process)
        self._logs[process.pid] = log
        return process

    def log_tail(self, process: subprocess.Popen[bytes], chars: int = 1500) -> str:
        log = self._logs.get(process.pid)
        if log is None or not log.exists():
            return ""
        return log.read_text(errors="replace")[-chars:]

    def stop(self, process: subprocess.Popen[bytes], grace_seconds: float = 15.0) -> None:
        # Signals go to the process group whose id is the pid of the process we started, and only
        # while that process is unreaped, so the id is still ours: nobody else's process is hit.
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process in self._running:
            self._running.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._running)):
            self.stop(process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raise_open_file_limit() -> int:
    """Raises this process's soft RLIMIT_NOFILE to the hard limit; every child inherits it. S3
    holds ~1000 client plus ~1000 upstream connections in one process, past the usual 1024."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_megabytes(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    if match is None:
        raise BenchError(f"no VmRSS for pid {pid}")
    return round(int(match.group(1)) * 1024 / 1e6, 1)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def ensure_tools() -> None:
    """bench/install-tools installs wrk, nginx-light and the echo module when missing."""
    installer = BENCH_DIR / "install-tools"
    answer = subprocess.run(["bash", str(installer)], capture_output=True, text=True, check=False)
    if answer.returncode != 0:
        raise BenchError(
            "the benchmark tools are missing and could not be installed "
            f"({answer.stderr.strip() or 'bench/install-tools failed'})"
        )
