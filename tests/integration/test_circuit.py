"""The circuit breaker through the real proxy and sandbox: which upstream answers trip it (the state
machine is in unit/test_circuit.py; the end-to-end row with recovery in test_fault_matrix.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from liveness_proxy.sandbox import Fault
from support import ProxyHarness

SESSION_TOKEN = "/v1/liveness/session-token"


@pytest.mark.parametrize(
    ("fault", "trips"),
    [
        (Fault(target="session_token", kind="status", status=503, count=3), True),
        (Fault(target="session_token", kind="timeout", hang_seconds=3, count=3), True),
        (Fault(target="session_token", kind="status", status=502, count=3), True),
        (Fault(target="session_token", kind="status", status=500, count=3), False),
        (Fault(target="session_token", kind="status", status=400, count=3), False),
        (Fault(target="session_token", kind="status", status=409, count=3), False),
        (Fault(target="session_token", kind="rate_limit", count=3), False),
        (Fault(target="session_token", kind="malformed", count=3), False),
    ],
    ids=["503", "timeout", "502", "500", "400", "409", "429", "malformed"],
)
def test_only_signs_of_an_unavailable_upstream_open_the_circuit(
    make_proxy: Callable[..., AbstractContextManager[ProxyHarness]], fault: Fault, trips: bool
) -> None:
    overrides = {
        "cynopsis_circuit_failure_threshold": 3,
        "cynopsis_circuit_open_seconds": 30,
        "cynopsis_timeout_seconds": 0.5,
    }
    with make_proxy(proxy_overrides=overrides) as proxy, proxy.client() as client:
        # A token first, so that every faulted call below is a liveness call.
        assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code == 200
        proxy.sandbox.inject_fault(fault)
        for _ in range(3):
            assert client.post(SESSION_TOKEN, headers=proxy.auth()).status_code != 200
        calls_before = len(proxy.upstream_paths())
        answer = client.post(SESSION_TOKEN, headers=proxy.auth())
        if trips:
            assert answer.status_code == 503
            assert answer.json()["type"] == "urn:liveness-proxy:problem:upstream-circuit-open"
            assert 1 <= int(answer.headers["Retry-After"]) <= 30
            assert len(proxy.upstream_paths()) == calls_before  # refused without calling upstream
            assert "upstream_circuit_opened" in proxy.log_text()
        else:
            assert answer.status_code == 200
            assert "upstream_circuit_opened" not in proxy.log_text()
