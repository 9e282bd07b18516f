"""The JS client's retried creates (issue 17, item 5): `createSession` sends an `Idempotency-Key` of
its own and asks again with the same key and body after a lost answer, so the proxy replays the first
outcome instead of spending a second attempt.

The client runs in Node (`js_client_scenarios.mjs`: the module the proxy serves, Node's own fetch)
against a real proxy served on loopback in front of the sandbox. The lost answers are real: the
sandbox answers slower than the client's per-attempt limit, or a TCP relay resets the connection once
the proxy's answer starts. Every proxy here caps each caller at one daily attempt, and each test has a
caller of its own, so "one attempt counted" is checked as the proxy enforces it: the next create of
that caller is refused with `daily_attempts`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import LOG_SCAN
from liveness_proxy.sandbox import Fault, SandboxConfig
from prepared import SQLITE_NAME, PreparedDatabases
from support import Harness, ProxyHarness, issue_keys, wait_until

NODE = shutil.which("node")
SCENARIOS = Path(__file__).with_name("js_client_scenarios.mjs")
CREATE_PATH = SandboxConfig.session_path
SESSION_TOKEN_PATH = SandboxConfig.session_token_path
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# The create endpoint of the sandbox answers after this long in the timeout tests: well past the
# client's per-attempt limit, so its retry arrives while the first request is still in flight.
SLOW_CREATE_SECONDS = 1.2
SLOW_CREATE = Fault(target="liveness_session", kind="latency", delay_seconds=SLOW_CREATE_SECONDS)
ATTEMPT_TIMEOUT_MS = 200


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    prepared_databases: PreparedDatabases,
) -> Iterator[ProxyHarness]:
    """One proxy for the module, served on loopback (Node needs a socket)."""
    if NODE is None:
        if os.environ.get("LIVENESS_PROXY_TEST_REQUIRE_SERVICES"):
            pytest.fail("node is not installed (.ci/run installs nodejs)")
        pytest.skip("node is not installed: the JS client runs in Node here (apt-get install nodejs)")
    folder = tmp_path_factory.mktemp("js-client")
    overrides = {
        "LIVENESS_PROXY_DAILY_ATTEMPTS": 1,
        # Longer than SLOW_CREATE_SECONDS: the slow create succeeds, late.
        "CYNOPSIS_TIMEOUT_SECONDS": 3.0,
    }
    with Harness(
        folder,
        proxy_overrides=overrides,
        in_process=False,
        prepared_keys=prepared_databases.sqlite(folder / SQLITE_NAME),
        log_scan=request.config.stash[LOG_SCAN],
        origin=__name__,
    ) as running:
        yield running


_callers = itertools.count()


@pytest.fixture
def caller(proxy: ProxyHarness) -> str:
    """The API key of a caller (subject) of this test's own, with its one daily attempt unspent."""
    label = f"js-caller-{next(_callers)}"
    issued = asyncio.run(issue_keys(proxy.settings, [(label, label, [])]))
    proxy.sandbox.clear_faults()
    return issued[label].key


def session_token(proxy: ProxyHarness, key: str) -> str:
    with proxy.client() as http:
        response = http.post("/v1/liveness/session-token", headers=proxy.auth(key))
    assert response.status_code == 200, response.text
    token: str = response.json()["session_token"]
    return token


def run_client(proxy: ProxyHarness, key: str, **config: Any) -> dict[str, Any]:
    """One call of the JS client in Node; what it saw (see js_client_scenarios.mjs)."""
    assert NODE is not None
    config = {"proxyUrl": proxy.url, "apiKey": key, "call": "createSession", **config}
    done = subprocess.run(
        [NODE, str(SCENARIOS), orjson.dumps(config).decode()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


def upstream_calls(proxy: ProxyHarness, path: str, since: int) -> int:
    return [record.raw_path for record in proxy.sandbox.request_log[since:]].count(path)


def assert_attempt_spent(proxy: ProxyHarness, key: str) -> None:
    """The caller's one daily attempt is spent: its next create is refused before Cynopsis."""
    token = session_token(proxy, key)
    with proxy.client() as http:
        refused = http.post("/v1/liveness/sessions", headers=proxy.auth(key), json={"session_token": token})
    assert refused.status_code == 429, refused.text
    assert refused.json()["limit"] == "daily_attempts"


def test_a_create_that_timed_out_is_retried_with_its_key_and_its_answer_replayed(
    proxy: ProxyHarness, caller: str
) -> None:
    token = session_token(proxy, caller)
    mark = len(proxy.sandbox.request_log)
    proxy.sandbox.inject_fault(SLOW_CREATE)

    report = run_client(
        proxy, caller, body={"session_token": token}, options={"timeoutMs": ATTEMPT_TIMEOUT_MS}
    )

    assert report["outcome"]["ok"], report
    session_id = report["outcome"]["data"]["session_id"]
    calls, sent, retries = report["calls"], report["sent"], report["retries"]
    # The first attempt ran out of time; the retry found it still in flight (409) and waited as the
    # proxy said; a later one got the first request's answer, replayed.
    assert calls[0]["status"] == 0
    assert calls[0]["timedOut"] is True
    assert retries[0]["error"]["name"] == "RequestTimeoutError"
    in_flight = [r for r in retries if r["error"]["slug"] == "idempotency-key-in-flight"]
    assert in_flight, report
    assert all(r["delayMs"] >= 1000 for r in in_flight)  # Retry-After: 1
    assert (calls[-1]["status"], calls[-1]["replayed"]) == (201, True)
    # One key, generated by the client, and the same body on every attempt.
    [key] = {s["idempotencyKey"] for s in sent}
    assert UUID.fullmatch(key), sent
    assert len({s["body"] for s in sent}) == 1
    assert {c["idempotencyKey"] for c in calls} == {sent[0]["idempotencyKey"]}
    # One session: Cynopsis was asked once, and it is the one the client got.
    assert upstream_calls(proxy, CREATE_PATH, mark) == 1
    assert session_id in proxy.sandbox.session_ids
    assert_attempt_spent(proxy, caller)


def test_a_lost_answer_is_asked_for_again_with_the_same_key(proxy: ProxyHarness, caller: str) -> None:
    token = session_token(proxy, caller)
    mark = len(proxy.sandbox.request_log)
    own_key = "order-42_attempt-A"

    report = run_client(
        proxy,
        caller,
        body={"session_token": token},
        options={"idempotencyKey": own_key},
        relayFaults=["drop-answer"],
    )

    assert report["outcome"]["ok"], report
    calls = report["calls"]
    # The proxy created the session and answered; the connection was reset on the way back.
    assert [(c["status"], c.get("replayed")) for c in calls] == [(0, None), (201, True)]
    assert "timedOut" not in calls[0]
    assert report["retries"][0]["error"]["name"] == "NetworkError"
    assert [s["idempotencyKey"] for s in report["sent"]] == [own_key, own_key]
    assert upstream_calls(proxy, CREATE_PATH, mark) == 1
    assert report["outcome"]["data"]["session_id"] in proxy.sandbox.session_ids
    assert_attempt_spent(proxy, caller)


def test_a_stored_upstream_failure_is_replayed_then_thrown_not_repeated(
    proxy: ProxyHarness, caller: str
) -> None:
    """A 502 may come from a gateway in front of the proxy that lost the proxy's answer, so it is
    retried under the same key; when it is the proxy's own (the Cynopsis call went out and failed),
    the retry gets the stored failure again, marked replayed, and the client stops there."""
    token = session_token(proxy, caller)
    mark = len(proxy.sandbox.request_log)
    proxy.sandbox.inject_fault(Fault(target="liveness_session", kind="status", status=500))

    report = run_client(proxy, caller, body={"session_token": token})

    error = report["outcome"]["error"]
    assert (error["name"], error["status"], error["replayed"]) == ("UpstreamUnavailableError", 502, True)
    assert [(c["status"], c["replayed"]) for c in report["calls"]] == [(502, False), (502, True)]
    assert upstream_calls(proxy, CREATE_PATH, mark) == 1
    assert_attempt_spent(proxy, caller)


def test_a_refusal_is_thrown_at_once(proxy: ProxyHarness, caller: str) -> None:
    mark = len(proxy.sandbox.request_log)

    report = run_client(proxy, caller, body={"session_token": "never-issued"})

    error = report["outcome"]["error"]
    assert (error["status"], error["slug"]) == (422, "session-token-invalid")
    assert len(report["sent"]) == 1
    assert report["retries"] == []
    assert upstream_calls(proxy, CREATE_PATH, mark) == 0


def test_a_refusal_with_a_long_retry_after_is_thrown_at_once(proxy: ProxyHarness, caller: str) -> None:
    """The daily cap's Retry-After runs to midnight, far past maxDelayMs: the page is told now."""
    with proxy.client() as http:
        proxy.create_session(http, caller)  # the caller's one attempt of the day
    token = session_token(proxy, caller)

    report = run_client(proxy, caller, body={"session_token": token})

    error = report["outcome"]["error"]
    assert (error["name"], error["slug"]) == ("RateLimitedError", "rate-limited")
    assert error["retryAfterSeconds"] > 5
    assert len(report["sent"]) == 1
    assert report["retries"] == []


def test_retries_are_bounded_and_back_off(proxy: ProxyHarness, caller: str) -> None:
    report = run_client(
        proxy,
        caller,
        body={"session_token": "unused"},
        options={"retries": 2},
        relayFaults=["refuse"] * 3,
    )

    error = report["outcome"]["error"]
    assert (error["name"], error["isNetworkError"]) == ("NetworkError", True)
    sent = report["sent"]
    assert len(sent) == 3  # the first attempt and two retries
    assert len({s["idempotencyKey"] for s in sent}) == 1
    delays = [r["delayMs"] for r in report["retries"]]
    # 250 ms, then 500 ms, each jittered down to at most half.
    assert 125 <= delays[0] <= 250, delays
    assert 250 <= delays[1] <= 500, delays


@pytest.mark.parametrize("moment", ["during-the-first-attempt", "during-the-in-flight-wait"])
def test_aborting_stops_the_retries_at_once(proxy: ProxyHarness, caller: str, moment: str) -> None:
    token = session_token(proxy, caller)
    mark = len(proxy.sandbox.request_log)
    sessions_before = len(proxy.sandbox.session_ids)
    proxy.sandbox.inject_fault(SLOW_CREATE)
    if moment == "during-the-first-attempt":
        config: dict[str, Any] = {"options": {"timeoutMs": 1000}, "abortAfterMs": 200}
    else:
        config = {"options": {"timeoutMs": ATTEMPT_TIMEOUT_MS}, "abortDuringInFlightWait": True}

    # settleMs: longer than any wait the client had scheduled (the in-flight wait is 1 s).
    report = run_client(proxy, caller, body={"session_token": token}, settleMs=1300, **config)

    error = report["outcome"]["error"]
    assert error["isAbortReason"], report  # rejected with the signal's reason, as is
    assert report["sentAtOutcome"] == len(report["sent"]), "a request went out after the abort"
    if moment == "during-the-first-attempt":
        assert len(report["sent"]) == 1
        assert report["outcomeAtMs"] < 200 + 500  # not after the attempt's own time limit
    else:
        assert report["calls"][-1]["status"] == 409
        in_flight_wait = report["retries"][-1]
        assert report["outcomeAtMs"] < in_flight_wait["atMs"] + 500  # not after its 1 s wait
    # The proxy still finishes what reached it: one session, whatever the client does.
    wait_until(lambda: len(proxy.sandbox.session_ids) > sessions_before)
    assert upstream_calls(proxy, CREATE_PATH, mark) == 1


def test_a_session_token_request_is_neither_keyed_nor_retried(proxy: ProxyHarness, caller: str) -> None:
    """Asking again would only yield another token: the caller asks again if it wants one."""
    mark = len(proxy.sandbox.request_log)

    report = run_client(proxy, caller, call="getSessionToken", relayFaults=["drop-answer"])

    assert report["outcome"]["error"]["name"] == "NetworkError"
    assert [s["idempotencyKey"] for s in report["sent"]] == [None]
    assert "idempotencyKey" not in report["calls"][0]
    assert upstream_calls(proxy, SESSION_TOKEN_PATH, mark) == 1


def test_the_client_refuses_a_malformed_idempotency_key(proxy: ProxyHarness, caller: str) -> None:
    report = run_client(proxy, caller, body={"session_token": "x"}, options={"idempotencyKey": "not a key"})

    assert report["outcome"]["error"]["name"] == "TypeError"
    assert report["sent"] == []
