"""Crash durability of `serve`: killed with SIGKILL at random moments under load, restarted, again.

Several cycles on one database. In each, client threads create liveness sessions (session token, then
session) and read results, their own new ones and ones created before earlier crashes, while `serve`
(with one worker or two) is killed, process group and all, at a random moment.
Right after every kill, before anything restarts, everything acknowledged must be in the database:
the ownership row (subject and request id) of every 201, the audit record of every answered request,
and a chain that verifies (read in-process with the code of `audit export` and `audit verify`; the
commands themselves run after the final, clean stop). After every restart, the owners of sessions
acknowledged before the crash still read their results, and another caller still cannot.

SQLite, the default deployment, gets four kills (one worker, two, one, two). PostgreSQL gets one, of
two workers: its commit path differs (the chain head is a locked row, and the server rolls back
what a dropped connection left open), and a kill per lifetime costs seconds of start-up.

The kill moments come from a seed that every failure message names; LIVENESS_PROXY_CRASH_SEED=<seed>
replays the same choices (the machine's timing still varies).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from e2e.test_audit_crash import SESSION_TOKEN, SESSIONS, start_serve
from e2e.test_cli import run
from liveness_proxy.settings import async_database_url
from liveness_proxy.store import AuditLog, ChainVerdict, create_engine
from liveness_proxy.store.audit_chain import SYSTEM_ACTIONS
from liveness_proxy.store.tables import liveness_sessions
from services import scratch_postgres
from support import (
    TEST_AUDIT_KEYS,
    ServerThread,
    issue_keys,
    proxy_settings,
    subprocess_env,
    upstream_sandbox,
)

# kill -9 cycles under load, 15-30 s each
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

CLIENT_THREADS = 6
# Each cycle kills `serve` this long (drawn from the seed) after its clients have created a few
# sessions: early enough that creations are always in flight, late enough to cover batched commits.
KILL_WINDOW_SECONDS = (0.0, 1.2)
SESSIONS_BEFORE_KILL = 3
SURVIVORS_CHECKED = 6
SEED_VARIABLE = "LIVENESS_PROXY_CRASH_SEED"
# The load is the point here, not the per-subject limits.
UNLIMITED = {
    "LIVENESS_PROXY_RATE_LIMIT_SESSION_TOKEN": "1000000/minute",
    "LIVENESS_PROXY_RATE_LIMIT_CREATE_SESSION": "1000000/minute",
    "LIVENESS_PROXY_RATE_LIMIT_RESULT": "1000000/minute",
    "LIVENESS_PROXY_DAILY_ATTEMPTS": "1000000",
}


@dataclass(frozen=True)
class Caller:
    subject: str
    key: str = field(repr=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass(frozen=True)
class CreatedSession:
    """A session whose 201 reached its caller: the proxy promised it is bound to `subject`."""

    session_id: str
    subject: str
    request_id: str
    cycle: int


@dataclass
class Cycle:
    """What the clients of one `serve` lifetime saw. Lists only: append is atomic across threads."""

    number: int
    workers: int
    acknowledged: list[str] = field(default_factory=list)  # request ids of 2xx answers
    created: list[CreatedSession] = field(default_factory=list)  # in the order the 201s arrived
    cut_off: list[str] = field(default_factory=list)  # per thread: the step and error that ended it
    unexpected: list[str] = field(default_factory=list)  # answers other than the documented success


@dataclass
class Ledger:
    """Everything acknowledged over the whole test, and the seed that drove it."""

    seed: int
    database_url: str
    # Out of the repr: pytest prints the arguments of a failed assertion's function.
    env: dict[str, str] = field(repr=False)
    callers: list[Caller] = field(repr=False)
    cycles: list[Cycle] = field(default_factory=list, repr=False)

    @property
    def acknowledged(self) -> list[str]:
        return [request_id for cycle in self.cycles for request_id in cycle.acknowledged]

    @property
    def created(self) -> list[CreatedSession]:
        return [session for cycle in self.cycles for session in cycle.created]

    def caller(self, subject: str) -> Caller:
        return next(caller for caller in self.callers if caller.subject == subject)

    def other_than(self, subject: str) -> Caller:
        return next(caller for caller in self.callers if caller.subject != subject)

    def replay(self) -> str:
        return f"(replay with {SEED_VARIABLE}={self.seed})"


class Exchange:
    """One client thread's requests: each answer is checked against the success it should be and,
    when it is one, its request id is acknowledged."""

    def __init__(self, client: httpx.Client, cycle: Cycle) -> None:
        self.client = client
        self.cycle = cycle
        self.step = "connect"

    def send(
        self, step: str, request_id: str, expected: int, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        self.step = step
        response = self.client.request(method, path, headers={"X-Request-ID": request_id}, json=body)
        if response.status_code == expected and response.headers.get("x-request-id") == request_id:
            self.cycle.acknowledged.append(request_id)
        else:
            self.cycle.unexpected.append(
                f"{step} {request_id}: {response.status_code} {response.headers.get('x-request-id')} "
                f"{response.text[:200]}"
            )
        return response


def client_thread(url: str, caller: Caller, number: int, cycle: Cycle, earlier: list[CreatedSession]) -> None:
    """Session after session until the server dies under it; every few rounds, also a result of a
    session this caller created before an earlier crash."""
    choose = random.Random(f"{cycle.number}-{number}")  # which earlier session: no timing in it
    mine = [session for session in earlier if session.subject == caller.subject]
    with httpx.Client(base_url=url, headers=caller.auth, timeout=10) as client:
        exchange = Exchange(client, cycle)
        try:
            for round_number in itertools.count():
                prefix = f"c{cycle.number}-t{number}-{round_number}"
                answer = exchange.send("session-token", f"{prefix}-token", 200, "POST", SESSION_TOKEN)
                if answer.status_code != 200:
                    return
                create_id = f"{prefix}-create"
                answer = exchange.send(
                    "create-session",
                    create_id,
                    201,
                    "POST",
                    SESSIONS,
                    {"session_token": answer.json()["session_token"]},
                )
                if answer.status_code != 201:
                    return
                session_id = answer.json()["session_id"]
                cycle.created.append(CreatedSession(session_id, caller.subject, create_id, cycle.number))
                exchange.send("result", f"{prefix}-result", 200, "GET", f"{SESSIONS}/{session_id}/result")
                if mine and round_number % 3 == 2:
                    old = choose.choice(mine).session_id
                    exchange.send(
                        "earlier-result", f"{prefix}-earlier", 200, "GET", f"{SESSIONS}/{old}/result"
                    )
        except httpx.TransportError as exc:
            # The server is gone: this request was never answered, so nothing was promised for it.
            cycle.cut_off.append(f"{exchange.step}: {type(exc).__name__}")


def run_cycle(ledger: Ledger, cycle: Cycle, url: str, process: subprocess.Popen[bytes], pause: float) -> None:
    """Load from CLIENT_THREADS threads, then SIGKILL to the whole process group `pause` seconds
    after the clients have created SESSIONS_BEFORE_KILL sessions."""
    earlier = ledger.created
    threads = [
        threading.Thread(
            target=client_thread,
            args=(url, ledger.callers[number % len(ledger.callers)], number, cycle, earlier),
            daemon=True,
        )
        for number in range(CLIENT_THREADS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(cycle.created) < SESSIONS_BEFORE_KILL and not cycle.unexpected:
        assert time.monotonic() < deadline, f"cycle {cycle.number}: no sessions created {ledger.replay()}"
        time.sleep(0.01)
    time.sleep(pause)
    os.killpg(process.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=15)
        assert not thread.is_alive(), f"a client thread hung after the kill {ledger.replay()}"
    assert process.wait(timeout=15) == -signal.SIGKILL
    wait_for_group_to_die(process.pid)


def wait_for_group_to_die(group: int) -> None:
    """The workers of a multi-worker `serve` are the supervisor's children, killed with it; their
    database locks are released once none of the group is left but zombies (which whoever adopted
    them may take a while to reap)."""
    deadline = time.monotonic() + 10
    while any(state != "Z" for state in states_of_group(group)):
        assert time.monotonic() < deadline, f"process group {group} survived SIGKILL"
        time.sleep(0.01)


def states_of_group(group: int) -> list[str]:
    """The state letter (R, S, Z, ...) of every process in process group `group`, from /proc."""
    states = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        # "pid (command) state ppid pgrp ...": the command may contain spaces and parentheses.
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == group:
            states.append(state)
    return states


def read_store(
    database_url: str,
) -> tuple[dict[str, tuple[str, str]], list[dict[str, Any]], ChainVerdict]:
    """Every binding (session id -> subject, request id), every audit record in chain order, and the
    chain's verdict, read in-process by an engine of the test's own with the code the `audit export`
    and `audit verify` commands run (which cost two interpreter start-ups per look)."""

    async def read() -> tuple[dict[str, tuple[str, str]], list[dict[str, Any]], ChainVerdict]:
        engine = create_engine(async_database_url(database_url), pool_size=1)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    select(
                        liveness_sessions.c.session_id,
                        liveness_sessions.c.subject,
                        liveness_sessions.c.request_id,
                    )
                )
                owners = {row.session_id: (row.subject, row.request_id) for row in rows}
            audit = AuditLog(engine, TEST_AUDIT_KEYS)
            return owners, [record async for record in audit.iterate()], await audit.verify()
        finally:
            await engine.dispose()

    owners, records, verdict = asyncio.run(read())
    return owners, records, verdict


def by_request_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The request records by request id. System events (a verdict recorded, a webhook delivered)
    are left out: a verdict's event names the request that read it, beside that request's record."""
    requests = [record for record in records if record["action"] not in SYSTEM_ACTIONS]
    found = {record["request_id"]: record for record in requests}
    assert len(found) == len(requests), "a request id was audited twice"
    return found


def assert_durable(ledger: Ledger, moment: str) -> None:
    """Every acknowledged binding and answer is in the database, and the chain verifies."""
    owners, records, verdict = read_store(ledger.database_url)
    assert verdict.ok, f"{moment}: {verdict.problem} {ledger.replay()}"
    assert verdict.records == len(records)
    assert_holds_everything_acknowledged(ledger, moment, owners, by_request_id(records))


def assert_durable_through_the_commands(ledger: Ledger, moment: str) -> None:
    """The same, with the audit log read by `liveness-proxy audit export` and `audit verify`."""
    with ThreadPoolExecutor(max_workers=2) as pool:  # two CLI start-ups at once: both only read
        exporting = pool.submit(run, ledger.env, "audit", "export")
        verifying = pool.submit(run, ledger.env, "audit", "verify")
        owners, _, _ = read_store(ledger.database_url)
        exported, verified = exporting.result(), verifying.result()
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    audited = by_request_id(records)
    assert verified.returncode == 0, f"{moment}: {verified.stdout}{verified.stderr} {ledger.replay()}"
    assert f"audit chain OK: {len(records)} records verified" in verified.stdout, verified.stdout
    assert_holds_everything_acknowledged(ledger, moment, owners, audited)


def assert_holds_everything_acknowledged(
    ledger: Ledger, moment: str, owners: dict[str, tuple[str, str]], audited: dict[str, dict[str, Any]]
) -> None:
    replay = ledger.replay()
    unbound = [
        session.session_id
        for session in ledger.created
        if owners.get(session.session_id) != (session.subject, session.request_id)
    ]
    assert not unbound, (
        f"{moment}: {len(unbound)} acknowledged sessions lost their owner, e.g. {unbound[:3]} {replay}"
    )
    unaudited = [request_id for request_id in ledger.acknowledged if request_id not in audited]
    assert not unaudited, (
        f"{moment}: {len(unaudited)} acknowledged answers have no audit record, e.g. {unaudited[:3]} {replay}"
    )
    for session in ledger.created:
        record = audited[session.request_id]
        assert (record["action"], record["status"], record["session_id"]) == (
            "session.create",
            201,
            session.session_id,
        ), f"{moment}: {record} {replay}"


def assert_owners_still_read(ledger: Ledger, url: str, cycle: Cycle, survivors: list[CreatedSession]) -> None:
    """Sessions acknowledged before a crash: their owners read the result, another caller gets the
    404 of an unknown session. The owners' reads are acknowledged answers like any other."""
    for index, session in enumerate(survivors):
        request_id = f"c{cycle.number}-survivor-{index}"
        owner = ledger.caller(session.subject)
        read = httpx.get(
            f"{url}{SESSIONS}/{session.session_id}/result", headers={**owner.auth, "X-Request-ID": request_id}
        )
        assert read.status_code == 200, (
            f"{session} after restart: {read.status_code} {read.text} {ledger.replay()}"
        )
        assert read.json()["session_id"] == session.session_id
        cycle.acknowledged.append(request_id)
        foreign = httpx.get(
            f"{url}{SESSIONS}/{session.session_id}/result", headers=ledger.other_than(session.subject).auth
        )
        assert foreign.status_code == 404, (
            f"{session} read by another caller: {foreign.status_code} {ledger.replay()}"
        )


def survivors_to_check(ledger: Ledger, choose: random.Random) -> list[CreatedSession]:
    """The last sessions acknowledged before the latest kill (the likeliest to be lost), and a few
    drawn from all earlier cycles."""
    latest = ledger.cycles[-1].created[-SURVIVORS_CHECKED // 2 :]
    drawn = choose.sample(ledger.created, min(SURVIVORS_CHECKED // 2, len(ledger.created)))
    return list(dict.fromkeys(latest + drawn))


@pytest.fixture
def sandbox_url() -> Iterator[str]:
    server = ServerThread(upstream_sandbox().app, lifespan="off").start()
    yield server.url
    server.stop()


def prepare(tmp_path: Path, sandbox_url: str, database_url: str) -> Ledger:
    """The proxy's environment on `database_url`, migrated, with API keys for alice and bob."""
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    settings = proxy_settings(sandbox_url, tmp_path / "unused.db", LIVENESS_PROXY_DATABASE_URL=database_url)
    keys = asyncio.run(issue_keys(settings, [("alice", "alice", []), ("bob", "bob", [])]))
    env = subprocess_env(
        sandbox_url, tmp_path / "unused.db", LIVENESS_PROXY_DATABASE_URL=database_url, **UNLIMITED
    )
    callers = [Caller(subject, keys[subject].key) for subject in ("alice", "bob")]
    return Ledger(seed=seed, database_url=database_url, env=env, callers=callers)


def kill_and_restart_repeatedly(ledger: Ledger, workers_per_cycle: list[int]) -> None:
    """One `serve` lifetime per entry, with that many workers, each ended by SIGKILL under load;
    then one more, ended cleanly."""
    choose = random.Random(ledger.seed)
    process: subprocess.Popen[bytes] | None = None
    try:
        for number, workers in enumerate(workers_per_cycle):
            cycle = Cycle(number=number, workers=workers)
            process, url = start_serve(ledger.env, workers=workers)
            if number > 0:
                assert_owners_still_read(ledger, url, cycle, survivors_to_check(ledger, choose))
            ledger.cycles.append(cycle)
            run_cycle(ledger, cycle, url, process, pause=choose.uniform(*KILL_WINDOW_SECONDS))
            assert not cycle.unexpected, f"cycle {number}: {cycle.unexpected[:5]} {ledger.replay()}"
            # Every thread was cut off by the kill: none stopped early, so the load ran until it.
            assert len(cycle.cut_off) == CLIENT_THREADS, cycle.cut_off
            assert_durable(ledger, f"after kill {number} ({workers} workers)")
        # After the last kill: one more restart, the owners' reads, one whole flow, a clean stop.
        final = Cycle(number=len(workers_per_cycle), workers=1)
        process, url = start_serve(ledger.env, workers=1)
        assert_owners_still_read(ledger, url, final, survivors_to_check(ledger, choose))
        ledger.cycles.append(final)
        with httpx.Client(base_url=url, headers=ledger.callers[0].auth, timeout=10) as client:
            exchange = Exchange(client, final)
            token = exchange.send("session-token", "final-token", 200, "POST", SESSION_TOKEN).json()[
                "session_token"
            ]
            created = exchange.send(
                "create-session", "final-create", 201, "POST", SESSIONS, {"session_token": token}
            )
            final.created.append(
                CreatedSession(
                    created.json()["session_id"], ledger.callers[0].subject, "final-create", final.number
                )
            )
        assert not final.unexpected, final.unexpected
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    assert process.returncode == 0
    assert_durable_through_the_commands(ledger, "after the final clean stop")


def describe(ledger: Ledger) -> str:
    cut_off = [reason for cycle in ledger.cycles for reason in cycle.cut_off]
    return (
        f"seed {ledger.seed}: {len(ledger.created)} sessions and {len(ledger.acknowledged)} answers "
        f"acknowledged over {len(ledger.cycles) - 1} kills; cut off by the kills: "
        f"{sorted(set(cut_off))}"
    )


def assert_killed_mid_load(ledger: Ledger) -> None:
    """The test means something only if the kills hit requests in flight (a refused connection
    only shows the server was already dead) and sessions were created after restarts too."""
    in_flight = [
        reason for cycle in ledger.cycles for reason in cycle.cut_off if not reason.endswith("ConnectError")
    ]
    assert in_flight, f"no kill interrupted a request in flight: {describe(ledger)}"
    for cycle in ledger.cycles[1:-1]:
        assert len(cycle.created) >= SESSIONS_BEFORE_KILL, (
            f"cycle {cycle.number} after a restart: {describe(ledger)}"
        )


def test_sigkill_under_load_loses_nothing_acknowledged_on_sqlite(
    tmp_path: Path, sandbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = prepare(tmp_path, sandbox_url, f"sqlite:///{tmp_path / 'crash.db'}")
    kill_and_restart_repeatedly(ledger, workers_per_cycle=[1, 2, 1, 2])
    assert_killed_mid_load(ledger)
    with capsys.disabled():
        print(f"\n{describe(ledger)}")


def test_sigkill_under_load_loses_nothing_acknowledged_on_postgresql(
    tmp_path: Path, sandbox_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_postgres() as database_url:
        ledger = prepare(tmp_path, sandbox_url, database_url)
        kill_and_restart_repeatedly(ledger, workers_per_cycle=[2])
    assert_killed_mid_load(ledger)
    with capsys.disabled():
        print(f"\n{describe(ledger)}")
