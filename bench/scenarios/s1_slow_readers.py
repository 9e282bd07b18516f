"""S1s: S1's result read while slow readers attack the same proxy: clients that ask for the largest
answer (`GET /openapi.json`, ~60 KB) over a 4 KiB receive buffer and never read. Half send the
review's 300 requests in one piece (the pipelining cap ends those); half keep asking, a few requests
at a time, so that answers pile up in the server (the send deadline ends those). New ones open at a
steady rate for the whole window, and the proxy's connection limit leaves room for S1's connections
plus a few: held for good, as before the send deadline, the slow readers would take every free slot
within seconds and S1 would get 503s. Target: S1 completes with 0 errors; also reported: S1's rate
beside the attack against the same proxy without it (one run, interleaved), and what the server did
with the slow readers (from the kernel's connection table, /proc/net/tcp; Linux only).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULT_PATH, progress
from proxies import Bench, Proxy, create_session, sample_failure
from stats import (
    Outcome,
    fmt_met,
    fmt_rate_and_p99,
    goal,
    interleaved,
    median_of,
    ratio,
    spread,
    summarize_all,
)
from wrk import WrkReading, run_wrk

# Short, so that a slow reader is cut within the window (30 s as shipped would outlast it).
SEND_TIMEOUT_SECONDS = 2
# For a paced reader to fill the buffers between the two ends, and for the kernel's own timeout.
CUT_MARGIN_SECONDS = 2
# The limit also counts requests that have answered but not yet finished (their access line, say):
# under load a keep-alive client may briefly hold two, so S1 alone needs twice its connections. The
# spare room is what slow readers held for good (as before the send deadline) would take within
# about 2 s.
SPARE_CONNECTIONS = 32
SLOW_READERS_PER_SECOND = 20
READER_BUFFER_BYTES = 4096
LARGE_ANSWER = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BURST_REQUESTS = 300  # the review's client: all in one piece
PACED_REQUESTS_PER_TICK = 4  # within the pipelining cap (16), as long as the server keeps up


@dataclass
class SlowReaders:
    """The attack, in a thread, for as long as the `with` block lasts; then what became of it."""

    port: int
    sockets: list[socket.socket] = field(default_factory=list)
    opened_at: dict[int, float] = field(default_factory=dict)  # client port -> time.monotonic()
    paced: list[socket.socket] = field(default_factory=list)
    held_at_most: int = 0
    resets_seen: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SlowReaders:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _open(self) -> socket.socket:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_BUFFER_BYTES)
        reader.settimeout(2)
        reader.connect(("127.0.0.1", self.port))
        reader.setblocking(False)
        self.sockets.append(reader)
        self.opened_at[reader.getsockname()[1]] = time.monotonic()
        return reader

    def _run(self) -> None:
        tick = 1 / SLOW_READERS_PER_SECOND
        while not self._stop.wait(tick):
            with contextlib.suppress(OSError):
                reader = self._open()
                if len(self.sockets) % 2:
                    self._send(reader, LARGE_ANSWER * BURST_REQUESTS)
                else:
                    self.paced.append(reader)
            for reader in list(self.paced):
                if not self._send(reader, LARGE_ANSWER * PACED_REQUESTS_PER_TICK):
                    self.paced.remove(reader)
            self.held_at_most = max(self.held_at_most, self.held_by_server(older_than=0) or 0)

    def _send(self, reader: socket.socket, data: bytes) -> bool:
        """False once the server cut the connection."""
        try:
            reader.send(data)
        except BlockingIOError:
            return True  # the server reads no more for now: the requests wait in the buffers
        except OSError:
            self.resets_seen += 1
            return False
        return True

    def held_by_server(self, older_than: float) -> int | None:
        """How many of the slow readers opened more than `older_than` seconds ago the server's kernel
        still holds (any state but TIME-WAIT, so also those closed with answers still queued); None
        off Linux."""
        table = Path("/proc/net/tcp")
        if not table.exists():
            return None
        now = time.monotonic()
        ports = {port for port, opened in self.opened_at.items() if now - opened > older_than}
        held = 0
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == self.port and int(remote.rsplit(":", 1)[1], 16) in ports:
                held += state != "06"
        return held

    def close(self) -> dict[str, Any]:
        held_past_deadline = self.held_by_server(older_than=SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS)
        for reader in self.sockets:
            reader.close()
        return {
            "opened": len(self.sockets),
            "held_by_server_at_most": self.held_at_most,
            "held_past_the_deadline_at_end": held_past_deadline,
            "resets_seen_by_the_paced": self.resets_seen,
        }


def measure(
    url: str, headers: dict[str, str], port: int, connections: int, attacks: list[dict[str, Any]],
    seconds: int, *, attacked: bool,
) -> WrkReading:  # fmt: skip
    """One S1 window, beside the attack or not; the attack's outcome is appended to `attacks`."""
    if not attacked:
        return run_wrk(url, connections=connections, seconds=seconds, headers=headers)
    with SlowReaders(port) as readers:
        time.sleep(0.5)  # the first slow readers are in place when S1 starts
        reading = run_wrk(url, connections=connections, seconds=seconds, headers=headers)
    attacks.append(readers.close())
    # The next window starts without this one's slow readers (the send deadline, then some margin).
    time.sleep(SEND_TIMEOUT_SECONDS + 1)
    return reading


def scenario_s1_slow_readers(bench: Bench) -> Outcome:
    plan = bench.plan
    max_connections = 2 * plan.connections + SPARE_CONNECTIONS
    progress(
        f"S1s result read beside slow readers ({SLOW_READERS_PER_SECOND}/s, send timeout "
        f"{SEND_TIMEOUT_SECONDS} s, max connections {max_connections}): wrk -t1 -c{plan.connections}"
    )
    overrides = {
        "LIVENESS_PROXY_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS),
        "LIVENESS_PROXY_MAX_CONNECTIONS": str(max_connections),
    }
    env = bench.our_env(
        "S1s",
        database_url=bench.sqlite_url("s1s"),
        api_base=bench.stubs.stub,
        token_url=f"{bench.stubs.stub}/oauth/token",
        **overrides,
    )
    ours: Proxy = bench.start_ours("ours-slow-readers", env)
    attacks: list[dict[str, Any]] = []
    try:
        bench.wait_ok(ours, "/readyz")
        path = RESULT_PATH.format(session_id=create_session(ours))
        port = int(ours.url.rsplit(":", 1)[1])
        run = functools.partial(measure, ours.url + path, ours.headers(), port, plan.connections, attacks)
        readings, warmups = interleaved(
            plan,
            plan.seconds,
            {
                "quiet": functools.partial(run, attacked=False),
                "attacked": functools.partial(run, attacked=True),
            },
        )
        measured = summarize_all(readings, warmups)
        for name, values in readings.items():
            measured[name]["errors"] = spread([r.non_2xx + r.socket_errors for r in values])
        if measured["attacked"]["errors"]["max"] > 0:
            measured["attacked"]["sample_failure"] = sample_failure(ours, "GET", path)
    finally:
        bench.children.stop(ours.process)
    # Warm-up windows are attacked too; only the counted ones are reported.
    measured["attacked"]["slow_readers"] = attacks[-plan.reps :]
    errors = float(measured["attacked"]["errors"]["max"])
    ratios = {"attacked_to_quiet": ratio(median_of(measured, "attacked"), median_of(measured, "quiet"))}
    targets = [goal("S1 errors beside slow readers (worst rep)", errors, "== 0", errors == 0)]
    last = measured["attacked"]["slow_readers"][-1]
    held = last["held_past_the_deadline_at_end"]
    rows = [
        (
            "S1s result read beside slow readers",
            f"{fmt_rate_and_p99(measured, 'attacked')}, {errors:.0f} errors (worst rep)",
            f"quiet {fmt_rate_and_p99(measured, 'quiet')}; {last['opened']} slow readers in "
            f"{plan.seconds} s, at most {last['held_by_server_at_most']} held at once, "
            f"{'n/a' if held is None else held} held past {SEND_TIMEOUT_SECONDS + CUT_MARGIN_SECONDS} s",
            f"{ratios['attacked_to_quiet']:.1%} of quiet",
            "0 errors",
            fmt_met(targets[0]["met"]),
        )
    ]
    data = {
        "title": "result read (GET) while slow readers attack the same proxy, vs the same proxy without them",
        "wrk": {"threads": 1, "connections": plan.connections, "seconds": plan.seconds},
        "attack": {
            "slow_readers_per_second": SLOW_READERS_PER_SECOND,
            "receive_buffer_bytes": READER_BUFFER_BYTES,
            "request": "GET /openapi.json",
            "burst_requests": BURST_REQUESTS,
            "paced_requests_per_tick": PACED_REQUESTS_PER_TICK,
        },
        "settings_overrides": overrides,
        "measured": measured,
        "ratios": ratios,
        "targets": targets,
    }
    return Outcome(data, rows)
