"""Library mode: the host application's authentication hook, and the proxy mounted in a Starlette
host under a prefix (the FastAPI example has its own end-to-end test, test_example_host.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from liveness_proxy import ADMIN_SCOPE, Caller, Forbidden, ProxyApplication, Unauthenticated, create_app
from support import ProxyHarness, ServerThread, proxy_settings, upstream_sandbox

MakeProxy = Callable[..., AbstractContextManager[ProxyHarness]]
# What a trusted gateway in front of the host would set; the hook below believes it, as a host's
# own session middleware would believe its cookie.
USER_HEADER = "x-gateway-user"


async def gateway_hook(connection: HTTPConnection) -> Caller | None:
    user = connection.headers.get(USER_HEADER)
    if user is None:
        return None
    if user == "blocked":
        raise Forbidden("This account may not start a liveness check.")
    if user == "expired":
        raise Unauthenticated("The host session has expired.")
    if user == "bad-subject":
        return Caller(subject="line\nbreak", scopes=frozenset(), credential_id="gateway")
    if user == "bad-credential-id":
        return Caller(subject="zoe", scopes=frozenset(), credential_id="has a space")
    scopes = frozenset({ADMIN_SCOPE}) if user == "auditor" else frozenset()
    return Caller(subject=user, scopes=scopes, credential_id="gateway")


def test_the_hook_decides_first_and_the_proxy_credentials_still_work(make_proxy: MakeProxy) -> None:
    with make_proxy(app_options={"authenticate_caller": gateway_hook}) as proxy, proxy.client() as client:
        zoe = {USER_HEADER: "zoe"}
        token = client.post("/v1/liveness/session-token", headers=zoe).json()["session_token"]
        created = client.post("/v1/liveness/sessions", headers=zoe, json={"session_token": token})
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        proxy.sandbox.complete_session(session_id, live=True)
        assert client.get(f"/v1/liveness/sessions/{session_id}/result", headers=zoe).json()["status"] == (
            "SUCCEEDED"
        )
        # Bound to the hook's subject: another host user and alice's API key see nothing.
        other = client.get(f"/v1/liveness/sessions/{session_id}/result", headers={USER_HEADER: "yann"})
        assert other.status_code == 404
        assert (
            client.get(f"/v1/liveness/sessions/{session_id}/result", headers=proxy.auth()).status_code == 404
        )
        # The hook's scopes count: an auditor reads it.
        auditor = client.get(f"/v1/liveness/sessions/{session_id}/result", headers={USER_HEADER: "auditor"})
        assert auditor.status_code == 200
        # Without the host's identity the proxy's own API keys decide, as before.
        assert proxy.create_session(client)
        records = [row for row in proxy.audit_rows() if row["subject"] == "zoe"]
        assert {row["credential_id"] for row in records} == {"gateway"}
        assert {row["action"] for row in records} >= {"session_token.create", "session.create"}


def test_the_hook_can_refuse_and_a_broken_hook_answer_is_a_500_not_an_identity(
    make_proxy: MakeProxy,
) -> None:
    with make_proxy(app_options={"authenticate_caller": gateway_hook}) as proxy, proxy.client() as client:
        refused = client.post("/v1/liveness/session-token", headers={USER_HEADER: "blocked"})
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["detail"] == "This account may not start a liveness check."
        expired = client.post("/v1/liveness/session-token", headers={USER_HEADER: "expired"})
        assert expired.status_code == 401
        assert expired.json()["request_id"] == expired.headers["x-request-id"]
        for broken in ("bad-subject", "bad-credential-id"):
            answer = client.post("/v1/liveness/session-token", headers={USER_HEADER: broken})
            assert answer.status_code == 500
            assert answer.json()["type"].endswith("internal-error")
        assert not [path for path in proxy.upstream_paths() if "liveness" in path]  # none reached upstream
        assert "InvalidHostCaller" in proxy.log_text()


async def _enter_twice(proxy: ProxyApplication) -> str:
    async with proxy.running():
        try:
            async with proxy.running():
                return "entered twice"
        except RuntimeError as exc:
            return str(exc)


def test_mounted_in_a_starlette_host_under_a_prefix(tmp_path: Any) -> None:
    sandbox = upstream_sandbox()
    sandbox_server = ServerThread(sandbox.app, lifespan="off").start()
    try:
        settings = proxy_settings(sandbox_server.url, tmp_path / "proxy.db")
        proxy = create_app(settings, authenticate_caller=gateway_hook, migrate=True)

        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            async with proxy.running():
                yield

        async def home(_request: Request) -> JSONResponse:
            return JSONResponse({"host": "still here"})

        host = Starlette(routes=[Route("/", home), Mount("/kyc/liveness", app=proxy)], lifespan=lifespan)
        # Entering it twice would start a second runtime under the first one's requests.
        assert asyncio.run(_enter_twice(proxy)) == "this liveness-proxy app is already running"
        host_server = ServerThread(host).start()
        try:
            with httpx.Client(base_url=host_server.url, headers={USER_HEADER: "zoe"}, timeout=10) as client:
                assert client.get("/").json() == {"host": "still here"}
                assert client.get("/kyc/liveness/readyz").status_code == 200
                token = client.post("/kyc/liveness/v1/liveness/session-token").json()["session_token"]
                created = client.post("/kyc/liveness/v1/liveness/sessions", json={"session_token": token})
                assert created.status_code == 201
                location = created.headers["location"]
                session_id = created.json()["session_id"]
                assert location == f"/kyc/liveness/v1/liveness/sessions/{session_id}/result"
                assert client.get(location).json()["status"] == "CREATED"
                script = client.get("/kyc/liveness/client/liveness-proxy-client.js")
                assert script.status_code == 200
                assert "export class LivenessProxyClient" in script.text
                again = client.get(
                    "/kyc/liveness/client/liveness-proxy-client.js",
                    headers={"If-None-Match": script.headers["etag"]},
                )
                assert again.status_code == 304
                missing = client.get("/kyc/liveness/v1/nothing")
                assert missing.status_code == 404
                assert missing.headers["content-type"] == "application/problem+json"
                # No redirect to the client's own Host under the prefix either: an unknown path.
                slashed = client.post("/kyc/liveness/v1/liveness/sessions/", json={"session_token": token})
                assert (slashed.status_code, slashed.headers.get("location")) == (404, None)
                assert slashed.headers["content-type"] == "application/problem+json"
        finally:
            host_server.stop()
    finally:
        sandbox_server.stop()
