"""The access log through the running proxy: one JSON line per request, with its route template,
subject and upstream status."""

from __future__ import annotations

import json

import httpx

from support import ProxyHarness


def test_one_json_log_line_per_request_with_route_template_subject_and_upstream_status(
    proxy: ProxyHarness, client: httpx.Client
) -> None:
    session_id = proxy.create_session(client)
    response = client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth())
    line = proxy.access_line(response.headers["x-request-id"])
    request_lines = proxy.log_events("request")
    assert line["route"] == "/v1/liveness/sessions/{session_id}/result"
    assert line["method"] == "GET"
    assert line["status"] == 200
    # The subject's commitment, never the subject: the log outlives an erasure.
    assert "subject" not in line
    assert line["subject_commitment"] == proxy.commitment_of("alice")
    assert "alice" not in json.dumps(request_lines)
    assert line["upstream_status"] == 200
    assert line["duration_ms"] > 0
    assert line["level"] == "info"
    assert session_id not in json.dumps(request_lines)  # the template, never the raw path
