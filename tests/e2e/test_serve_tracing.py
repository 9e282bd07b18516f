"""`liveness-proxy serve` configured by the standard OTEL_* variables alone, exporting to a real
OTLP/HTTP receiver: forwarded headers and the trust of the caller's traceparent, on the real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from e2e.test_serve_limits import limits_env, running_serve
from liveness_proxy.sandbox import Sandbox
from otlp_receiver import OtlpReceiver
from support import ServerThread, upstream_sandbox

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.mark.parametrize(
    ("forwarders", "continued"),
    [("127.0.0.1,::1", True), ("10.1.2.3", False)],
    ids=["peer-trusted", "peer-not-trusted"],
)
def test_serve_continues_a_traceparent_only_from_a_trusted_forwarder(
    tmp_path: Path, forwarders: str, continued: bool
) -> None:
    upstream: Sandbox = upstream_sandbox()
    sandbox = ServerThread(upstream.app, lifespan="off").start()
    try:
        with OtlpReceiver() as receiver:
            env = limits_env(
                sandbox.url,
                tmp_path,
                OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                OTEL_SERVICE_NAME="kyc-edge",
                OTEL_BSP_SCHEDULE_DELAY="100",
                FORWARDED_ALLOW_IPS=forwarders,
                LIVENESS_PROXY_RATE_LIMIT_UNAUTHENTICATED="2/minute",
                LIVENESS_PROXY_FAILED_AUTH_DELAY_SECONDS="0",
            )
            with running_serve(env, tmp_path) as served:
                answer = httpx.post(
                    f"{served.url}/v1/liveness/session-token",
                    headers={**served.auth, "traceparent": TRACEPARENT, "X-Forwarded-For": "198.51.100.7"},
                )
                assert answer.status_code == 200
                httpx.get(f"{served.url}/healthz")
                [server] = receiver.wait_for(lambda span: span.kind == "SERVER", timeout=15)
                bad = {"Authorization": "Bearer lpk_0123456789abcdef_wrong"}
                refusals = [
                    httpx.post(
                        f"{served.url}/v1/liveness/session-token", headers={**bad, "X-Forwarded-For": address}
                    ).status_code
                    for address in ("203.0.113.7", "203.0.113.7", "203.0.113.7", "203.0.113.8")
                ]
            # After SIGTERM: the spans of the shutdown were flushed (nothing left unexported).
            spans = receiver.spans()
    finally:
        sandbox.stop()
    # X-Forwarded-For is applied as before, from trusted peers only: the second address has a
    # budget of its own only when the peer forwarding it is trusted.
    assert refusals == ([401, 401, 429, 401] if continued else [401, 401, 429, 429])
    assert server.name == "POST /v1/liveness/session-token"
    assert server.resource_attributes["service.name"] == "kyc-edge"
    if continued:
        assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
        assert server.links == []
    else:
        assert server.trace_id != CALLER_TRACE
        assert [(link.trace_id, link.span_id) for link in server.links] == [(CALLER_TRACE, CALLER_SPAN)]
    # /healthz is not traced; the refused requests are.
    assert [span.name for span in spans if span.kind == "SERVER"] == [server.name] * 5
