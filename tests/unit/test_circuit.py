"""The circuit breaker's state machine on a manual clock, and what counts as an outage (which upstream
answers trip it through the real proxy: integration/test_circuit.py; the end-to-end row with
recovery: integration/test_fault_matrix.py)."""

from __future__ import annotations

import pytest

from liveness_proxy.errors import (
    UpstreamCircuitOpen,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from liveness_proxy.http import Http1Transport
from liveness_proxy.sandbox import ManualClock
from liveness_proxy.upstream.circuit import CircuitBreaker
from liveness_proxy.upstream.client import CynopsisClient, CynopsisEndpoints, signals_outage
from liveness_proxy.upstream.oauth import FetchedToken
from liveness_proxy.upstream.tokens import TokenManager


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[bool, int]] = []
        self.rejections = 0

    def circuit_changed(self, is_open: bool, consecutive_failures: int) -> None:
        self.changes.append((is_open, consecutive_failures))

    def circuit_rejected(self) -> None:
        self.rejections += 1


def breaker(clock: ManualClock, recorder: Recorder, threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, open_seconds=10, clock=clock.now, observer=recorder)


def test_opens_after_consecutive_failures_only() -> None:
    clock, recorder = ManualClock(0), Recorder()
    circuit = breaker(clock, recorder)
    for _ in range(2):
        circuit.failed(circuit.admit())
    circuit.succeeded(circuit.admit())  # an answer in between resets the count
    for _ in range(2):
        circuit.failed(circuit.admit())
    assert not circuit.is_open
    circuit.failed(circuit.admit())
    assert circuit.is_open
    assert recorder.changes == [(True, 3)]


def test_open_circuit_refuses_with_retry_after_then_lets_one_probe_through() -> None:
    clock, recorder = ManualClock(0), Recorder()
    circuit = breaker(clock, recorder, threshold=1)
    circuit.failed(circuit.admit())
    clock.advance(2.5)
    with pytest.raises(UpstreamCircuitOpen) as refused:
        circuit.admit()
    assert refused.value.headers["Retry-After"] == "8"  # ceil(10 - 2.5)
    assert refused.value.response_status() == 503
    clock.advance(7.5)
    assert circuit.admit() is True  # the probe
    with pytest.raises(UpstreamCircuitOpen) as while_probing:
        circuit.admit()  # only one probe at a time
    assert while_probing.value.headers["Retry-After"] == "1"
    circuit.succeeded(True)
    assert not circuit.is_open
    assert circuit.admit() is False
    assert recorder.changes == [(True, 1), (False, 0)]
    assert recorder.rejections == 2


def test_a_failed_probe_reopens_for_a_whole_interval() -> None:
    clock, recorder = ManualClock(0), Recorder()
    circuit = breaker(clock, recorder, threshold=1)
    circuit.failed(circuit.admit())
    clock.advance(10)
    circuit.failed(circuit.admit())
    clock.advance(9.9)
    with pytest.raises(UpstreamCircuitOpen):
        circuit.admit()
    clock.advance(0.1)
    assert circuit.admit() is True
    # Reopening is not a new outage: one "opened" signal for the whole episode.
    assert recorder.changes == [(True, 1)]


def test_an_abandoned_probe_hands_the_probe_to_the_next_caller() -> None:
    clock, recorder = ManualClock(0), Recorder()
    circuit = breaker(clock, recorder, threshold=1)
    circuit.failed(circuit.admit())
    clock.advance(10)
    assert circuit.admit() is True
    circuit.abandoned(True)  # e.g. the caller disconnected: says nothing about the upstream
    assert circuit.admit() is True


def test_a_failed_probe_after_a_late_answer_closed_the_circuit_is_counted_not_a_silent_reopening() -> None:
    clock, recorder = ManualClock(0), Recorder()
    circuit = breaker(clock, recorder, threshold=2)
    slow = circuit.admit()  # admitted while closed; answers late
    circuit.failed(circuit.admit())
    circuit.failed(circuit.admit())
    clock.advance(10)
    probe = circuit.admit()
    circuit.succeeded(slow)  # the late answer closes the circuit
    circuit.failed(probe)  # one failure: not enough to open again
    assert not circuit.is_open
    circuit.failed(circuit.admit())
    assert circuit.is_open
    assert recorder.changes == [(True, 2), (False, 0), (True, 2)]


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (UpstreamTimeout("t"), True),
        (UpstreamUnavailable("refused"), True),
        (UpstreamUnavailable("503", upstream_status=503), True),
        (UpstreamUnavailable("504", upstream_status=504), True),
        (UpstreamMalformed("an oversized 503", upstream_status=503), True),
        (UpstreamUnavailable("500", upstream_status=500), False),
        (UpstreamUnavailable("302", upstream_status=302), False),
        (UpstreamUnavailable("401", upstream_status=401), False),
        (UpstreamMalformed("bad JSON in a 200", upstream_status=200), False),
        (UpstreamRejected("409", upstream_status=409), False),
        (UpstreamRateLimited("429", retry_after_seconds=1), False),
    ],
)
def test_what_counts_as_an_outage(error: UpstreamError, outage: bool) -> None:
    assert signals_outage(error) is outage


async def test_a_call_the_circuit_refuses_never_runs_what_comes_before_sending() -> None:
    class NoTokens:
        async def fetch(self) -> FetchedToken:
            raise AssertionError("no token is needed for a refused call")

    circuit = CircuitBreaker(failure_threshold=1, open_seconds=30)
    circuit.failed(circuit.admit())
    pool = Http1Transport(max_connections=1, connect_timeout_seconds=1, user_agent="t")
    client = CynopsisClient(
        pool,
        TokenManager(NoTokens(), refresh_margin=lambda _: 1.0, failure_backoff_seconds=1),
        endpoints=CynopsisEndpoints("http://127.0.0.1:9", "/t", "/s", "/r/{session_id}"),
        domain_id="d",
        max_response_bytes=1024,
        timeout_seconds=1,
        circuit=circuit,
    )
    attempts: list[str] = []

    async def count_attempt() -> None:
        attempts.append("counted")

    with pytest.raises(UpstreamCircuitOpen):
        await client.create_session(b"{}", "request-1", before_sending=count_attempt)
    assert attempts == []
    await pool.aclose()


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0, open_seconds=1)
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=1, open_seconds=0)
