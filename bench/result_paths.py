"""Which path our proxy's result reads take, and the means to choose it: pools of sessions of a kind
the stub answers one way (bench/stub-nginx.conf: `pending-<n>` IN_PROGRESS, `final-<n>` SUCCEEDED,
`herd-<n>` IN_PROGRESS and logged), bound to the benchmark's caller in our proxy's database and read
in rotation by bench/result_rotation.lua; our proxy's
Cynopsis calls per read, counted at the stub; and a sample of the `X-Liveness-Result-Source` header.

Since issue 21 our proxy shares one Cynopsis call among concurrent reads of a session (single
flight), reuses a pending answer for `LIVENESS_PROXY_RESULT_REUSE_SECONDS` (0.3 s as shipped) and
serves a terminal result from its own store. A benchmark reading one session over and over would
measure those, not the work of a read: so S0, S1 and S3 read pending sessions in a rotation long
enough that no session is read twice within the reuse window, S1-final reads terminal ones, and
S1-herd reads one pending session from every connection on purpose.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from common import BENCH_DIR, RESULT_PATH, BenchError, progress
from followups import ProxyDatabase
from proxies import Proxy
from stats import spread
from stubs import Stubs, requests_served
from wrk import WrkReading, run_wrk

ROTATION_SCRIPT = BENCH_DIR / "result_rotation.lua"
# The session kinds (bench/stub-nginx.conf): pending results, read in rotation (S0, S1, S3); terminal
# ones, read in rotation (S1-final); one pending session every connection polls (S1-herd).
PENDING, FINAL, HERD = "pending", "final", "herd"
RESULT_SOURCE_HEADER = "X-Liveness-Result-Source"
# Our proxy's reuse window for a pending result as shipped (LIVENESS_PROXY_RESULT_REUSE_SECONDS); a
# session read again within it may be answered without a Cynopsis call.
SHIPPED_REUSE_SECONDS = 0.3
# The header's value when the build measured predates it (issue 21).
SOURCE_ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class SessionPool:
    """Sessions `<kind>-0` … `<kind>-<count-1>` of our proxy's caller."""

    kind: str
    count: int

    def session_id(self, number: int) -> str:
        return f"{self.kind}-{number}"

    def rotation_args(self, before: str, after: str, threads: int = 1, start: int = 0) -> list[str]:
        """result_rotation.lua's arguments: path n is <before><kind>-<n><after>; the rotation starts
        at session `start` (modulo the pool)."""
        return [f"{before}{self.kind}-", after, str(self.count), str(threads), str(start % self.count)]


def our_rotation_args(pool: SessionPool, threads: int = 1, start: int = 0) -> list[str]:
    """The rotation through our proxy (or the naive one: the same paths)."""
    before, after = RESULT_PATH.split("{session_id}")
    return pool.rotation_args(before, after, threads, start)


def bind_pool(database_url: str, pepper: str, kind: str, count: int) -> SessionPool:
    """`count` sessions of `kind` for our proxy's caller (the subject `bench`), bound in the proxy's
    database (`database_url`, the proxy's `pepper`) by the proxy's own binding writer, as its create
    route binds them: thousands in a second, where creating them through the proxy takes minutes
    on a loaded machine. Bound before they are first read: nothing remembers them as unknown."""
    started = time.monotonic()
    with ProxyDatabase(database_url, pepper=pepper) as database:
        database.bind_sessions(kind, count, first_followup_seconds=None)
    progress(f"  bound {count:,} {kind} sessions in {time.monotonic() - started:.1f} s")
    return SessionPool(kind, count)


def read_each(proxy: Proxy, pool: SessionPool, connections: int = 64) -> None:
    """Every session of the pool read once at least, by wrk passes over the rotation, each starting
    where the last one's counted reads ended: the measurement then starts in the steady state, even
    without a warm-up. Our proxy holds each binding in its cache, as it does for a session a caller
    polls (a first read fetches it from the database), and, on a build with the store, a terminal
    result is stored on its first read. Then a pause longer than the reuse window, so that nothing
    read here is reused by the first reads measured."""
    started, done, empty_passes = time.monotonic(), 0, 0
    while done < pool.count:
        # At most 64 connections: S3's 1000, each with a first read of a binding from the database
        # behind a 500 ms upstream, can complete nothing in a pass of a second.
        reading = run_wrk(
            proxy.url + "/",
            connections=min(connections, 64),
            seconds=2,
            headers=proxy.headers(),
            script=ROTATION_SCRIPT,
            script_args=our_rotation_args(pool, start=done),
        )
        if reading.non_2xx or reading.socket_errors or (reading.requests == 0 and empty_passes >= 2):
            raise BenchError(f"{proxy.name}: reading the {pool.kind} sessions failed: {reading.output}")
        empty_passes = empty_passes + 1 if reading.requests == 0 else 0
        done += reading.requests
    progress(f"  read each of the {pool.count:,} {pool.kind} sessions in {time.monotonic() - started:.1f} s")
    time.sleep(SHIPPED_REUSE_SECONDS + 0.2)


def sample_sources(proxy: Proxy, session_ids: Sequence[str]) -> dict[str, int]:
    """`X-Liveness-Result-Source` of one read of each session, one after the other, after a pause
    longer than the reuse window (nothing left to reuse from the measurement): how many said
    upstream, shared, stored, or nothing (SOURCE_ABSENT: a build before issue 21)."""
    time.sleep(SHIPPED_REUSE_SECONDS + 0.2)
    sources: Counter[str] = Counter()
    with httpx.Client(base_url=proxy.url, headers=proxy.headers(), timeout=30) as client:
        for session_id in session_ids:
            answer = client.get(RESULT_PATH.format(session_id=session_id))
            if answer.status_code != 200:
                raise BenchError(f"{proxy.name}: sample read of {session_id} answered {answer.status_code}")
            sources[answer.headers.get(RESULT_SOURCE_HEADER, SOURCE_ABSENT)] += 1
    return dict(sources)


def describe_sources(sources: dict[str, int]) -> str:
    if set(sources) == {SOURCE_ABSENT}:
        return f"{RESULT_SOURCE_HEADER} absent (a build before issue 21)"
    return "source " + ", ".join(f"{value} x{count}" for value, count in sorted(sources.items()))


class StubCalls:
    """Our proxy's Cynopsis calls during each of its windows, counted by the stub (nginx's count of
    requests served; nothing else talks to nginx while our proxy is measured), next to the reads
    wrk completed in the window."""

    def __init__(self, stubs: Stubs) -> None:
        self._stubs = stubs
        self.windows: dict[str, list[tuple[int, int]]] = {}

    def around(self, name: str, measure: Callable[[int], WrkReading]) -> Callable[[int], WrkReading]:
        def measured(seconds: int) -> WrkReading:
            before = requests_served(self._stubs)
            reading = measure(seconds)
            # Less the stub_status request that read `after` (it counts itself).
            calls = requests_served(self._stubs) - before - 1
            self.windows.setdefault(name, []).append((calls, reading.requests))
            return reading

        return measured

    def attach(self, section: dict[str, Any], name: str) -> None:
        """Per repetition (the warm-up's window dropped): calls, and calls per read completed.
        Reads still in flight when wrk stops (at most one per connection) are calls wrk does not
        count: a read that was not shared costs a little over 1.00 call."""
        windows = self.windows.get(name, [])[-len(section["reps"]) :]
        section["stub_calls"] = [calls for calls, _reads in windows]
        section["stub_calls_per_read"] = spread(
            [round(calls / reads, 4) if reads else 0.0 for calls, reads in windows] or [0.0]
        )
