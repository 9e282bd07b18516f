"""Session tokens bound to the subject that obtained them (issue 17, item 1), through the running proxy
and a real sandbox upstream: a token works only for its subject, once, before it expires; every
refusal is the same 422 `session-token-invalid`, made before any Cynopsis call and before any daily
attempt is counted; a refusal before the call, or a call Cynopsis never acted on (no connection,
429, 401), leaves the token usable; the binding is fleet-wide on the database (SQLite, PostgreSQL)
and on Redis, fails closed, and holds nothing in clear.

Most tests share one proxy per backend (`shared`): each test starts on a fresh UTC day of the
proxy's wall clock (a ManualClock), so the daily cap (`CAP` attempts per subject) is whole again and
the tokens of earlier tests have expired. "No attempt counted" is shown by the cap itself: a
subject whose refused requests had counted would be refused before its `CAP`-th session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from conftest import LOG_SCAN
from integration.test_declared_shapes import Tap
from integration.test_redis_outage import PrivateRedis
from liveness_proxy.app import create_app
from liveness_proxy.sandbox import Fault, ManualClock
from liveness_proxy.store.tables import session_token_bindings
from prepared import SQLITE_NAME, PreparedDatabases
from services import REDIS_URL, scratch_redis
from support import Harness, InProcessApp, LogScan, ProxyHarness, ServerThread, wait_until

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]

SESSION_TOKEN = "/v1/liveness/session-token"
SESSIONS = "/v1/liveness/sessions"
# The Cynopsis create call, as the sandbox logs it.
UPSTREAM_CREATE = "/service/liveness-v2/liveness_session"
INVALID = "urn:liveness-proxy:problem:session-token-invalid"
# Daily attempts per subject on the shared proxies: small, so that a refused request that had been
# counted would show (the subject would be refused before its CAP-th session).
CAP = 2
DAY = 86_400
# What the sandbox says in `expires_in` unless a test changes it.
SANDBOX_TOKEN_LIFETIME = 300


@dataclasses.dataclass
class Shared:
    """A proxy shared by a module's tests, its wall clock, and where its bindings live."""

    proxy: ProxyHarness
    wall: ManualClock
    backend: str  # "sqlite", "postgres" or "redis" (PostgreSQL + Redis: bindings in Redis)
    redis_prefix: str | None
    scan: LogScan
    origin: str

    def new_day(self) -> None:
        """The wall clock moves to just after the next UTC midnight: every subject's daily cap is
        whole again, and every token handed out so far has expired."""
        now = self.wall.now()
        self.wall.set(now - now % DAY + DAY + 1)

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Shared]:
        """For one test: a fresh UTC day, an empty upstream log; afterwards no pending fault and the
        sandbox's own token lifetime again."""
        self.new_day()
        self.proxy.sandbox.reset_log()
        try:
            yield self
        finally:
            self.proxy.sandbox.clear_faults()
            self.proxy.sandbox.config.session_token_lifetime_seconds = SANDBOX_TOKEN_LIFETIME

    def before_midnight(self, seconds: float) -> None:
        """The wall clock moves forward to `seconds` before the end of the current UTC day."""
        now = self.wall.now()
        self.wall.set(now - now % DAY + DAY - seconds)

    @contextlib.contextmanager
    def companion(self) -> Iterator[ProxyHarness]:
        """A second proxy of the same deployment, as another replica would be: the same settings (so
        the same database, Redis and key prefix), in front of the same sandbox, on the same clocks;
        it shares nothing else with the first."""
        first = self.proxy
        log = io.StringIO()
        app = create_app(
            first.settings,
            clock=first.clock.now,
            shared_clock=first.clock.now,
            wall_clock=self.wall.now,
            log_stream=log,
        )
        served = InProcessApp(app).start()
        try:
            yield dataclasses.replace(first, app=app, in_process=served, log=log, responses=[])
        finally:
            served.stop()
            self.scan.scan(self.origin + " (companion)", log.getvalue())


@contextlib.contextmanager
def shared_proxy(
    request: pytest.FixtureRequest,
    folder: Path,
    prepared: PreparedDatabases,
    **overrides: Any,
) -> Iterator[Shared]:
    """The module's proxy on the backend `request.param` names, with the daily cap `CAP` and a
    ManualClock for its wall clock (started at the real time)."""
    backend: str = request.param
    scan = request.config.stash[LOG_SCAN]
    origin = f"{request.module.__name__}[{backend}]"
    wall = ManualClock(start=time.time())
    settings = {"LIVENESS_PROXY_DAILY_ATTEMPTS": CAP, **overrides}
    with contextlib.ExitStack() as stack:
        prefix = None
        if backend == "sqlite":
            keys = prepared.sqlite(folder / SQLITE_NAME)
        else:
            database_url, keys = stack.enter_context(prepared.postgres())
            settings["LIVENESS_PROXY_DATABASE_URL"] = database_url
            if backend == "redis":
                redis_url, prefix = stack.enter_context(scratch_redis())
                settings["LIVENESS_PROXY_REDIS_URL"] = redis_url
                settings["LIVENESS_PROXY_REDIS_KEY_PREFIX"] = prefix
        proxy = stack.enter_context(
            Harness(
                folder,
                proxy_overrides=settings,
                app_options={"wall_clock": wall.now},
                log_scan=scan,
                origin=origin,
                in_process=True,
                prepared_keys=keys,
            )
        )
        yield Shared(proxy, wall, backend, prefix, scan, origin)


@pytest.fixture(scope="module", params=["sqlite", "postgres", "redis"])
def module_proxy(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prepared_databases: PreparedDatabases,
) -> Iterator[Shared]:
    with shared_proxy(request, tmp_path_factory.mktemp("binding"), prepared_databases) as running:
        yield running


@pytest.fixture
def shared(module_proxy: Shared) -> Iterator[Shared]:
    """The module's proxy, on a fresh UTC day (`Shared.fresh`)."""
    with module_proxy.fresh() as running:
        yield running


# --- helpers -------------------------------------------------------------------------------------


def session_token(proxy: ProxyHarness, client: httpx.Client, key: str | None = None) -> str:
    response = client.post(SESSION_TOKEN, headers=proxy.auth(key))
    assert response.status_code == 200, response.text
    token: str = response.json()["session_token"]
    return token


def create(
    proxy: ProxyHarness,
    client: httpx.Client,
    token: str,
    key: str | None = None,
    idempotency_key: str | None = None,
) -> httpx.Response:
    headers = proxy.auth(key)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.post(SESSIONS, headers=headers, json={"session_token": token})


def creates(proxy: ProxyHarness) -> int:
    """Create calls that reached Cynopsis (the sandbox) since its log was last reset."""
    return proxy.upstream_paths().count(UPSTREAM_CREATE)


def audit_row(proxy: ProxyHarness, response: httpx.Response) -> dict[str, Any]:
    request_id = response.headers["x-request-id"]
    [row] = [row for row in proxy.audit_rows() if row["request_id"] == request_id]
    return row


def assert_invalid(response: httpx.Response) -> dict[str, Any]:
    """`response` is the one refusal of a session token; returns its problem body."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == INVALID
    assert problem["request_id"] == response.headers["x-request-id"]
    return problem


def spend_the_daily_cap(
    proxy: ProxyHarness, client: httpx.Client, key: str | None = None, *, spent: int = 0
) -> None:
    """The sessions left to the subject today (`spent` already made), then proof that the cap is
    reached: had any refused request counted, one of these sessions would have been refused."""
    for _ in range(CAP - spent):
        assert create(proxy, client, session_token(proxy, client, key), key).status_code == 201
    refused = create(proxy, client, session_token(proxy, client, key), key)
    assert refused.status_code == 429, refused.text
    assert refused.json()["limit"] == "daily_attempts"


# --- one subject, once, before expiry --------------------------------------------------------------


def test_a_foreign_token_is_refused_without_a_call_or_an_attempt_and_its_owner_keeps_it(
    shared: Shared,
) -> None:
    proxy = shared.proxy
    with proxy.client() as client:
        token = session_token(proxy, client)
        # More tries than bob's daily cap: had any of them counted, bob would be refused below.
        tries = [create(proxy, client, token, proxy.keys.bob) for _ in range(CAP + 1)]
        calls_after_tries = creates(proxy)
        rows = [audit_row(proxy, answer) for answer in tries]
        spend_the_daily_cap(proxy, client, proxy.keys.bob)  # bob still has all CAP attempts
        owner = create(proxy, client, token)
    for answer in tries:
        assert_invalid(answer)
    assert calls_after_tries == 0  # no Cynopsis call for a foreign token
    for row in rows:
        assert (row["subject"], row["status"], row["problem"]) == ("bob", 422, "session-token-invalid")
        assert row["upstream_status"] is None
    assert owner.status_code == 201, owner.text  # the foreign tries did not burn it
    assert creates(proxy) == CAP + 1


def test_used_unknown_foreign_and_expired_tokens_get_one_and_the_same_answer(shared: Shared) -> None:
    proxy = shared.proxy
    with proxy.client() as client:
        used = session_token(proxy, client)
        foreign = session_token(proxy, client)
        expiring = session_token(proxy, client)
        assert create(proxy, client, used).status_code == 201
        answers = {
            "used": create(proxy, client, used),
            "unknown": create(proxy, client, "sst_" + secrets.token_urlsafe(24)),
            "foreign": create(proxy, client, foreign, proxy.keys.bob),
        }
        shared.wall.advance(SANDBOX_TOKEN_LIFETIME + 1)
        answers["expired"] = create(proxy, client, expiring)
        spend_the_daily_cap(proxy, client, spent=1)  # the first use only: no refusal counted
    problems = {reason: assert_invalid(answer) for reason, answer in answers.items()}
    # Nothing tells the reasons apart: the same status, media type and problem, but the request id.
    shapes = {reason: {**problem, "request_id": None} for reason, problem in problems.items()}
    assert len({repr(sorted(shape.items())) for shape in shapes.values()}) == 1, shapes
    assert len({answer.headers.get("retry-after") for answer in answers.values()}) == 1
    assert len({problem["request_id"] for problem in problems.values()}) == 4
    assert creates(proxy) == CAP  # the first use, then the cap's sessions: none of the refused


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(SANDBOX_TOKEN_LIFETIME, SANDBOX_TOKEN_LIFETIME), (7200, 3600), (0, 600)],
    ids=["as-told", "capped-at-an-hour", "unusable-means-600"],
)
def test_the_binding_lives_as_long_as_expires_in_says_capped_at_an_hour(
    shared: Shared, expires_in: int, lifetime: int
) -> None:
    proxy = shared.proxy
    # The sandbox's own clock stands still: it would accept both tokens; only the proxy's binding ends.
    proxy.sandbox.config.session_token_lifetime_seconds = expires_in
    with proxy.client() as client:
        in_time, late = session_token(proxy, client), session_token(proxy, client)
        shared.wall.advance(lifetime - 1)
        accepted = create(proxy, client, in_time)
        calls_in_time = creates(proxy)
        shared.wall.advance(2)
        refused = create(proxy, client, late)
    # Forwarded: the sandbox decides (it refuses a token whose own expires_in was 0, as expired).
    assert calls_in_time == 1
    assert accepted.status_code == (410 if expires_in == 0 else 201), accepted.text
    assert_invalid(refused)
    assert creates(proxy) == 1


# --- a refusal before the call leaves the token usable ----------------------------------------------


def test_the_daily_cap_refusal_leaves_the_token_usable_the_next_day(shared: Shared) -> None:
    proxy = shared.proxy
    shared.before_midnight(60)
    with proxy.client() as client:
        for _ in range(CAP):
            assert create(proxy, client, session_token(proxy, client)).status_code == 201
        token = session_token(proxy, client)
        refused = create(proxy, client, token)
        calls_when_refused = creates(proxy)
        shared.wall.advance(120)  # a new UTC day; the token is two minutes old
        next_day = create(proxy, client, token)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "daily_attempts"
    assert calls_when_refused == CAP
    assert next_day.status_code == 201, next_day.text
    assert creates(proxy) == CAP + 1


def test_an_open_circuit_leaves_the_token_and_the_idempotency_key_usable(make_proxy: MakeProxy) -> None:
    open_seconds = 0.3
    overrides = {"CYNOPSIS_CIRCUIT_FAILURE_THRESHOLD": 1, "CYNOPSIS_CIRCUIT_OPEN_SECONDS": open_seconds}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        token = session_token(proxy, client)
        # An outage seen on another call opens the circuit: the token's create is not even tried.
        proxy.sandbox.inject_fault(Fault(target="session_token", kind="status", status=503))
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 502
        refused = create(proxy, client, token, idempotency_key="retry-after-the-outage")
        calls_when_refused = creates(proxy)
        time.sleep(open_seconds)  # the breaker's own (monotonic) clock: the probe is let through
        recovered = create(proxy, client, token, idempotency_key="retry-after-the-outage")
    assert refused.status_code == 503
    assert refused.json()["type"] == "urn:liveness-proxy:problem:upstream-circuit-open"
    assert calls_when_refused == 0
    assert recovered.status_code == 201, recovered.text
    assert "idempotent-replayed" not in recovered.headers  # the 503 was not stored for the key
    assert creates(proxy) == 1


# --- a call Cynopsis never acted on gives the token back, and is not stored for its key -------------
# The daily attempt still counts in each case (the cap bounds tries, whatever became of them): after
# the failed try and its retry, the subject's `CAP` (2) attempts are spent.


def assert_over_the_cap(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["limit"] == "daily_attempts"


def serve_again(app: Tap, port: int) -> ServerThread:
    """`app` served anew on `port`: the address the proxy was configured with answers again."""
    server = ServerThread(app, lifespan="off")
    server.server.config.port = port  # a ServerThread otherwise takes whatever port is free
    return server.start()


def test_a_create_that_could_not_connect_leaves_the_token_and_the_key_usable(make_proxy: MakeProxy) -> None:
    # Cynopsis behind a tap of its own, so that its address can refuse connections and answer again.
    tap = Tap()
    upstream = ServerThread(tap, lifespan="off").start()
    servers, port = [upstream], upstream.port
    key = secrets.token_urlsafe(12)
    overrides = {"CYNOPSIS_API_BASE_URL": upstream.url, "LIVENESS_PROXY_DAILY_ATTEMPTS": CAP}
    try:
        with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
            tap.target = proxy.sandbox_url
            token = session_token(proxy, client)  # bound, and the access token is in hand
            upstream.stop()  # nothing listens there now: the create's connection is refused
            unreachable = create(proxy, client, token, idempotency_key=key)
            calls_when_unreachable = len(tap.sent("create_session"))
            unreachable_row = audit_row(proxy, unreachable)
            servers.append(serve_again(tap, port))
            retried = create(proxy, client, token, idempotency_key=key)
            over_the_cap = create(proxy, client, session_token(proxy, client))
    finally:
        for server in servers:
            server.stop()
    assert unreachable.status_code == 502, unreachable.text
    assert unreachable.json()["type"] == "urn:liveness-proxy:problem:upstream-unavailable"
    assert (unreachable_row["status"], unreachable_row["upstream_status"]) == (502, None)
    assert calls_when_unreachable == 0
    assert retried.status_code == 201, retried.text  # the token was given back...
    assert "idempotent-replayed" not in retried.headers  # ...and the 502 not stored for the key
    assert_over_the_cap(over_the_cap)
    assert len(tap.sent("create_session")) == 1


def test_a_create_cynopsis_throttled_leaves_the_token_and_the_key_usable(shared: Shared) -> None:
    proxy = shared.proxy
    key = secrets.token_urlsafe(12)
    proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="rate_limit", retry_after_seconds=7))
    with proxy.client() as client:
        token = session_token(proxy, client)
        throttled = create(proxy, client, token, idempotency_key=key)
        retried = create(proxy, client, token, idempotency_key=key)
        over_the_cap = create(proxy, client, session_token(proxy, client))
    assert throttled.status_code == 429, throttled.text
    assert throttled.json()["type"] == "urn:liveness-proxy:problem:upstream-rate-limited"
    assert throttled.headers["retry-after"] == "7"
    assert retried.status_code == 201, retried.text  # the token was given back...
    assert "idempotent-replayed" not in retried.headers  # ...and the 429 not stored for the key
    assert_over_the_cap(over_the_cap)
    assert creates(proxy) == 2


def test_a_create_refused_unauthenticated_with_no_new_access_token_leaves_the_token_and_the_key_usable(
    shared: Shared,
) -> None:
    """A 401 is a request Cynopsis did not process; when no access token can be had for the retry,
    the create ends there, with its session token unspent upstream."""
    proxy = shared.proxy
    key = secrets.token_urlsafe(12)
    with proxy.client() as client:
        token = session_token(proxy, client)  # the proxy holds an access token now
        # Cynopsis refuses that access token; getting another one for the retry fails.
        proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="status", status=401))
        proxy.sandbox.inject_fault(Fault(target="token", kind="status", status=500, count=10))
        refused = create(proxy, client, token, idempotency_key=key)
        calls_when_refused = creates(proxy)
        proxy.sandbox.clear_faults()
        # After the token endpoint's backoff (on the proxy's clock) a new access token is fetched in
        # the background; until it is in hand, creates are refused before anything is used.
        proxy.clock.advance(proxy.settings.cynopsis_token_failure_backoff_seconds + 1)

        def answered() -> httpx.Response | None:
            answer = create(proxy, client, token, idempotency_key=key)
            still_no_access_token = answer.status_code == 503 and "idempotent-replayed" not in answer.headers
            return None if still_no_access_token else answer

        retried = wait_until(answered)
        assert retried is not None
        over_the_cap = create(proxy, client, session_token(proxy, client))
    assert refused.status_code == 503, refused.text
    assert refused.json()["type"] == "urn:liveness-proxy:problem:upstream-token-unavailable"
    assert calls_when_refused == 1
    assert retried.status_code == 201, retried.text  # the token was given back...
    assert "idempotent-replayed" not in retried.headers  # ...and the 503 not stored for the key
    assert_over_the_cap(over_the_cap)
    assert creates(proxy) == 2


# --- binding off --------------------------------------------------------------------------------------


def test_with_the_binding_off_the_upstream_decides(make_proxy: MakeProxy) -> None:
    overrides = {"LIVENESS_PROXY_SESSION_TOKEN_BINDING": False}
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        token = session_token(proxy, client)
        foreign = create(proxy, client, token, proxy.keys.bob)
        unknown = create(proxy, client, "sst_" + secrets.token_urlsafe(24))
        remembered = asyncio.run(binding_rows(proxy))
    assert foreign.status_code == 201, foreign.text
    assert unknown.status_code == 400  # the sandbox's refusal of a token it never issued, passed on
    assert unknown.json()["type"] == "urn:liveness-proxy:problem:upstream-rejected"
    assert creates(proxy) == 2
    assert remembered == []


# --- fleet-wide -------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_proxy", ["postgres", "redis"], indirect=True)
def test_two_replicas_share_the_bindings_and_a_raced_token_makes_one_session(shared: Shared) -> None:
    proxy = shared.proxy
    with shared.companion() as other, proxy.client() as here, other.client() as there:
        token = session_token(proxy, here)
        foreign_there = create(other, there, token, other.keys.bob)
        used_there = create(other, there, token)
        again_here = create(proxy, here, token)
        races = []
        for _ in range(3):
            shared.new_day()  # alice's cap stays out of the way: each round spends one attempt
            raced = session_token(proxy, here)
            races.append(race((proxy, here), (other, there), token=raced))
    assert_invalid(foreign_there)
    assert used_there.status_code == 201, used_there.text
    assert_invalid(again_here)
    assert races == [[201, 422]] * 3
    assert creates(proxy) == 4  # one per token: never a second session from one token


def race(*places: tuple[ProxyHarness, httpx.Client], token: str) -> list[int]:
    """The statuses of creates with `token` on every (proxy, client) at once, sorted."""
    barrier = threading.Barrier(len(places))

    def use(where: ProxyHarness, client: httpx.Client) -> httpx.Response:
        barrier.wait(timeout=5)  # released together: the takes overlap as closely as threads allow
        return create(where, client, token)

    with concurrent.futures.ThreadPoolExecutor(len(places)) as pool:
        answers = [pool.submit(use, where, client) for where, client in places]
        return sorted(answer.result().status_code for answer in answers)


# --- fail closed ---------------------------------------------------------------------------------------


def test_with_redis_unreachable_both_routes_fail_closed(make_proxy: MakeProxy, tmp_path: Path) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        overrides = {"LIVENESS_PROXY_REDIS_URL": private.url, "LIVENESS_PROXY_REDIS_KEY_PREFIX": "lp-bind:"}
        with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
            token = session_token(proxy, client)  # bound in Redis
            private.kill()
            down_create = create(proxy, client, token, idempotency_key="during-the-outage")
            down_token = client.post(SESSION_TOKEN, headers=proxy.auth())
            calls_when_down = creates(proxy)
            down_row = audit_row(proxy, down_create)
            # Redis back, empty (it kept nothing on disk): the binding is gone, and the proxy does
            # not guess that the token was good. The key was not stored for the 503.
            private.start()
            after = wait_for_redis(lambda: create(proxy, client, token, idempotency_key="during-the-outage"))
    finally:
        private.kill()
    for answer in (down_create, down_token):
        assert answer.status_code == 503, answer.text
        assert answer.json()["type"] == "urn:liveness-proxy:problem:store-unavailable"
    assert calls_when_down == 0
    assert (down_row["status"], down_row["upstream_status"]) == (503, None)
    assert_invalid(after)
    assert creates(proxy) == 0


def wait_for_redis(attempt: Callable[[], httpx.Response]) -> httpx.Response:
    """`attempt`'s answer once it is no longer a 503 (the proxy reconnects to a restarted Redis on
    its next command; a command racing the restart may still fail)."""
    deadline = time.monotonic() + 10
    while (answer := attempt()).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.05)
    return answer


# --- nothing in clear ------------------------------------------------------------------------------


async def binding_rows(proxy: ProxyHarness) -> list[tuple[Any, ...]]:
    async with proxy.database() as engine, engine.connect() as connection:
        rows = await connection.execute(select(session_token_bindings))
        return [tuple(row) for row in rows]


def stored_bindings(shared: Shared) -> list[str]:
    """Every binding as stored, as text: table rows, or Redis keys with their values."""
    if shared.redis_prefix is None:
        return [repr(row) for row in asyncio.run(binding_rows(shared.proxy))]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=f"{shared.redis_prefix}session-token:*"))
        return [f"{name!r} {client.get(name)!r} {client.pttl(name)}" for name in names]
    finally:
        client.close()


def test_the_store_holds_keyed_hashes_only_and_forgets_a_used_token(shared: Shared) -> None:
    proxy = shared.proxy
    with proxy.client() as client:
        kept = session_token(proxy, client)
        used = session_token(proxy, client)
        assert create(proxy, client, used).status_code == 201
        stored = stored_bindings(shared)
    unkeyed = [hashlib.sha256(value.encode()).hexdigest() for value in (kept, used, "alice")]
    # Bindings of earlier tests may still be there (expired, not yet swept): this test's token is one.
    assert any(proxy.runtime.hashes.token(kept) in binding for binding in stored)
    assert not any(proxy.runtime.hashes.token(used) in binding for binding in stored)
    for binding in stored:
        for clear in (kept, used, kept.removeprefix("sst_"), "alice", *unkeyed):
            assert clear not in binding
