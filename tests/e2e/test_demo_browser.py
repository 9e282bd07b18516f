"""The demo page in a real browser: Debian's chromium, headless, driven by Playwright.

Each test starts `liveness-proxy demo` as a user would (sandbox, proxy and page on loopback, a fresh
folder, so rate limits and sessions start empty), clicks through the page, asserts what a person
would read, and saves screenshots to `test-artifacts/browser/`. Every answer the browser received is
scanned: no Cynopsis access token, no face image, no client secret ever reaches the page.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.test_cli import COMMAND, free_port
from e2e.test_serve_limits import wait_ready
from support import background_command

# a real browser against `liveness-proxy demo`
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

playwright_sync = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
# Sandbox access tokens start with "sbx_"; a base64 PNG starts with "iVBORw0KGgo".
FORBIDDEN_IN_BROWSER = {
    "a Cynopsis access token": re.compile(r"sbx_[A-Za-z0-9_-]{8,}"),
    "a face image": re.compile(r"iVBORw0KGgo"),
    "a client secret field": re.compile(r"client_secret\s*[=:]", re.IGNORECASE),
}
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # root in a container: chromium's own sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_TIMEOUT_MS = 20_000


def chromium_path() -> str | None:
    return os.environ.get("LIVENESS_PROXY_TEST_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        if os.environ.get("LIVENESS_PROXY_TEST_REQUIRE_SERVICES"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class DemoRun:
    url: str
    output: Path


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoRun]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CYNOPSIS_", "LIVENESS_PROXY_"))}
    port = free_port()
    output = tmp_path / "demo-output.txt"
    command = [COMMAND, "demo", "--port", str(port), "--sandbox-port", "0", "--dir", str(tmp_path / "demo")]
    with background_command(command, env=env, output=output) as process:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process)
        yield DemoRun(url=url, output=output)


@dataclass
class BrowserRecord:
    """Everything the page received, and what went wrong in it."""

    bodies: list[tuple[str, str]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def leaks(self) -> list[str]:
        return [
            f"{label} in {url}"
            for url, text in self.bodies
            for label, pattern in FORBIDDEN_IN_BROWSER.items()
            if pattern.search(text)
        ]


@pytest.fixture
def page(browser: Any, demo: DemoRun, request: pytest.FixtureRequest) -> Iterator[tuple[Any, BrowserRecord]]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    record = BrowserRecord()

    def keep_body(response: Any) -> None:
        try:
            headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
            record.bodies.append((response.url, headers + "\n" + response.text()))
        except Exception:  # a body already gone (redirect, aborted) has nothing to scan
            record.bodies.append((response.url, "\n".join(response.headers.values())))

    page.on("response", keep_body)

    def keep_console_error(message: Any) -> None:
        if message.type == "error":
            record.console_errors.append(message.text)

    page.on("console", keep_console_error)
    page.on("pageerror", lambda error: record.page_errors.append(str(error)))
    page.goto(f"{demo.url}/demo/")
    try:
        yield page, record
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-final.png"), full_page=True)
        context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def by_id(page: Any, test_id: str) -> Any:
    return page.get_by_test_id(test_id)


def wait_idle(page: Any) -> None:
    # Not wait_for_function: the page's CSP (no 'unsafe-eval') refuses Playwright's string evaluation.
    playwright_sync.expect(page.locator("body")).to_have_attribute(
        "data-state", "idle", timeout=STEP_TIMEOUT_MS
    )


def sign_in(page: Any) -> None:
    by_id(page, "sign-in").click()
    playwright_sync.expect(by_id(page, "signed-in")).to_contain_text("demo-user")


def sign_in_and_create_session(page: Any) -> str:
    expect = playwright_sync.expect
    sign_in(page)
    by_id(page, "get-token").click()
    expect(by_id(page, "session-token")).not_to_be_empty()
    by_id(page, "create-session").click()
    expect(by_id(page, "session-id")).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))
    wait_idle(page)
    return str(by_id(page, "session-id").text_content()).strip()


def assert_clean(record: BrowserRecord) -> None:
    assert record.bodies, "the page received nothing"
    assert record.leaks() == []
    assert record.page_errors == []
    # Chromium logs every non-2xx answer as "Failed to load resource"; anything else is a page bug
    # (a CSP violation, an exception in a handler).
    assert [text for text in record.console_errors if "Failed to load resource" not in text] == []


@pytest.mark.timeout(120)
def test_live_capture_passes_and_nothing_secret_reaches_the_browser(
    page: tuple[Any, BrowserRecord],
) -> None:
    expect = playwright_sync.expect
    tab, record = page
    expect(tab).to_have_title(re.compile("liveness", re.IGNORECASE))
    shot(tab, "live-1-start")
    session_id = sign_in_and_create_session(tab)
    shot(tab, "live-2-session-created")

    by_id(tab, "capture-live").click()
    # The sandbox completes the session after the capture delay: the page polls meanwhile.
    expect(by_id(tab, "progress")).to_be_visible()
    shot(tab, "live-3-waiting")
    expect(by_id(tab, "verdict")).to_contain_text("Passed")
    expect(by_id(tab, "progress")).to_be_hidden()
    expect(by_id(tab, "confidence")).to_contain_text("98.2")
    # The demo server plays the customer's backend: the proxy's webhook arrives there, verified.
    expect(by_id(tab, "verdict-webhook")).to_have_text(
        "Your backend received: liveness.session.completed — SUCCEEDED 98.2 — signature verified ✓"
    )
    expect(webhook_entry(tab, session_id)).to_have_count(1)
    wait_idle(tab)

    # The teaching panels: the browser's calls went to the proxy, the proxy's to Cynopsis.
    browser_calls = str(by_id(tab, "browser-calls").text_content())
    assert "/v1/liveness/session-token" in browser_calls
    assert f"/v1/liveness/sessions/{session_id}/result" in browser_calls
    expect(by_id(tab, "upstream-calls")).to_contain_text("/oauth/token")
    upstream_calls = str(by_id(tab, "upstream-calls").text_content())
    assert "liveness_result" in upstream_calls
    assert "demo-domain" in upstream_calls
    expect(by_id(tab, "leak-check")).to_have_attribute("data-clean", "true")
    expect(by_id(tab, "leak-check")).to_contain_text("no client secret")
    expect(by_id(tab, "leak-check")).to_contain_text("no webhook signing secret")
    expect(by_id(tab, "error")).to_be_hidden()
    shot(tab, "live-4-passed")
    assert_clean(record)


def webhook_entry(page: Any, session_id: str) -> Any:
    return by_id(page, "webhooks").locator(f'li[data-session-id="{session_id}"]')


@pytest.mark.timeout(120)
def test_verdict_reaches_the_backend_after_the_page_is_closed(
    page: tuple[Any, BrowserRecord], demo: DemoRun
) -> None:
    """The user leaves before the verdict: the proxy follows the session on its own, and its webhook
    is on the backend's list when the page is opened again. A forged one never is."""
    expect = playwright_sync.expect
    tab, record = page
    session_id = sign_in_and_create_session(tab)
    by_id(tab, "capture-live").click()
    expect(by_id(tab, "progress")).to_be_visible()
    # Gone before Cynopsis finishes (the capture takes 2 s): nothing of the page reads the result now.
    tab.goto("about:blank")
    forged = httpx.post(
        f"{demo.url}/demo/webhooks",
        json={"type": "liveness.session.completed", "data": {"session_id": session_id, "status": "FAILED"}},
        headers={
            "webhook-id": "msg_forged",
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,Zm9yZ2VkIHNpZ25hdHVyZSBvZiAzMiBieXRlcyEhISE=",
        },
    )
    assert forged.status_code == 400

    tab.goto(f"{demo.url}/demo/")
    entry = webhook_entry(tab, session_id)
    expect(entry).to_contain_text("liveness.session.completed — SUCCEEDED 98.2 — signature verified ✓")
    expect(entry).to_have_count(1)  # the forged FAILED for the same session is not listed
    expect(by_id(tab, "webhooks-refused")).to_contain_text("Refused 1")
    wait_idle(tab)
    shot(tab, "closed-page-webhook")
    # The page never saw the verdict itself: the proxy's finalizer read it, and the webhook told.
    expect(by_id(tab, "upstream-calls")).to_contain_text("the finalizer")
    results = [
        text for url, text in record.bodies if url.endswith(f"/v1/liveness/sessions/{session_id}/result")
    ]
    assert not any("SUCCEEDED" in text for text in results)
    assert_clean(record)


@pytest.mark.timeout(120)
def test_spoof_capture_fails_with_low_confidence(page: tuple[Any, BrowserRecord]) -> None:
    expect = playwright_sync.expect
    tab, record = page
    sign_in_and_create_session(tab)
    by_id(tab, "capture-spoof").click()
    expect(by_id(tab, "verdict")).to_contain_text("Failed")
    expect(by_id(tab, "confidence")).to_contain_text("12.3")
    shot(tab, "spoof-failed")

    # Start over keeps the sign-in and runs a second session to its end.
    by_id(tab, "start-over").click()
    expect(by_id(tab, "verdict")).to_have_text("No verdict yet.")
    expect(by_id(tab, "session-token")).to_be_empty()
    by_id(tab, "get-token").click()
    expect(by_id(tab, "session-token")).not_to_be_empty()
    by_id(tab, "create-session").click()
    wait_idle(tab)
    by_id(tab, "expire-session").click()
    expect(by_id(tab, "verdict")).to_contain_text("expired")
    shot(tab, "spoof-then-expired")
    assert_clean(record)


@pytest.mark.timeout(120)
def test_upstream_outage_is_explained_and_the_flow_recovers(page: tuple[Any, BrowserRecord]) -> None:
    expect = playwright_sync.expect
    tab, record = page
    sign_in(tab)
    by_id(tab, "outage-toggle").check()
    wait_idle(tab)
    by_id(tab, "get-token").click()
    error = by_id(tab, "error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not reachable")
    expect(by_id(tab, "error-request-id")).to_have_text(re.compile(r"[0-9a-f]{8,}"))
    assert "{" not in str(error.text_content()), "the error is written for a person, not raw JSON"
    shot(tab, "outage-error")

    by_id(tab, "outage-toggle").uncheck()
    wait_idle(tab)
    # One failure does not open the circuit (5 do): the next try goes through.
    by_id(tab, "get-token").click()
    expect(by_id(tab, "session-token")).not_to_be_empty()
    expect(error).to_be_hidden()
    shot(tab, "outage-recovered")
    assert_clean(record)


@pytest.mark.timeout(120)
def test_rate_limit_is_shown_with_the_wait(page: tuple[Any, BrowserRecord]) -> None:
    expect = playwright_sync.expect
    tab, record = page
    sign_in(tab)
    error = by_id(tab, "error")
    # The default limit is 10 session tokens a minute per user: the 11th is refused, or a few later when
    # the run straddles a minute boundary (sliding-window counters weigh the previous minute's count
    # down as it ages). So click until the refusal shows.
    for _ in range(20):
        by_id(tab, "get-token").click()
        wait_idle(tab)
        if error.is_visible():
            break
    sent = [url for url, _ in record.bodies if url.endswith("/v1/liveness/session-token")]
    assert len(sent) >= 11
    expect(error).to_contain_text(re.compile(r"Too many attempts.*\d+ second", re.IGNORECASE))
    shot(tab, "rate-limited")
    assert_clean(record)


@pytest.mark.timeout(120)
def test_js_client_errors_carry_problem_details_and_waits_can_be_cancelled(
    page: tuple[Any, BrowserRecord], demo: DemoRun
) -> None:
    """The client served at /client/ against the real proxy, inside the browser."""
    tab, record = page
    outcome = tab.evaluate(
        """async () => {
          const m = await import("/client/liveness-proxy-client.js");
          const signIn = await (await fetch("/demo/api/sign-in", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: "{}"})).json();
          let credentialCalls = 0;
          const client = new m.LivenessProxyClient({
            credential: async () => { credentialCalls += 1; return signIn.access_token; },
          });
          const out = {};
          try { await client.getResult("no-such-session"); } catch (e) {
            out.notFound = {isError: e instanceof m.LivenessProxyError, status: e.status, slug: e.slug,
                            requestId: e.requestId, detail: e.detail};
          }
          const tagged = new m.LivenessProxyClient({credential: signIn.access_token,
                                                    headers: {"X-Request-ID": "browser-test-1"}});
          try { await tagged.getResult("no-such-session"); } catch (e) { out.taggedRequestId = e.requestId; }
          const anonymous = new m.LivenessProxyClient({credential: "not-a-valid-credential"});
          try { await anonymous.getSessionToken(); } catch (e) {
            out.unauthenticated = {auth: e instanceof m.AuthenticationError, status: e.status,
                                   message: String(e.message)};
          }
          const token = await client.getSessionToken();
          const session = await client.createSession({session_token: token.session_token});
          const started = Date.now();
          try { await client.waitForResult(session.session_id, {timeoutMs: 1500, initialDelayMs: 100}); }
          catch (e) { out.timeout = {isTimeout: e instanceof m.LivenessTimeoutError,
                                     waitedMs: Date.now() - started}; }
          // A read that never answers (a black-holed network) still ends at the deadline.
          const stalled = new m.LivenessProxyClient({credential: "x", fetch: (url, init) => new Promise(
            (_, reject) => init.signal.addEventListener("abort", () => reject(init.signal.reason)))});
          const stallStarted = Date.now();
          try { await stalled.waitForResult("stalled", {timeoutMs: 800}); }
          catch (e) { out.stalled = {isTimeout: e instanceof m.LivenessTimeoutError,
                                     waitedMs: Date.now() - stallStarted}; }
          const controller = new AbortController();
          const waiting = client.waitForResult(session.session_id, {signal: controller.signal});
          setTimeout(() => controller.abort(), 200);
          const abortStarted = Date.now();
          try { await waiting; }
          catch (e) { out.abort = {name: e.name, waitedMs: Date.now() - abortStarted}; }
          await fetch(`/demo/api/sessions/${session.session_id}/capture`, {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({outcome: "live", delay_seconds: 0})});
          const progress = [];
          const result = await client.waitForResult(session.session_id,
            {timeoutMs: 20000, initialDelayMs: 100, onProgress: (p) => progress.push(p.status)});
          out.result = {status: result.status, redacted: result.redacted_fields, polls: progress.length};
          out.credentialCalls = credentialCalls;
          return out;
        }"""
    )
    assert outcome["notFound"]["isError"] is True
    assert outcome["notFound"]["status"] == 404
    assert outcome["notFound"]["slug"] == "not-found"
    assert re.fullmatch(r"[0-9a-f]{8,}", outcome["notFound"]["requestId"])
    assert outcome["taggedRequestId"] == "browser-test-1"  # the extra-headers option reached the proxy
    assert outcome["unauthenticated"] == {
        "auth": True,
        "status": 401,
        "message": outcome["unauthenticated"]["message"],
    }
    assert "not-a-valid-credential" not in outcome["unauthenticated"]["message"]
    assert outcome["timeout"]["isTimeout"] is True
    assert 1400 <= outcome["timeout"]["waitedMs"] < 10_000
    assert outcome["stalled"]["isTimeout"] is True
    assert 700 <= outcome["stalled"]["waitedMs"] < 3000
    assert outcome["abort"]["name"] == "AbortError"
    assert outcome["abort"]["waitedMs"] < 3000  # the pending back-off sleep was interrupted
    assert outcome["result"]["status"] == "SUCCEEDED"
    assert set(outcome["result"]["redacted"]) == {"reference_image", "audit_images"}
    assert outcome["result"]["polls"] >= 1
    assert outcome["credentialCalls"] >= 5  # asked per request, so a refreshed JWT is picked up
    assert_clean(record)

    served = httpx.get(f"{demo.url}/client/liveness-proxy-client.js")
    assert served.headers["content-type"].startswith("text/javascript")
    repo_copy = Path(__file__).resolve().parents[2] / "src/liveness_proxy/static/client"
    assert served.content == (repo_copy / "liveness-proxy-client.js").read_bytes()


def test_demo_api_refuses_cross_site_posts_foreign_hosts_and_a_second_capture(demo: DemoRun) -> None:
    """No browser needed: the demo's own endpoints, as a hostile page or a careless click would call them."""
    with httpx.Client(base_url=demo.url, timeout=10) as http:
        # A cross-site "simple" request (no preflight) cannot press the demo's buttons.
        plain = http.post(
            "/demo/api/upstream-outage", content=b'{"enabled": true}', headers={"Content-Type": "text/plain"}
        )
        assert plain.status_code == 415
        assert plain.json()["request_id"] == plain.headers["x-request-id"]
        assert http.post("/demo/api/sign-in").status_code == 415
        # DNS rebinding: a foreign name pointed at 127.0.0.1 gets no JWT.
        rebound = http.post("/demo/api/sign-in", json={}, headers={"Host": "evil.example"})
        assert rebound.status_code == 403
        assert rebound.headers["content-type"] == "application/problem+json"
        assert http.post("/demo/api/upstream-outage", json={"enabled": "yes"}).status_code == 422
        assert http.get("/demo/api/upstream-calls", params={"after": "x"}).status_code == 400

        token = http.post("/demo/api/sign-in", json={}).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        session_token = http.post("/v1/liveness/session-token", headers=auth).json()["session_token"]
        session_id = http.post(
            "/v1/liveness/sessions", headers=auth, json={"session_token": session_token}
        ).json()["session_id"]
        capture = f"/demo/api/sessions/{session_id}/capture"
        assert http.post(capture, json={"outcome": "live", "delay_seconds": 1}).status_code == 202
        second = http.post(capture, json={"outcome": "spoof", "delay_seconds": 0})
        assert second.status_code == 409
        # Expiring cancels the capture on its way: the session stays expired.
        assert http.post(f"/demo/api/sessions/{session_id}/expire", json={}).status_code == 200
        time.sleep(1.5)  # past the cancelled capture's 1 s delay: nothing may complete the session now
        result = http.get(f"/v1/liveness/sessions/{session_id}/result", headers=auth).json()
        assert result["status"] == "EXPIRED"
        assert http.post(capture, json={"outcome": "live", "delay_seconds": 0}).status_code == 409
        unknown = http.post("/demo/api/sessions/no-such-session/capture", json={"outcome": "live"})
        assert unknown.status_code == 404
