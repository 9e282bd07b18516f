"""While `liveness-proxy demo` runs, no other site's page can drive it: neither the demo's own buttons
nor the sandbox's control API behind them (which the page never calls itself: the demo server does).
Over real HTTP, against the demo's own start-up; `e2e/test_demo_browser.py` has the page's view."""

from __future__ import annotations

import httpx

from liveness_proxy.demo.servers import RunningDemo

OUTAGE_FAULT = {"target": "session_token", "kind": "status", "status": 503, "count": 1000}


async def test_the_sandbox_control_api_refuses_what_a_web_page_could_send(demo: RunningDemo) -> None:
    async with httpx.AsyncClient(base_url=demo.sandbox_url, timeout=10) as sandbox:
        # A cross-site "simple" request: a text/plain body needs no CORS preflight.
        plain = await sandbox.post(
            "/_sandbox/faults",
            json=None,
            content=str(OUTAGE_FAULT).encode(),
            headers={"Content-Type": "text/plain"},
        )
        # No body at all, from another site's page: the browser names that page's origin.
        foreign = await sandbox.post("/_sandbox/tokens/revoke", headers={"Origin": "https://evil.example"})
        # DNS rebinding: another site's name, pointed at 127.0.0.1.
        rebound = await sandbox.post("/_sandbox/tokens/revoke", headers={"Host": "evil.example"})
        assert (plain.status_code, foreign.status_code, rebound.status_code) == (415, 403, 403)
        stats = await sandbox.get("/_sandbox/stats")
        assert stats.status_code == 200  # curl, httpx or the tests: no Origin, a loopback Host

    # Nothing took effect: the demo's own flow still gets a session token through the proxy.
    async with httpx.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
        token = await http.post(
            "/v1/liveness/session-token", headers={"Authorization": f"Bearer {demo.api_key}"}
        )
    assert token.status_code == 200, token.text


async def test_the_demo_buttons_refuse_another_sites_origin(demo: RunningDemo) -> None:
    async with httpx.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
        # The page itself: same origin (the browser sends it on a POST), answered.
        own = await http.post("/demo/api/sign-in", json={}, headers={"Origin": demo.proxy_url})
        assert own.status_code == 200
        for origin in ("https://evil.example", "null", demo.sandbox_url):
            refused = await http.post(
                "/demo/api/upstream-outage", json={"enabled": True}, headers={"Origin": origin}
            )
            assert refused.status_code == 403, origin
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["request_id"] == refused.headers["x-request-id"]
        config = (await http.get("/demo/api/config")).json()
    assert config["upstream_outage"] is False  # the switch was never pressed


async def test_the_demo_has_no_slash_redirects(demo: RunningDemo) -> None:
    async with httpx.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
        for path in ("/demo/api/config/", "/v1/liveness/session-token/", "/healthz/"):
            answer = await http.request("POST" if "session" in path else "GET", path)
            assert (answer.status_code, answer.headers.get("location")) == (404, None), path
